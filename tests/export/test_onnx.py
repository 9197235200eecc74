"""model.onnx: compressed initializers that ONNX Runtime decodes into exactly f^p's weights, predictions that agree
with f^p on the replayed noise samples, any batch size, and a file of about size_bytes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from _exports import CONFIGS, LAYERS, config_named
from onnx import TensorProto

from approxtune.approximation import apply_approximation, compress_model
from approxtune.export.onnx import INPUT, OPSET, OUTPUT
from approxtune.export.runtimes import RUNTIMES, load_deployable


def _session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnx_runtime_decodes_exactly_the_weights_of_f_p(exact, name):
    """Every decoded weight, made a graph output, is bit for bit the weight f^p computes with."""
    config = config_named(name)
    approx = apply_approximation(exact.base, config)
    model = onnx.load(exact.out / name / "model.onnx")
    keys = [f"{layer}.weight" for layer in config.layers]
    for key in keys:
        model.graph.output.append(onnx.helper.make_tensor_value_info(key, TensorProto.FLOAT, None))
    outputs = _session(model).run(None, {INPUT: np.zeros((1, 1, 8, 8), np.float32)})
    for key, decoded in zip(keys, outputs[1:], strict=True):
        assert np.array_equal(decoded, approx.state_dict()[key].numpy()), key


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnx_runtime_agrees_with_f_p_on_the_replayed_noise_samples(exact, name):
    deployable = load_deployable(RUNTIMES["onnxruntime"], exact.out / name)
    logits = torch.cat([deployable(x) for x in torch.split(exact.batches, exact.sizes)])
    expected = exact.logits[name]
    assert len(expected) >= 1000
    agreement = (logits.argmax(1) == expected.argmax(1)).float().mean().item()
    assert agreement >= 0.99, f"ONNX Runtime predicts f^p's class on {agreement:.2%} of the samples"
    assert (logits - expected).abs().max() < 1e-3 * (1 + expected.abs().max()), "the same function, up to rounding"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_onnx_file_is_the_reported_size_plus_a_small_graph(exact, name):
    size = exact.results[name].size_bytes
    onnx_bytes = (exact.out / name / "model.onnx").stat().st_size
    assert onnx_bytes == exact.results[name].deployable_bytes["model.onnx"]
    assert size <= onnx_bytes <= 1.1 * size + 8192, f"{onnx_bytes} bytes for a {size}-byte model"


def test_compressed_layers_are_stored_compressed_in_the_file(exact):
    for name, stored_type in (("int8", TensorProto.INT8), ("int4", TensorProto.INT4), ("bf16", TensorProto.BFLOAT16)):
        model = onnx.load(exact.out / name / "model.onnx")
        assert model.opset_import[0].version == OPSET == 21
        types = {t.name: t.data_type for t in model.graph.initializer}
        stored = "codes" if "int" in name else "values"
        assert all(types[f"{layer}.weight/{stored}"] == stored_type for layer in LAYERS)
        assert "conv1.weight" not in types and types["conv1.bias"] == TensorProto.FLOAT
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("DequantizeLinear" if "int" in name else "Cast") == 4
    # sparse layers store only their kept values (int4: two per byte) and the mask
    model = onnx.load(exact.out / "sparse" / "model.onnx")
    packed = compress_model(exact.base, config_named("sparse"))
    initializers = {t.name: t for t in model.graph.initializer}
    for layer, arrays in packed.items():
        if "mask" in arrays:
            assert initializers[f"{layer}.weight/values"].raw_data == arrays["values"].tobytes()
            assert initializers[f"{layer}.weight/mask"].raw_data == arrays["mask"].tobytes()


def test_any_batch_size_runs_and_no_local_paths_are_in_the_file(exact):
    path = exact.out / "int4" / "model.onnx"
    model = onnx.load(path)
    assert model.graph.input[0].name == INPUT and model.graph.output[0].name == OUTPUT
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param, "a symbolic batch dimension"
    session = _session(model)
    for batch in (1, 37):
        assert session.run(None, {INPUT: np.zeros((batch, 1, 8, 8), np.float32)})[0].shape == (batch, 10)
    data = path.read_bytes()
    assert b"stack_trace" not in data and str(exact.root).encode() not in data and b"approxtune/models.py" not in data
