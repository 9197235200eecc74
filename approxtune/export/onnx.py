"""``model.onnx``: f^p as an ONNX graph whose compressed weights stay compressed in the file.

The graph is traced by ``torch.onnx.export`` (the dynamo exporter, unoptimised so that no weight is folded into
another: BatchNorm stays a node), with a dynamic batch dimension and the per-input shape of the study's data.  Then
every compressed layer's float32 weight initializer is replaced by its packed arrays
(:func:`~approxtune.approximation.compress_layer`) and a few nodes that decode them into a float32 tensor of the same
name, so every consumer of the weight is left as the exporter wrote it:

==================  =================================================================================================
stored              decoded by
==================  =================================================================================================
int8 / int4         the codes as an INT8 / INT4 initializer (INT4 packs two per byte, low nibble first: the bytes of
                    approxtune's own layout) and the per-output-channel scales as FLOAT: ``DequantizeLinear`` with
                    ``axis = 0`` (per-axis scales need opset 13, INT4 opset 21; this writes opset :data:`OPSET`)
fp16 / bf16         a FLOAT16 / BFLOAT16 initializer (bf16: approxtune's bit patterns as they are): ``Cast`` to FLOAT
fp32                the FLOAT initializer (pruned weights: zeros included)
pruned, sparse      where :func:`~approxtune.approximation.compress_layer` chose the sparse encoding (mask bits plus the
                    kept values is strictly smaller than dense): the ``np.packbits`` mask as UINT8 and only the kept
                    values as above; ``BitShift``/``BitwiseAnd`` unpack the mask, ``CumSum`` numbers the kept
                    positions, ``Gather`` + ``Where`` scatter the values back (zeros elsewhere) -- int4 codes cast to
                    INT8 first, then the dense codes go through ``DequantizeLinear`` like a dense layer's; a layer
                    with nothing kept is ``ConstantOfShape`` zeros
==================  =================================================================================================

Every decode is exact: an integer code times its fp32 scale, or a 16-bit float widened to fp32, which is what
:func:`~approxtune.approximation.decompress_layer` computes, so the file holds exactly f^p's weights (tests check it in
ONNX Runtime).  ONNX's own sparse initializers need INT64 indices, 8 bytes per kept value, which is larger than dense
storage below 67 % sparsity for fp32 (and always for int8), so they are not used.  Every other tensor is float32.

So ``model.onnx`` is ``size_bytes`` (the payload) plus the graph: a fixed part, a few hundred bytes per layer and a
float32 zero bias per bias-free convolution, which the exporter adds (``benchmarks/deploy_results.md`` measures it).
Node metadata (the exporter's stack traces, with local paths) is stripped.

ONNX Runtime folds every decode whose inputs are all initializers when it loads the session (the mask unpacking and
the scatter of sparse layers, every ``Cast``), but by default leaves ``DequantizeLinear`` for its quantization
transforms, so int8/int4 weights are scaled at every run and stay one byte (or half) per weight in memory.  Its
kernels round differently from torch's, so f^p in ONNX Runtime is a function of its own: certify it there
(:mod:`approxtune.export.certificate`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from approxtune.approximation import Packed, packed_precision
from approxtune.export.format import ExportError, summary, weight_key

__all__ = ["INPUT", "ONNX_FILE", "OPSET", "OUTPUT", "write_onnx"]

ONNX_FILE = "model.onnx"
OPSET = 21
"""ONNX opset of ``model.onnx``: the first with INT4 ``DequantizeLinear``."""
INPUT, OUTPUT = "input", "logits"
"""Names of the graph's input (a batch of inputs, batch dimension ``batch``) and output."""

_STORED_TYPE = {
    "fp32": TensorProto.FLOAT,
    "fp16": TensorProto.FLOAT16,
    "bf16": TensorProto.BFLOAT16,
    "int8": TensorProto.INT8,
    "int4": TensorProto.INT4,
}
_FLOAT = TensorProto.FLOAT
_SHARED = {
    "approxtune/bit_shifts": np.arange(7, -1, -1, dtype=np.uint8),  # np.packbits puts the first element high
    "approxtune/one_u8": np.array(1, dtype=np.uint8),
    "approxtune/zero_i8": np.array(0, dtype=np.int8),
    "approxtune/zero_f32": np.array(0.0, dtype=np.float32),
    "approxtune/one_i64": np.array([1], dtype=np.int64),
    "approxtune/zero_i64": np.array([0], dtype=np.int64),
    "approxtune/minus_one": np.array([-1], dtype=np.int64),
    "approxtune/axis0": np.array(0, dtype=np.int64),
}
"""Constants the decoding nodes share (each written once)."""
_SHIFTS, _ONE_U8, _ZERO_I8, _ZERO_F, _ONE_I64, _ZERO_I64, _MINUS_ONE, _AXIS0 = _SHARED


def _tensor(name: str, array: np.ndarray, dims: tuple[int, ...] | None = None, dtype: int | None = None) -> Any:
    """An initializer holding ``array``'s bytes as they are (INT4/BFLOAT16: approxtune's packed bytes/bit patterns)."""
    array = np.ascontiguousarray(array)
    dims = array.shape if dims is None else dims
    if dtype is None:
        return onnx.numpy_helper.from_array(array, name)
    return helper.make_tensor(name, dtype, list(dims), array.astype(array.dtype.newbyteorder("<")).tobytes(), raw=True)


class _Decoder:
    """Collects the initializers and nodes that rebuild each compressed weight under its own tensor name."""

    def __init__(self) -> None:
        self.initializers: list[Any] = []
        self.nodes: list[Any] = []
        self.shared: set[str] = set()

    def const(self, name: str, array: np.ndarray, dims: tuple[int, ...] | None = None, dtype: int | None = None) -> str:
        self.initializers.append(_tensor(name, array, dims, dtype))
        return name

    def shared_const(self, name: str) -> str:
        if name not in self.shared:
            self.shared.add(name)
            self.const(name, _SHARED[name])
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        """Append a node; its output is ``output`` or a short fresh name (names are bytes in the file)."""
        if output is None:
            output = f"approxtune/{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def layer(self, key: str, arrays: Packed, shape: tuple[int, ...]) -> None:
        """Initializers and nodes whose output ``key`` is the layer's float32 weight, bit for bit f^p's."""
        precision = packed_precision(arrays)
        n = math.prod(shape)
        values = np.asarray(arrays["values"]).reshape(-1)
        scaled = precision in ("int8", "int4")
        if "mask" in arrays and not np.unpackbits(np.asarray(arrays["mask"]), count=n).any():  # everything pruned
            dims = self.const(f"{key}/shape", np.array(shape, dtype=np.int64))
            self.node("ConstantOfShape", [dims], key, value=_tensor("zero", np.zeros(1, np.float32)))
            return
        if precision == "fp32" and "mask" not in arrays:
            self.const(key, values.reshape(shape))
            return
        decoded = f"{key}/codes" if scaled else key  # codes still to be scaled, or the weight itself
        if "mask" in arrays:
            self.scatter(key, arrays, precision, n, shape, decoded)
        elif scaled:
            self.const(decoded, values, shape, _STORED_TYPE[precision])
        else:
            self.node("Cast", [self.const(f"{key}/values", values, shape, _STORED_TYPE[precision])], key, to=_FLOAT)
        if scaled:
            self.node("DequantizeLinear", [decoded, self.const(f"{key}/scale", arrays["scale"])], key, axis=0)

    def scatter(self, key: str, arrays: Packed, precision: str, n: int, shape: tuple[int, ...], output: str) -> None:
        """The dense tensor ``output`` (int8 codes, or float32 values) of a sparse layer: kept values at the kept
        positions, zeros elsewhere.  Every input is an initializer, so ONNX Runtime folds it all when it loads."""
        kept = int(np.unpackbits(np.asarray(arrays["mask"]), count=n).sum())
        bits = self.node("Unsqueeze", [self.const(f"{key}/mask", arrays["mask"]), self.shared_const(_ONE_I64)])
        bits = self.node("BitShift", [bits, self.shared_const(_SHIFTS)], direction="RIGHT")  # (bytes, 8)
        bits = self.node("BitwiseAnd", [bits, self.shared_const(_ONE_U8)])
        bits = self.node("Reshape", [bits, self.shared_const(_MINUS_ONE)])
        bits = self.node("Slice", [bits, self.shared_const(_ZERO_I64), self.const(f"{key}/count", np.array([n]))])
        keep = self.node("Cast", [bits], to=TensorProto.BOOL)
        position = self.node("Cast", [bits], to=TensorProto.INT64)
        position = self.node("CumSum", [position, self.shared_const(_AXIS0)])
        position = self.node("Sub", [position, self.shared_const(_ONE_I64)])  # -1 before the first kept value
        values = self.const(f"{key}/values", arrays["values"], (kept,), _STORED_TYPE[precision])
        if precision in ("int8", "int4"):
            values, zero = self.node("Cast", [values], to=TensorProto.INT8), self.shared_const(_ZERO_I8)
        else:
            values = values if precision == "fp32" else self.node("Cast", [values], to=_FLOAT)
            zero = self.shared_const(_ZERO_F)
        gathered = self.node("Gather", [values, position], axis=0)
        dense = self.node("Where", [keep, gathered, zero])
        self.node("Reshape", [dense, self.const(f"{key}/shape", np.array(shape, dtype=np.int64))], output)


def _trace(model: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """``torch.onnx.export`` of ``model`` (unoptimised, dynamic batch) on zeros of the example's shape."""
    zeros = torch.zeros_like(example)  # only the shape matters; no user data goes into the file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model,
                (zeros,),
                dynamo=True,
                optimize=False,
                opset_version=OPSET,
                input_names=[INPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
        except Exception as exc:  # the exporter reports untraceable models with many exception types
            raise ExportError(f"torch.onnx.export could not export the model ({summary(exc)})") from None
    return program.model_proto


def _strip(model: onnx.ModelProto) -> None:
    """Drop what the exporter adds for debugging (stack traces with local paths, value shapes ORT infers)."""
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in (*graph.input, *graph.output, *graph.initializer):
        del value.metadata_props[:]
    del graph.value_info[:]
    del graph.metadata_props[:]
    del model.metadata_props[:]


def write_onnx(
    model: nn.Module, packed: dict[str, Packed], example: torch.Tensor, path: Path, metadata: dict[str, str]
) -> None:
    """Write ``model.onnx`` of f^p (``model``, whose compressed layers ``packed`` stores) to ``path``.

    ``example`` is a batch of the study's inputs (only its shape is used); ``metadata`` goes into the model's
    ``metadata_props`` (e.g. the model hash).
    """
    proto = _trace(model, example)
    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    decoder = _Decoder()
    for layer, arrays in packed.items():
        key = weight_key(layer)
        if key not in initializers:
            raise ExportError(f"internal error: the ONNX exporter did not keep the weight {key!r} as an initializer")
        shape = tuple(initializers[key].dims)
        graph.initializer.remove(initializers.pop(key))
        decoder.layer(key, arrays, shape)
    graph.initializer.extend(decoder.initializers)
    nodes = [*decoder.nodes, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    produced = graph.output[0].name
    for node in graph.node:
        node.input[:] = [OUTPUT if name == produced else name for name in node.input]
        node.output[:] = [OUTPUT if name == produced else name for name in node.output]
    graph.output[0].name = OUTPUT
    _strip(proto)
    proto.producer_name, proto.producer_version = "approxtune", ""
    helper.set_model_props(proto, metadata)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"internal error: the ONNX model does not validate ({exc})") from None
    path.write_bytes(proto.SerializeToString())
