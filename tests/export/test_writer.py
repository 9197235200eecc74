"""export_model: checks before writing, no temporary files left, only the chosen runtimes' deployables, a ResNet with
BatchNorm, and deployables of a model that approxtune does not know (only the directory's own format needs that)."""

import numpy as np
import pytest
import torch
from torch import nn

import approxtune
from approxtune import export
from approxtune.approximation import (
    ApproximationConfig,
    LayerChoice,
    apply_approximation,
    compress_model,
    compressible_layers,
    model_size_bytes,
)
from approxtune.cache import model_fingerprint
from approxtune.export.onnx import write_onnx
from approxtune.export.program import write_program
from approxtune.export.runtimes import RUNTIMES, load_deployable
from approxtune.models import build_model

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")


def _config(model):
    return ApproximationConfig(
        {
            layer: LayerChoice(PRECISIONS[i % 5], (0.0, 0.6, 0.1)[i % 3])
            for i, layer in enumerate(compressible_layers(model))
        }
    )


def test_export_model_refuses_bad_input_before_writing_and_leaves_no_temporary_files(exact, tmp_path):
    config = ApproximationConfig(dict.fromkeys(("conv1", "conv2", "fc1", "fc2"), LayerChoice("int8")))
    x = torch.zeros(2, 1, 8, 8)
    (tmp_path / "taken").mkdir()
    with pytest.raises(export.OutputExistsError, match="already exists; pass --force"):
        export.export_model(exact.base, config, tmp_path / "taken", architecture="digits-cnn", example_input=x)
    with pytest.raises(export.ExportError, match="example_input must be a non-empty batch"):
        export.export_model(
            exact.base, config, tmp_path / "new", architecture="digits-cnn", example_input=torch.zeros(0)
        )
    with pytest.raises(export.ExportError, match="unknown runtime 'tvm'"):
        export.export_model(
            exact.base, config, tmp_path / "new", architecture="digits-cnn", example_input=x, runtime="tvm"
        )
    with pytest.raises(export.ExportError, match="unknown architecture 'lenet'"):
        export.export_model(exact.base, config, tmp_path / "new", architecture="lenet", example_input=x)

    def broken(result):
        assert result.path.name.startswith(".new.tmp-") and (result.path / "model.onnx").is_file()
        raise RuntimeError("certification failed")

    with pytest.raises(RuntimeError, match="certification failed"):
        export.export_model(
            exact.base, config, tmp_path / "new", architecture="digits-cnn", example_input=x, certify=broken
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"], "a failed export leaves nothing behind"


def test_only_the_chosen_runtimes_deployable_is_written(exact, tmp_path):
    config = ApproximationConfig(dict.fromkeys(("conv1", "conv2", "fc1", "fc2"), LayerChoice("int4")))
    x = torch.zeros(1, 1, 8, 8)
    result = export.export_model(
        exact.base, config, tmp_path / "o", architecture="digits-cnn", example_input=x, runtime="onnxruntime"
    )
    assert {p.name for p in result.path.iterdir()} == {"weights.bin", "index.json", "config.json", "model.onnx"}
    assert [r.name for r in result.runtimes] == ["onnxruntime"] and list(result.deployable_bytes) == ["model.onnx"]
    assert result.config["input_shape"] == [1, 8, 8]


def test_a_cifar_resnet_with_batchnorm_exports_reloads_bit_for_bit_and_deploys(tmp_path):
    torch.manual_seed(0)
    base = build_model("cifar_resnet20").eval()
    for module in base.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(7)
    config = _config(base)
    x = torch.rand(6, 3, 32, 32)
    result = export.export_model(base, config, tmp_path / "resnet", architecture="cifar_resnet20", example_input=x)
    assert result.payload_bytes == model_size_bytes(base, config)
    loaded = approxtune.load_model(tmp_path / "resnet")
    assert model_fingerprint(loaded) == model_fingerprint(apply_approximation(base, config))
    assert int(loaded.get_submodule("1.bn1").num_batches_tracked) == 7
    with torch.inference_mode():
        want = loaded(x)
    for runtime in RUNTIMES.values():
        got = load_deployable(runtime, tmp_path / "resnet")(x)
        assert torch.equal(got.argmax(1), want.argmax(1)) and (got - want).abs().max() < 1e-3 * (1 + want.abs().max())
    for name, nbytes in result.deployable_bytes.items():
        assert result.size_bytes < nbytes < 1.1 * result.size_bytes + 96 * 1024, name


class UserNet(nn.Module):
    """A model approxtune does not know: grouped and strided convolutions, a Conv1d-free MLP head, BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(12, 12, 3, groups=3, bias=False)
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(12 * 4 * 4, 40), nn.BatchNorm1d(40), nn.Tanh(), nn.Linear(40, 7)
        )

    def forward(self, x):
        return self.head(self.features(x))


def test_the_deployables_of_a_model_approxtune_does_not_know_compute_its_compressed_function(tmp_path):
    torch.manual_seed(1)
    model = UserNet().eval()
    model.head[2].running_mean.uniform_(-0.2, 0.2)
    config = _config(model)
    packed = compress_model(model, config)
    approx = apply_approximation(model, config, packed).eval()
    x = torch.rand(64, 3, 12, 12)
    write_onnx(approx, packed, x[:2], tmp_path / "model.onnx", {})
    write_program(approx, packed, x[:2], tmp_path / "model.pt2")
    with torch.inference_mode():
        want = approx(x)
    for runtime in RUNTIMES.values():
        got = load_deployable(runtime, tmp_path)(x)
        assert got.shape == (64, 7)
        assert np.mean((got.argmax(1) == want.argmax(1)).numpy()) >= 0.98
        assert (got - want).abs().max() < 1e-3 * (1 + want.abs().max()), runtime.name
