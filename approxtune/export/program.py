"""``model.pt2``: f^p as a ``torch.export`` ExportedProgram that holds its compressed weights and decodes them itself.

Each compressed layer's weight becomes buffers of the program in their stored form — int8 codes, int4 codes two per
byte (uint8), fp16 values, bf16 values (approxtune's bit patterns viewed as ``torch.bfloat16``), the per-channel
scales, and for sparse layers the ``np.packbits`` mask and only the kept values — and the program's graph decodes
them at every call, exactly as :func:`~approxtune.approximation.decompress_layer` does (integer code times fp32
scale, 16-bit float widened to fp32, kept values scattered back by the rank of their mask bit).  The float32 weight
the layer had is replaced by an empty tensor, so the file holds ``size_bytes`` plus the serialized graph.

The program is traced with :func:`torch.func.functional_call`, which hands the decoded weights to the unchanged
module, so any module that reads ``self.weight`` exports; the batch dimension is dynamic.  ``model.pt2`` loads with
``torch.export.load(path).module()`` alone: neither approxtune nor the model's code is needed.  Node stack traces
(with local paths) are dropped before saving; the program's example input is zeros of the data's input shape.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from approxtune.approximation import Packed, packed_precision
from approxtune.export.format import ExportError, summary, weight_key

__all__ = ["PROGRAM_FILE", "CompressedModel", "write_program"]

PROGRAM_FILE = "model.pt2"

_DEBUG_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "from_node")
_STORED_DTYPE = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
    "int4": torch.uint8,
}


def _stored(values: np.ndarray, precision: str) -> torch.Tensor:
    """The stored array as a tensor of its storage dtype (bf16 bit patterns reinterpreted, not converted)."""
    tensor = torch.from_numpy(np.ascontiguousarray(values).copy())
    return tensor.view(torch.bfloat16) if precision == "bf16" else tensor.to(_STORED_DTYPE[precision])


def _unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """int4 codes (two per byte, low nibble first, two's complement) as int8 -- approximation._unpack_int4 in torch."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=1).reshape(-1)[:count]
    return (nibbles ^ 8).to(torch.int8) - 8


class _Layer(nn.Module):
    """One compressed weight in its stored form; ``forward()`` decodes it to the float32 weight."""

    def __init__(self, arrays: Packed, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.precision = packed_precision(arrays)
        self.shape, self.count = shape, math.prod(shape)
        self.sparse = "mask" in arrays
        self.kept = int(np.unpackbits(arrays["mask"], count=self.count).sum()) if self.sparse else self.count
        self.scaled = "scale" in arrays
        if not self.kept:  # everything pruned: the weight is zeros, nothing to store
            return
        self.register_buffer("values", _stored(arrays["values"], self.precision))
        if self.scaled:
            scale = np.asarray(arrays["scale"], dtype=np.float32).reshape(shape[0], *(1,) * (len(shape) - 1))
            self.register_buffer("scale", torch.from_numpy(scale.copy()))
        if self.sparse:
            self.register_buffer("mask", torch.from_numpy(np.asarray(arrays["mask"], dtype=np.uint8).copy()))
            self.register_buffer("shifts", torch.arange(7, -1, -1, dtype=torch.uint8), persistent=False)

    def forward(self) -> torch.Tensor:
        if not self.kept:
            return torch.zeros(self.shape, dtype=torch.float32)
        values = _unpack_int4(self.values, self.kept) if self.precision == "int4" else self.values
        values = values.to(torch.float32)
        if self.sparse:
            keep = ((self.mask.unsqueeze(1) >> self.shifts) & 1).reshape(-1)[: self.count].bool()
            position = (keep.to(torch.int64).cumsum(0) - 1).clamp(min=0)
            values = torch.where(keep, values[position], torch.zeros((), dtype=torch.float32))
        values = values.reshape(self.shape)
        return values * self.scale if self.scaled else values


class CompressedModel(nn.Module):
    """f^p with its compressed layers' weights held compressed (``_Layer`` buffers) and decoded at every call."""

    def __init__(self, model: nn.Module, packed: dict[str, Packed]) -> None:
        super().__init__()
        self.model = copy.deepcopy(model)
        self.keys = [weight_key(name) for name in packed]
        self.layers = nn.ModuleList()
        for name, arrays in packed.items():
            layer = self.model.get_submodule(name)
            self.layers.append(_Layer(arrays, tuple(layer.weight.shape)))
            layer.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # stored compressed instead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {key: layer() for key, layer in zip(self.keys, self.layers, strict=True)}
        return functional_call(self.model, weights, (x,))


def write_program(model: nn.Module, packed: dict[str, Packed], example: torch.Tensor, path: Path) -> None:
    """Save ``model.pt2``: the ExportedProgram of :class:`CompressedModel` (dynamic batch) to ``path``."""
    wrapper = CompressedModel(model, packed).eval()
    zeros = torch.zeros_like(example)  # only the shape matters; no user data goes into the file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(wrapper, (zeros,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        except Exception as exc:  # torch.export reports untraceable models with many exception types
            raise ExportError(f"torch.export could not trace the model ({summary(exc)})") from None
        for node in program.graph.nodes:  # debugging records only: local paths, module names
            for key in _DEBUG_META:
                node.meta.pop(key, None)
        torch.export.save(program, path)
    _deflate_metadata(path)


def _deflate_metadata(path: Path) -> None:
    """Rewrite the archive with its JSON records (the graph, tens of KB) deflated; tensors stay stored as they are.

    ``torch.export.save`` stores every record uncompressed; ``torch.export.load`` reads deflated records too (the
    tests load every precision in a fresh process), and the graph's JSON shrinks about tenfold.
    """
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp, "w") as target:
        for info in source.infolist():
            method = zipfile.ZIP_DEFLATED if info.filename.endswith(".json") else zipfile.ZIP_STORED
            target.writestr(zipfile.ZipInfo(info.filename, info.date_time), source.read(info), compress_type=method)
    os.replace(tmp, path)
