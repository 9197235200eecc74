"""The runtimes that ship f^p, and each one's deployable loaded as the function ``batch -> logits`` it computes.

==============  ==============  ==============================================================================
runtime         artifact        how it runs
==============  ==============  ==============================================================================
``onnxruntime`` ``model.onnx``  an ``onnxruntime.InferenceSession`` on the CPU execution provider, default graph
                                optimizations, ``intra_op_num_threads`` = torch's thread count
``torch``       ``model.pt2``   ``torch.export.load(path).module()`` in this torch, on the export's device
==============  ==============  ==============================================================================

Rounding differs between runtimes (and can between versions, CPU kernels and settings), so each certificate names
the runtime, its version and settings, and the machine it ran on (:meth:`Deployable.describe`).
"""

from __future__ import annotations

import importlib
import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from approxtune.export.format import ExportError, summary
from approxtune.export.onnx import INPUT, ONNX_FILE
from approxtune.export.program import PROGRAM_FILE

__all__ = ["RUNTIMES", "Deployable", "Runtime", "cpu_model", "load_deployable", "select_runtimes"]

ALL = "all"


@dataclass(frozen=True)
class Runtime:
    """A runtime that ships f^p: its name, the artifact it runs, and the package that provides it."""

    name: str
    artifact: str
    package: str
    """The pip package (and module) to import."""

    def version(self) -> str:
        """The package's ``__version__`` (with its build tag, e.g. torch's ``+cu130``)."""
        return str(importlib.import_module(self.package).__version__)

    def require(self) -> None:
        """Raise :class:`ExportError` naming the package to install if this runtime cannot be imported."""
        try:
            importlib.import_module(self.package)
        except ImportError:
            raise ExportError(
                f"runtime {self.name!r} needs the package {self.package!r}, which is not installed: "
                f"pip install {self.package} (or choose another --runtime)"
            ) from None


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime("onnxruntime", ONNX_FILE, "onnxruntime"),
    "torch": Runtime("torch", PROGRAM_FILE, "torch"),
}


def select_runtimes(choice: str, available: list[str] | None = None) -> list[Runtime]:
    """The runtimes ``choice`` names (a runtime's name, or ``"all"``), each checked to be installed.

    ``available`` limits ``"all"`` to those names and refuses any other choice (an export's certified runtimes).
    """
    names = list(RUNTIMES) if available is None else [name for name in RUNTIMES if name in available]
    if choice == ALL:
        chosen = names
    elif choice in RUNTIMES and choice in names:
        chosen = [choice]
    elif choice in RUNTIMES:
        raise ExportError(f"the export holds no certificate for runtime {choice!r}; it holds: {', '.join(names)}")
    else:
        raise ExportError(f"unknown runtime {choice!r}; choose one of {', '.join([*RUNTIMES, ALL])}")
    runtimes = [RUNTIMES[name] for name in chosen]
    for runtime in runtimes:
        runtime.require()
    return runtimes


@dataclass
class Deployable:
    """A shipped artifact loaded in its runtime: callable on a CPU batch, returning the logits as a CPU tensor.

    Not an ``nn.Module``: certification code treats it as the function it is (no ``.eval()``, no parameters).
    """

    runtime: Runtime
    path: Path
    run: Callable[[torch.Tensor], torch.Tensor]
    settings: dict[str, Any]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def describe(self) -> dict[str, Any]:
        """What a certificate records of the function it certifies: runtime, version, settings and machine."""
        return {
            "runtime": self.runtime.name,
            "runtime_version": self.runtime.version(),
            "settings": self.settings,
            "machine": {"system": platform.system(), "machine": platform.machine(), "processor": cpu_model()},
        }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform.processor()`` says, else "unknown" (kernels are
    chosen per CPU, so rounding can differ between CPUs)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _onnxruntime(path: Path, device: torch.device) -> Deployable:
    import onnxruntime as ort  # optional at import time: a receiver may verify with torch alone

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(session.run(None, {INPUT: array})[0])

    settings = {
        "providers": session.get_providers(),
        "graph_optimization_level": str(options.graph_optimization_level),
        "intra_op_num_threads": options.intra_op_num_threads,
    }
    return Deployable(RUNTIMES["onnxruntime"], path, run, settings)


def _torch(path: Path, device: torch.device) -> Deployable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.export.load(path).module().to(device)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x.to(device)).to("cpu")

    return Deployable(RUNTIMES["torch"], path, run, {"device": str(device), "threads": torch.get_num_threads()})


_LOADERS = {"onnxruntime": _onnxruntime, "torch": _torch}


def load_deployable(runtime: Runtime, directory: Path, device: torch.device | str = "cpu") -> Deployable:
    """The artifact of ``runtime`` in ``directory``, loaded in that runtime (ONNX Runtime runs on the CPU)."""
    runtime.require()
    path = Path(directory) / runtime.artifact
    try:
        return _LOADERS[runtime.name](path, torch.device(device))
    except ExportError:
        raise
    except Exception as exc:  # a runtime refuses a file it cannot read with its own exception types
        raise ExportError(f"{runtime.name} cannot load {path} ({summary(exc)})") from None
