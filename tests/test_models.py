"""Built-in architectures and checkpoint loading.

Cohen et al.'s checkpoints are ``torch.save({"epoch", "arch", "state_dict", "optimizer"})`` of
``Sequential(NormalizeLayer, net)``, with ``net`` wrapped in ``DataParallel`` for ImageNet; the fakes below are built
the same way (random weights, a real SGD step) so that loading them exercises the real key layout.  Malicious
checkpoints are pickles whose ``__reduce__`` calls ``os.system``; loading must refuse them before any code runs.
"""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

from approxtune.models import (
    ARCHITECTURES,
    CIFAR10_MEAN,
    CIFAR10_SD,
    CheckpointError,
    DigitsCNN,
    ModelError,
    NormalizeLayer,
    build_architecture,
    build_model,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _trained_one_step(model: nn.Module, shape: tuple[int, ...]) -> torch.optim.Optimizer:
    """One SGD step as in Cohen's train.py (momentum, weight decay), so weights, BN statistics and optimiser state
    are all non-trivial."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.rand(shape)), torch.randint(0, 10, (shape[0],)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.eval()
    return opt


def _cohen_checkpoint(path: Path, model: nn.Module, arch: str, opt: torch.optim.Optimizer) -> None:
    torch.save({"epoch": 90, "arch": arch, "state_dict": model.state_dict(), "optimizer": opt.state_dict()}, path)


class _RunsShell:
    """Unpickling this runs a shell command (creates ``marker``): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


# --- architectures ---------------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert {"digits-cnn", "cifar_resnet20", "cifar_resnet110", "resnet50"} <= set(ARCHITECTURES)
    with pytest.raises(ValueError, match="unknown architecture 'resnet18'; choose one of"):
        build_model("resnet18")


def test_digits_cnn_unchanged() -> None:
    model = build_model("digits-cnn")
    assert isinstance(model, DigitsCNN) and _params(model) == 38_282
    assert not any(isinstance(m, NormalizeLayer) for m in model.modules())


def test_cifar_resnet_sizes_match_cohen() -> None:
    assert _params(build_model("cifar_resnet20")) == 272_474
    assert _params(build_model("cifar_resnet110")) == 1_730_714


def test_cifar_resnet20_layout_matches_cohen_keys() -> None:
    model = build_model("cifar_resnet20")
    assert isinstance(model, nn.Sequential) and isinstance(model[0], NormalizeLayer)
    keys = list(model.state_dict())
    assert keys[:6] == [
        "1.conv1.weight",
        "1.bn1.weight",
        "1.bn1.bias",
        "1.bn1.running_mean",
        "1.bn1.running_var",
        "1.bn1.num_batches_tracked",
    ]
    assert "1.layer1.0.conv1.weight" in keys and "1.layer3.2.bn2.running_var" in keys and "1.fc.bias" in keys
    downsampled = sorted({k.split(".downsample")[0] for k in keys if ".downsample." in k})
    assert downsampled == ["1.layer2.0", "1.layer3.0"]  # 1x1 conv + BN only where the shape changes
    assert model.state_dict()["1.layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert not any(k.startswith("0.") for k in keys)  # the normalisation layer stores nothing
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 + 2 and all(c.bias is None for c in convs)
    assert model[1].fc.in_features == 64 and model[1].fc.out_features == 10
    assert len([k for k in build_model("cifar_resnet110").state_dict() if k.endswith("conv2.weight")]) == 54


def test_cifar_resnet_forward_and_normalisation() -> None:
    model = build_model("cifar_resnet20").eval()
    x = torch.rand(3, 3, 32, 32)
    mean, sd = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_SD).view(1, 3, 1, 1)
    torch.testing.assert_close(model[0](x), (x - mean) / sd)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[1]((x - mean) / sd))
    assert model(x).shape == (3, 10)


def test_normalize_layer_follows_dtype_and_stays_out_of_state_dict() -> None:
    layer = NormalizeLayer((0.5,), (0.25,)).double()
    assert layer.state_dict() == {} and layer.mean.dtype == torch.float64
    assert layer(torch.ones(1, 1, 2, 2, dtype=torch.float64)).eq(2).all()
    with pytest.raises(ValueError, match="positive sd"):
        NormalizeLayer((0.5, 0.5), (0.25,))


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    return build_model("resnet50").eval()


def test_resnet50_is_torchvision_behind_imagenet_normalisation(resnet50: nn.Module) -> None:
    from torchvision.models import ResNet

    assert isinstance(resnet50[0], NormalizeLayer) and isinstance(resnet50[1], ResNet)
    assert _params(resnet50) == 25_557_032
    assert next(iter(resnet50.state_dict())) == "1.conv1.weight" and "1.layer4.2.bn3.weight" in resnet50.state_dict()
    torch.testing.assert_close(resnet50[0].sd.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    with torch.no_grad():
        assert resnet50(torch.rand(1, 3, 64, 64)).shape == (1, 1000)


# --- checkpoints -----------------------------------------------------------------------------------------------


def test_cohen_checkpoint_loads_with_identical_outputs(tmp_path: Path) -> None:
    model = build_model("cifar_resnet20")
    opt = _trained_one_step(model, (8, 3, 32, 32))
    path = tmp_path / "checkpoint.pth.tar"
    _cohen_checkpoint(path, model, "cifar_resnet20", opt)
    loaded = load_checkpoint(path)
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert load_checkpoint(path, "cifar_resnet20") is not None  # agreeing arch is fine


def test_data_parallel_imagenet_checkpoint_loads(tmp_path: Path, resnet50: nn.Module) -> None:
    """Cohen's ImageNet models are ``Sequential(NormalizeLayer, DataParallel(resnet50))``: keys ``1.module.conv1``."""
    wrapped = nn.Sequential(resnet50[0], nn.DataParallel(resnet50[1]))
    state = wrapped.state_dict()
    assert "1.module.conv1.weight" in state
    path = tmp_path / "imagenet.pth.tar"
    torch.save(
        {"epoch": 90, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path
    )
    loaded = load_checkpoint(path)
    x = torch.rand(1, 3, 64, 64)  # any size works (adaptive pooling); small keeps the test fast
    with torch.no_grad():
        assert torch.equal(loaded(x), resnet50(x))


@pytest.mark.parametrize("rename", [lambda k: f"module.{k}", lambda k: k.replace("1.", "1.module.", 1)])
def test_module_prefixes_are_stripped(tmp_path: Path, rename) -> None:
    model = build_model("cifar_resnet20").eval()
    path = tmp_path / "plain.pt"
    torch.save({rename(k): v for k, v in model.state_dict().items()}, path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path, "cifar_resnet20")(x), model(x))


def test_bare_network_keys_and_missing_bn_counters_are_accepted(tmp_path: Path) -> None:
    model = build_model("cifar_resnet20").eval()
    bare = {k: v for k, v in model[1].state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "bare.pt"
    torch.save(bare, path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path, "cifar_resnet20")(x), model(x))


def test_plain_state_dict_needs_an_arch(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(DigitsCNN().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not name its architecture; set model\.arch in the study file"):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, "digits-cnn"), DigitsCNN)


def test_arch_disagreement_and_unknown_arch(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(build_model("cifar_resnet20"), "cifar_resnet20", path)
    with pytest.raises(
        CheckpointError, match="holds a 'cifar_resnet20' model, but the study asks for 'cifar_resnet110'"
    ):
        load_checkpoint(path, "cifar_resnet110")
    torch.save({"arch": "wide_resnet", "state_dict": build_model("cifar_resnet20").state_dict()}, path)
    with pytest.raises(CheckpointError, match="needs architecture 'wide_resnet', which approxtune does not know"):
        load_checkpoint(path)


def test_state_dict_that_does_not_fit_names_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"arch": "cifar_resnet110", "state_dict": build_model("cifar_resnet20").state_dict()}, path)
    with pytest.raises(
        CheckpointError, match=r"does not fit architecture 'cifar_resnet110': missing keys: 450 \("
    ) as e:
        load_checkpoint(path)
    assert "1.layer1.3.conv1.weight" in str(e.value) and "unexpected" not in str(e.value)
    state = build_model("cifar_resnet20").state_dict()
    state["1.fc.weight"], state["1.fc.bias"] = torch.zeros(100, 64), torch.zeros(100)
    state["1.extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(
        CheckpointError, match=r"unexpected keys: 1 \(1\.extra\.weight\); wrong shapes: 2 \(1\.fc\.weight"
    ):
        load_checkpoint(path, "cifar_resnet20")


def test_missing_checkpoint_says_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"does not exist; train one with `approxtune train STUDY.toml`, or put"):
        load_checkpoint(tmp_path / "nope.pth.tar")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a readable PyTorch checkpoint"):
        load_checkpoint(path, "digits-cnn")
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match=r"is not a readable PyTorch checkpoint \(Unsupported operand"):
        load_checkpoint(path, "digits-cnn")
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_checkpoint(path, "digits-cnn")


def test_unpickle_of_the_payload_really_runs_code(tmp_path: Path) -> None:
    """Control for the next test: the crafted pickle does run a command when unpickled without restriction."""
    marker = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_RunsShell(marker)))
    assert marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"epoch": _RunsShell(marker), "arch": "cifar_resnet20", "state_dict": {"1.conv1.weight": torch.zeros(1)}}
    path = tmp_path / "checkpoint.pth.tar"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(
        CheckpointError,
        match=r"refusing to load .*not a plain-data checkpoint, .* could run code \(it refers to posix\.system",
    ):
        load_checkpoint(path)
    assert not marker.exists()


def test_save_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_model("cifar_resnet20").eval()
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(model, "cifar_resnet20", path)
    assert not path.with_name("model.pt.tmp").exists()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path)(x), model(x))


# --- architectures a user names: a factory, a torchvision name, a model object's class -----------------------------


def test_build_architecture_of_every_kind(tmp_path):
    (tmp_path / "models_probe_factory.py").write_text(
        "from torch import nn\n\ndef make(width=3):\n    return nn.Linear(4, width)\n"
    )
    factory = build_architecture(
        {"kind": "factory", "factory": "models_probe_factory:make", "kwargs": {"width": 5}, "folder": str(tmp_path)}
    )
    assert isinstance(factory, nn.Linear) and factory.out_features == 5
    vision = build_architecture(
        {"kind": "torchvision", "name": "resnet18", "num_classes": 7, "mean": [0.5] * 3, "std": [0.2] * 3}
    )
    assert isinstance(vision[0], NormalizeLayer) and vision[1].fc.out_features == 7
    assert isinstance(build_architecture({"kind": "builtin", "arch": "digits-cnn"}), DigitsCNN)
    assert isinstance(build_architecture({"kind": "module", "class": "torch.nn:Identity"}), nn.Identity)


def test_build_architecture_says_what_cannot_be_rebuilt():
    with pytest.raises(
        ModelError, match=r"the model's class torch.nn:Linear raised TypeError: .*pass the architecture"
    ):
        build_architecture({"kind": "module", "class": "torch.nn:Linear"})
    with pytest.raises(ModelError, match=r"no module named 'gone_module_x'.*load_model\(DIR, model=YourNet"):
        build_architecture({"kind": "module", "class": "gone_module_x:Net"})
    with pytest.raises(ModelError, match="'resnet81' is not a torchvision classification architecture; did you mean"):
        build_architecture({"kind": "torchvision", "name": "resnet81", "num_classes": 0, "mean": [], "std": []})
    with pytest.raises(ModelError, match="unknown architecture kind 'keras'"):
        build_architecture({"kind": "keras"})


def test_load_weights_into_any_module(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pt")
    target = load_weights(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), tmp_path / "w.pt", "mine")
    assert all(
        torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True)
    )
    with pytest.raises(
        CheckpointError,
        match=r"does not fit architecture 'mine': wrong shapes: 3 \(0.weight \(3, 4\) instead of \(5, 4\), 0.bias",
    ):
        load_weights(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), tmp_path / "w.pt", "mine")
