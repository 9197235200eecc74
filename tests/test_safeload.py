"""Pickle files that could run code are refused, naming what they refer to, with one line and no torch warning."""

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from approxtune.models import DigitsCNN
from approxtune.safeload import UnreadableFile, UnsafeFile, load_plain


class Evil:
    """Unpickling it would run a command: here, create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle(path: Path, obj: object, protocol: int) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def _refusal(path: Path) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnsafeFile) as refused:
            load_plain(path)
    assert not caught, f"no warning besides the refusal: {[str(w.message) for w in caught]}"
    return refused.value.blocked


def test_unsafe_files_are_refused_naming_the_global_they_refer_to(tmp_path):
    marker = tmp_path / "PWNED"
    state = DigitsCNN().state_dict()
    torch.save({"state_dict": state, "evil": Evil(marker)}, tmp_path / "zip.pt")
    torch.save({"evil": Evil(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert _refusal(tmp_path / "zip.pt") == "posix.system"
    assert _refusal(tmp_path / "legacy.pt") == "posix.system"
    # Plain pickle.dump files of protocol 4 and 5: torch stops at their FRAME opcode, before any global, and warned
    # "Detected pickle protocol 4 in the checkpoint"; the global is read from the opcodes instead.
    for protocol in (2, 4, 5):
        assert _refusal(_pickle(tmp_path / f"evil{protocol}.pkl", {"e": Evil(marker)}, protocol)) == "posix.system"
        plain = _pickle(tmp_path / f"state{protocol}.pkl", {"state_dict": state}, protocol)
        assert _refusal(plain) == "torch.storage._load_from_bytes", "a pickled tensor unpickles through torch.load"
    assert not marker.exists()


def test_plain_data_loads_and_a_broken_file_is_unreadable(tmp_path):
    state = DigitsCNN().state_dict()
    torch.save({"arch": "digits-cnn", "state_dict": state}, tmp_path / "ok.pt")
    assert torch.equal(load_plain(tmp_path / "ok.pt")["state_dict"]["fc2.bias"], state["fc2.bias"])
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:300])
    with pytest.raises(UnreadableFile):
        load_plain(tmp_path / "cut.pt")
    _pickle(tmp_path / "ints.pkl", {"a": [1, 2]}, 4)  # no global at all: not unsafe, but not torch's either
    with pytest.raises(UnreadableFile, match="Unsupported operand 149"):
        load_plain(tmp_path / "ints.pkl")


@pytest.mark.parametrize("kind", ["checkpoint", "Cohen-style checkpoint", "tensors file"])
def test_the_command_line_refuses_an_unsafe_file_in_one_line_without_a_torch_warning(tmp_path, kind):
    marker = tmp_path / "PWNED"
    state = DigitsCNN().state_dict()
    torch.save({"arch": "digits-cnn", "state_dict": state}, tmp_path / "good.pt")
    if kind == "checkpoint":  # a plain pickle of protocol 4, which torch used to warn about first
        _pickle(tmp_path / "bad.pt", {"arch": "digits-cnn", "state_dict": state, "evil": Evil(marker)}, 4)
        study = '[model]\ncheckpoint = "bad.pt"\n'
    elif kind == "Cohen-style checkpoint":
        cohen = {"arch": "cifar_resnet110", "state_dict": state, "optimizer": Evil(marker), "epoch": 90}
        _pickle(tmp_path / "checkpoint.pth.tar", cohen, 4)
        study = '[model]\narch = "cifar_resnet110"\ncheckpoint = "checkpoint.pth.tar"\n'
    else:
        _pickle(tmp_path / "bad.pt", {"x": torch.rand(30, 1, 8, 8), "y": torch.zeros(30), "e": Evil(marker)}, 4)
        study = (
            '[model]\ncheckpoint = "good.pt"\n[data]\ndataset = "tensors"\nroot = "bad.pt"\nsearch_inputs = 10\n'
            "report_inputs = 10\n"
        )
    (tmp_path / "s.toml").write_text(study)
    before = sorted(p.name for p in tmp_path.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "approxtune", "tune", "s.toml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: refusing to load "), done.stderr
    assert ": unsafe: " in done.stderr and "(it refers to torch.storage._load_from_bytes" in done.stderr
    assert "Warning" not in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not marker.exists()
