"""Choosing runtimes (unknown names, missing packages) and loading a deployable as the plain function it computes."""

import sys

import pytest
import torch

from approxtune.export import ExportError
from approxtune.export.runtimes import RUNTIMES, Deployable, load_deployable, select_runtimes


def test_runtimes_are_chosen_by_name_or_all():
    assert [r.name for r in select_runtimes("all")] == ["onnxruntime", "torch"]
    assert [r.artifact for r in select_runtimes("all")] == ["model.onnx", "model.pt2"]
    assert [r.name for r in select_runtimes("torch")] == ["torch"]
    assert [r.name for r in select_runtimes("all", available=["torch"])] == ["torch"]
    with pytest.raises(ExportError, match=r"unknown runtime 'tflite'; choose one of onnxruntime, torch, all"):
        select_runtimes("tflite")
    with pytest.raises(ExportError, match=r"holds no certificate for runtime 'onnxruntime'; it holds: torch"):
        select_runtimes("onnxruntime", available=["torch"])


def test_a_missing_runtime_package_is_named_with_the_command_that_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    for choice in ("all", "onnxruntime"):
        with pytest.raises(ExportError, match=r"needs the package 'onnxruntime'.*pip install onnxruntime"):
            select_runtimes(choice)
    assert [r.name for r in select_runtimes("torch")] == ["torch"]


def test_a_deployable_is_a_function_of_its_runtime_not_a_module(exact):
    for runtime in RUNTIMES.values():
        deployable = load_deployable(runtime, exact.out / "int8")
        assert isinstance(deployable, Deployable) and not isinstance(deployable, torch.nn.Module)
        assert deployable(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
        described = deployable.describe()
        assert described["runtime"] == runtime.name and described["runtime_version"] == runtime.version()
        assert set(described["machine"]) == {"system", "machine", "processor"} and described["settings"]
    onnx = load_deployable(RUNTIMES["onnxruntime"], exact.out / "int8").describe()["settings"]
    assert onnx["providers"] == ["CPUExecutionProvider"] and onnx["intra_op_num_threads"] == torch.get_num_threads()


def test_a_file_the_runtime_cannot_read_is_refused_with_its_reason(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match=r"onnxruntime cannot load .*model\.onnx"):
        load_deployable(RUNTIMES["onnxruntime"], tmp_path)
