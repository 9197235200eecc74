"""Base models: the built-in architectures, a user's own (a factory or a torchvision name), and their checkpoints.

A model maps a float batch ``(N, *shape)`` to logits ``(N, classes)``.  Noise is added to the input the model
receives, so any normalisation belongs inside the model (a layer in front), as in Cohen et al. (2019): certified radii
are then in the units of the data (pixels for images).

How a model is built is recorded as an *architecture spec*, a small JSON-able dict that an export keeps so that
:func:`build_architecture` can rebuild it later:

* ``{"kind": "builtin", "arch": NAME}``: one of :data:`ARCHITECTURES`;
* ``{"kind": "factory", "factory": "package.module:callable", "kwargs": {...}, "folder": DIR}``: the user's code,
  imported from ``folder`` (the study file's) or ``sys.path``;
* ``{"kind": "torchvision", "name": NAME, "num_classes": C, "mean": [...], "std": [...]}``: a torchvision
  classification architecture (random weights, never downloaded), behind a :class:`NormalizeLayer` if mean/std given;
* ``{"kind": "module", "class": "package.module:Class"}``: a model object passed to the Python API, rebuilt by
  calling its class without arguments.

The built-in architectures are:

* ``digits-cnn``: a small CNN for scikit-learn's 8x8 digits, trained by approxtune (no normalisation layer);
* ``cifar_resnet20``, ``cifar_resnet110``: Cohen et al.'s CIFAR-10 ResNets (depth 6n+2), ``Sequential(normalise, net)``;
* ``resnet50``: torchvision's ImageNet ResNet-50, ``Sequential(normalise, net)``.

The last three have exactly the parameter names of Cohen et al.'s released checkpoints (``1.conv1.weight``,
``1.layer1.0.conv1.weight``, ...), so those checkpoints load with :func:`load_checkpoint` as they are.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from approxtune.config import ARCHITECTURES as ARCHITECTURE_NAMES
from approxtune.errors import ApproxtuneError
from approxtune.locking import temporary_name
from approxtune.safeload import UnreadableFile, UnsafeFile, load_plain
from approxtune.usercode import UserCodeError, import_callable

__all__ = [
    "ARCHITECTURES",
    "CIFAR10_MEAN",
    "CIFAR10_SD",
    "IMAGENET_MEAN",
    "IMAGENET_SD",
    "BasicBlock",
    "CheckpointError",
    "CifarResNet",
    "DigitsCNN",
    "ModelError",
    "NormalizeLayer",
    "build_architecture",
    "build_model",
    "cifar_resnet20",
    "cifar_resnet110",
    "imagenet_resnet50",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "torchvision_names",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_SD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_SD = (0.229, 0.224, 0.225)


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits (38,282 parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class NormalizeLayer(nn.Module):
    """Standardise each channel, ``(x - mean) / sd``, as the first layer of a model.

    Being inside the model, it lets Gaussian noise be added in pixel space, so certified radii are in pixel units.
    ``mean`` and ``sd`` are non-persistent buffers: they follow ``.to(device)`` but stay out of the state dict, which
    therefore matches Cohen et al.'s checkpoints (whose normalisation layer has no parameters or buffers).
    """

    def __init__(self, mean: Sequence[float], sd: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(sd) or min(sd) <= 0:
            raise ValueError(f"need one positive sd per channel mean; got mean {tuple(mean)}, sd {tuple(sd)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("sd", torch.tensor(sd, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.sd

    def extra_repr(self) -> str:
        return f"mean={tuple(self.mean.flatten().tolist())}, sd={tuple(self.sd.flatten().tolist())}"


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity shortcut, or a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of Cohen et al.'s code (from bearpaw/pytorch-classification), with BasicBlocks.

    Depth ``6n + 2``: a 3x3 stem with 16 channels, three stages of ``n`` blocks with 16, 32 and 64 channels (stages 2
    and 3 halve the resolution), 8x8 average pooling and a 64 -> ``num_classes`` linear layer; convolutions have no
    bias.  Initialisation follows the original (He normal with fan-out for convolutions, BN weight 1 and bias 0).
    """

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet with BasicBlocks has depth 6n+2 (20, 32, 44, 56, 110, ...), not {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, blocks, stride=1)
        self.layer2 = self._stage(16, 32, blocks, stride=2)
        self.layer3 = self._stage(32, 64, blocks, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        first = BasicBlock(in_channels, channels, stride)
        return nn.Sequential(first, *(BasicBlock(channels, channels) for _ in range(blocks - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def cifar_resnet20() -> nn.Sequential:
    """Cohen et al.'s ``cifar_resnet20`` (272,474 parameters) behind CIFAR-10 normalisation; input (N, 3, 32, 32)."""
    return nn.Sequential(NormalizeLayer(CIFAR10_MEAN, CIFAR10_SD), CifarResNet(20))


def cifar_resnet110() -> nn.Sequential:
    """Cohen et al.'s ``cifar_resnet110`` behind CIFAR-10 normalisation; input (N, 3, 32, 32)."""
    return nn.Sequential(NormalizeLayer(CIFAR10_MEAN, CIFAR10_SD), CifarResNet(110))


def imagenet_resnet50() -> nn.Sequential:
    """torchvision's ResNet-50 (1000 classes, random weights) behind ImageNet normalisation; input (N, 3, 224, 224)."""
    from torchvision.models import resnet50

    return nn.Sequential(NormalizeLayer(IMAGENET_MEAN, IMAGENET_SD), resnet50(weights=None))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = dict(
    zip(ARCHITECTURE_NAMES, (DigitsCNN, cifar_resnet20, cifar_resnet110, imagenet_resnet50), strict=True)
)
"""The built-in architectures, by the names a study file uses (:data:`approxtune.config.ARCHITECTURES`)."""


def build_model(arch: str) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (one of :data:`ARCHITECTURES`)."""
    try:
        return ARCHITECTURES[arch]()
    except KeyError:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}") from None


class ModelError(ApproxtuneError):
    """A model that cannot be built as its spec says, or that does not fit the study's data."""


class CheckpointError(ModelError):
    """A checkpoint that cannot be loaded safely or does not fit its architecture."""


def torchvision_names() -> list[str]:
    """The classification architectures of ``torchvision.models`` (``resnet18``, ``vit_b_16``, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_model(name: str, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    from torchvision.models import get_model

    names = torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ModelError(
            f"model.torchvision = {name!r} is not a torchvision classification architecture; {hint}"
            f"choose one of {', '.join(names[:12])}, ... ({len(names)} in all)"
        )
    net = get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}))
    return nn.Sequential(NormalizeLayer(mean, std), net) if mean else net


def build_architecture(spec: Mapping[str, Any], folders: Sequence[Path] = ()) -> nn.Module:
    """A freshly built model of the architecture ``spec`` describes (module docstring), on the CPU.

    ``folders`` are searched for a factory's module before the spec's own folder and ``sys.path``.  Raises
    :class:`ModelError` naming what could not be built and how to fix it.
    """
    try:
        return _build(spec, folders)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"malformed architecture spec {dict(spec)!r} ({type(exc).__name__}: {exc})") from None


def _build(spec: Mapping[str, Any], folders: Sequence[Path]) -> nn.Module:
    kind = spec.get("kind")
    if kind == "builtin":
        return build_model(str(spec.get("arch")))
    if kind == "torchvision":
        return _torchvision_model(str(spec["name"]), int(spec.get("num_classes") or 0), spec["mean"], spec["std"])
    if kind == "factory":
        folder = [Path(spec["folder"])] if spec.get("folder") else []
        factory = import_callable(str(spec["factory"]), "model.factory", [*folders, *folder])
        what = f"model.factory = {spec['factory']!r}"
        kwargs = dict(spec.get("kwargs") or {})
    elif kind == "module":
        try:
            factory = import_callable(str(spec["class"]), "the model's class", folders)
        except UserCodeError as exc:
            raise ModelError(f"{exc}; pass the architecture instead: load_model(DIR, model=YourNet(...))") from None
        what, kwargs = f"the model's class {spec['class']}", {}
    else:
        raise ModelError(f"unknown architecture kind {kind!r} (builtin, factory, torchvision or module)")
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code raised
        fix = " pass the architecture: load_model(DIR, model=YourNet(...))" if kind == "module" else ""
        raise ModelError(f"{what} raised {type(exc).__name__}: {exc};{fix}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{what} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


_WRAPPER_PREFIX = "module"  # what torch.nn.DataParallel / DistributedDataParallel insert into parameter names
_OPTIONAL_BUFFERS = ("num_batches_tracked",)  # BatchNorm counters, unused at inference; absent from old checkpoints
_SHOWN_KEYS = 10  # how many mismatching names an error message lists


def _read(path: Path) -> object:
    """``torch.load`` restricted to plain data (tensors, numbers, strings, containers), on the CPU."""
    try:
        return load_plain(path)
    except UnsafeFile as exc:
        raise CheckpointError(
            f"refusing to load {path}: unsafe: it is not a plain-data checkpoint, and unpickling it could run code (it "
            f"refers to {exc.blocked}, which torch.load(weights_only=True) does not allow). If you trust the file, "
            f're-save it as torch.save({{"arch": ARCH, "state_dict": model.state_dict()}}, PATH)'
        ) from None
    except UnreadableFile as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({exc.reason})") from None


def _split(obj: object, path: Path) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """The state dict and the architecture name (if any) of a Cohen-style checkpoint or a plain state dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a dict with 'state_dict'")
    state = obj.get("state_dict", obj)
    file_arch = obj.get("arch")
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path} holds no state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} holds no state dict: entries {bad[:_SHOWN_KEYS]} are not named tensors")
    if file_arch is not None and not isinstance(file_arch, str):
        raise CheckpointError(f"{path} has a non-string 'arch' entry {file_arch!r}")
    return state, file_arch


def _rename(key: str, expected: set[str]) -> str:
    """``key`` in the model's naming: DataParallel's ``module.`` components dropped, a bare network's keys prefixed.

    Handles ``module.1.conv1.weight`` and ``1.module.conv1.weight`` (Cohen's ImageNet checkpoints) as well as the
    keys of the network without the normalisation layer (``conv1.weight``, e.g. torchvision's own ResNet-50 weights).
    """
    if key in expected:
        return key
    stripped = ".".join(part for part in key.split(".") if part != _WRAPPER_PREFIX)
    for candidate in (stripped, f"1.{stripped}"):
        if candidate in expected:
            return candidate
    return stripped


def _describe(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN_KEYS])
    return f"{len(names)} ({shown}{', ...' if len(names) > _SHOWN_KEYS else ''})"


def _fit(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, path: Path) -> None:
    """Load ``state`` into ``model``, or raise naming the missing, unexpected and mis-shaped entries."""
    own = model.state_dict()
    expected = set(own)
    renamed = {_rename(k, expected): v for k, v in state.items()}
    if len(renamed) != len(state):
        raise CheckpointError(f"{path} names some tensors twice (with and without a 'module.' prefix)")
    missing = [k for k in own if k not in renamed and not k.endswith(_OPTIONAL_BUFFERS)]
    unexpected = [k for k in renamed if k not in own]
    misshaped = [
        f"{k} {tuple(v.shape)} instead of {tuple(own[k].shape)}"
        for k, v in renamed.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or misshaped:
        problems = [
            *([f"missing keys: {_describe(missing)}"] if missing else []),
            *([f"unexpected keys: {_describe(unexpected)}"] if unexpected else []),
            *([f"wrong shapes: {_describe(misshaped)}"] if misshaped else []),
        ]
        raise CheckpointError(f"{path} does not fit architecture {arch!r}: " + "; ".join(problems))
    model.load_state_dict(renamed, strict=False)


def load_checkpoint(path: str | Path, arch: str | None = None) -> nn.Module:
    """Load a model from ``path`` on the CPU in eval mode, never running code from the file (``weights_only=True``).

    Accepts Cohen et al.'s format ``{"epoch", "arch", "state_dict", "optimizer"}`` (``approxtune train`` writes
    ``{"arch", "state_dict"}``) and plain state dicts; ``arch`` is required for the latter and must agree with the
    file's when both are given.  ``module.`` components that ``DataParallel`` put into the names (``module.1.conv1``,
    ``1.module.conv1``) are dropped; BatchNorm ``num_batches_tracked`` counters may be absent.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; train one with `approxtune train STUDY.toml`, or put a checkpoint "
            f"file there (Cohen et al.'s checkpoint.pth.tar files, e.g. models/cifar10/resnet110/noise_0.25/"
            f"checkpoint.pth.tar from their release, load as they are)"
        )
    state, file_arch = _split(_read(path), path)
    arch = arch or file_arch
    if arch is None:
        raise CheckpointError(f"{path} does not name its architecture; set model.arch in the study file")
    if file_arch is not None and file_arch != arch:
        raise CheckpointError(f"{path} holds a {file_arch!r} model, but the study asks for {arch!r}")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path} needs architecture {arch!r}, which approxtune does not know; "
            f"choose one of {', '.join(sorted(ARCHITECTURES))}"
        )
    model = build_model(arch)
    _fit(model, state, arch, path)
    return model.eval()


def load_weights(model: nn.Module, path: str | Path, name: str) -> nn.Module:
    """Load the checkpoint at ``path`` (a plain or Cohen-style state dict, ``weights_only``) into ``model``.

    ``name`` names the architecture in messages.  A file whose tensors do not fit raises :class:`CheckpointError`
    naming the missing, unexpected and mis-shaped keys.  Returns ``model`` in eval mode.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; set model.checkpoint to the file of your weights")
    state, _ = _split(_read(path), path)
    _fit(model, state, name, path)
    return model.eval()


def save_checkpoint(model: nn.Module, arch: str, path: str | Path) -> None:
    """Write ``{"arch", "state_dict"}`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)  # a name of this process's own: processes that train at once never share one
    torch.save({"arch": arch, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
