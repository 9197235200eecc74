"""``approxtune verify DIR``: reproduces an export's certificates (exit 0), says what differs when they do not (exit
1), and refuses bad input -- changed or truncated files, unknown or uncertified runtimes, a missing runtime package,
other report inputs, a missing cache -- with one line and exit 2; it never writes anything."""

import json
import shutil
import sys

import pytest
from _exports import TINY, run_export, study_of, tree

from approxtune.cli import main
from approxtune.config import load_study


def _verify(root, monkeypatch, *args):
    monkeypatch.chdir(root)
    return main(["verify", *map(str, args)])


def _copy(exported, tmp_path):
    root, directory, _ = exported
    copy = tmp_path / "received"
    shutil.copytree(directory, copy)
    return root, copy


def test_verify_reproduces_every_runtime_certificate_and_writes_nothing(exported, monkeypatch, capsys):
    root, directory, _ = exported
    before = tree(root)
    capsys.readouterr()
    assert _verify(root, monkeypatch, directory) == 0
    out = " ".join(capsys.readouterr().out.split())
    cert = json.loads((directory / "certificate.json").read_text())
    for entry in cert["certificates"]:
        assert f"{entry['artifact']} in {entry['runtime']} {entry['runtime_version']}" in out
        assert f"ACR {entry['acr']:.4f}, accuracy {entry['accuracy']:.3f} on 20 report inputs: reproduced" in out
    assert out.count("reproduced") == 2
    assert _verify(root, monkeypatch, directory, "--runtime", "torch", "--study", root / "tiny.toml") == 0
    assert "model.onnx" not in capsys.readouterr().out
    assert tree(root) == before, "verify writes nothing"


def test_a_certificate_that_does_not_reproduce_exits_1_saying_what_differs(exported, tmp_path, monkeypatch, capsys):
    root, copy = _copy(exported, tmp_path)
    cert = json.loads((copy / "certificate.json").read_text())
    entry = cert["certificates"][0]
    changed = next(p for p in entry["per_input"] if p["radius"] > 0)
    changed["radius"] += 0.01
    entry["acr"] += 0.01 / len(entry["per_input"])
    (copy / "certificate.json").write_text(json.dumps(cert))
    capsys.readouterr()
    assert _verify(root, monkeypatch, copy) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert f"{entry['artifact']} in {entry['runtime']}" in out and "NOT reproduced" in out
    assert f"1 of 20 inputs differ (input {changed['index']}: class {changed['predicted']} radius" in out
    assert "acr " in out and "reproduced" in out.split("NOT reproduced")[1], "the other runtime still reproduces"


@pytest.mark.parametrize("damage", ["flip", "truncate", "swap-certificate"])
def test_changed_or_truncated_files_are_refused_with_exit_2(exported, tmp_path, monkeypatch, capsys, damage):
    root, copy = _copy(exported, tmp_path)
    if damage == "flip":
        data = bytearray((copy / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0x10
        (copy / "model.onnx").write_bytes(bytes(data))
        message = "model.onnx does not match the size and SHA-256 recorded in config.json"
    elif damage == "truncate":
        (copy / "weights.bin").write_bytes((copy / "weights.bin").read_bytes()[:-7])
        message = "weights.bin does not match the size and SHA-256 recorded in config.json"
    else:  # a certificate.json whose artifact hash is not the file's
        cert = json.loads((copy / "certificate.json").read_text())
        cert["certificates"][1]["artifact_sha256"] = "0" * 64
        (copy / "certificate.json").write_text(json.dumps(cert))
        message = "model.pt2 is not the artifact its certificate names"
    before = tree(tmp_path)
    capsys.readouterr()
    assert _verify(root, monkeypatch, copy) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error:" in err and message in err and "Traceback" not in err
    assert tree(tmp_path) == before


def test_bad_input_exits_2_with_one_line_and_writes_nothing(exported, tmp_path, monkeypatch, capsys):
    root, directory, _ = exported
    other = tmp_path / "other.toml"
    other.write_text(TINY.replace("report_inputs = 20", "report_inputs = 19"))
    nocache = tmp_path / "nocache.toml"
    nocache.write_text(TINY.replace('output_dir = "runs/export-tiny"', f'output_dir = "{tmp_path / "empty"}"'))
    cases = [
        (["--runtime", "tflite"], "unknown runtime 'tflite'; choose one of onnxruntime, torch, all"),
        (["--study", other], "are not the ones"),
        (["--study", nocache], f"approxtune certify {nocache} --split report"),
        (["--study", tmp_path / "missing.toml"], "pass the study file whose report inputs and cache to use"),
    ]
    before = tree(root), tree(tmp_path)
    for args, message in cases:
        capsys.readouterr()
        assert _verify(root, monkeypatch, directory, *args) == 2, args
        err = " ".join(capsys.readouterr().err.split())
        assert "error:" in err and message in err and "Traceback" not in err, err
        assert len(capsys.readouterr().err.strip().splitlines()) <= 1
    assert _verify(root, monkeypatch, tmp_path / "nothing-here") == 2
    assert "no export directory" in capsys.readouterr().err
    assert (tree(root), tree(tmp_path)) == before


def test_a_missing_runtime_package_or_an_uncertified_runtime_exits_2(tuned, exported, tmp_path, monkeypatch, capsys):
    root, directory, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    capsys.readouterr()
    assert _verify(root, monkeypatch, directory) == 2
    assert "pip install onnxruntime" in " ".join(capsys.readouterr().err.split())
    assert _verify(root, monkeypatch, directory, "--runtime", "torch") == 0
    monkeypatch.delitem(sys.modules, "onnxruntime")
    prune20 = next(t for t in study_of(root).trials if t.user_attrs.get("baseline") == "prune20")
    torch_only = tmp_path / "torch-only"
    assert run_export(root, monkeypatch, "--trial", prune20.number, "--out", torch_only, "--runtime", "torch") == 0
    assert not (torch_only / "model.onnx").exists() and (torch_only / "model.pt2").is_file()
    capsys.readouterr()
    assert _verify(root, monkeypatch, torch_only, "--runtime", "onnxruntime") == 2
    assert "holds no certificate for runtime 'onnxruntime'; it holds: torch" in capsys.readouterr().err
    assert _verify(root, monkeypatch, torch_only) == 0


def test_verify_uses_the_recorded_settings_not_the_study_files_current_ones(exported, tmp_path, monkeypatch):
    """A study file edited after the export (other IRS settings) verifies the certificate as it was computed."""
    root, directory, _ = exported
    edited = root / "edited.toml"
    edited.write_text(TINY.replace("n_p = 100", "n_p = 60"))
    assert load_study(edited).irs.n_p == 60
    assert _verify(root, monkeypatch, directory, "--study", edited) == 0
