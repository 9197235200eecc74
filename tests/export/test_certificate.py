"""The held-out certificate of each shipped artifact, recomputed here from scratch -- each artifact run in its runtime
by the test's own code -- must be what ``export`` wrote; the report set's count of certified models."""

import dataclasses
import hashlib
import json
import multiprocessing

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _exports import run_export, study_of

from approxtune import pipeline
from approxtune.cache import load_cache
from approxtune.certification import predict_under_noise
from approxtune.cli import main
from approxtune.config import load_study
from approxtune.export import ExportError, runtimes
from approxtune.export.certificate import Recheck, count_certifications
from approxtune.irs import certify_irs
from approxtune.noise import Stream, input_seeds
from approxtune.statistics import acr, lower_confidence_bound, radius


def _functions(directory):
    """Each artifact loaded by its runtime's own API: the function a receiver of the file would run."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
    program = torch.export.load(directory / "model.pt2").module()

    def onnx(x):
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    def pt2(x):
        with torch.inference_mode():
            return program(x)

    return {"onnxruntime": (onnx, "model.onnx", ort.__version__), "torch": (pt2, "model.pt2", torch.__version__)}


def _check_entry(entry, directory, artifact, version, radii, predicted, accuracy):
    assert entry["artifact"] == artifact and entry["runtime_version"] == version
    data = (directory / artifact).read_bytes()
    assert entry["artifact_sha256"] == hashlib.sha256(data).hexdigest() and entry["artifact_bytes"] == len(data)
    assert [p["radius"] for p in entry["per_input"]] == radii.tolist()
    assert [p["predicted"] for p in entry["per_input"]] == predicted.tolist()
    assert entry["acr"] == acr(radii) and entry["accuracy"] == accuracy


def _accuracy(function, inputs):
    return int((function(inputs.x).argmax(1) == inputs.y).sum()) / len(inputs)


def test_each_runtime_irs_certificate_recomputed_from_scratch_is_the_exported_one(exported):
    root, directory, _ = exported
    cert = json.loads((directory / "certificate.json").read_text())
    study = load_study(root / "tiny.toml")
    inputs = pipeline.load_inputs(study, "report")
    cache = load_cache(root / study.cache_path("report"))
    assert cert["method"] == "irs" and [c["runtime"] for c in cert["certificates"]] == ["onnxruntime", "torch"]
    for entry in cert["certificates"]:
        function, artifact, version = _functions(directory)[entry["runtime"]]
        result = certify_irs(function, inputs, cache, study.irs_settings, batch_size=study.certify.batch_size)
        predicted = np.where(result.radius > 0, cache.c_hat, -1)
        _check_entry(entry, directory, artifact, version, result.radius, predicted, _accuracy(function, inputs))
        assert result.radius.max() > 0, "the test certifies something"


@pytest.fixture(scope="module")
def scratch(tuned):
    root = tuned
    fp16 = next(t for t in study_of(root).trials if t.user_attrs.get("baseline") == "fp16")
    out = root / "certificate" / "scratch"
    with pytest.MonkeyPatch.context() as mp:
        assert run_export(root, mp, "--trial", fp16.number, "--out", out, "--recheck", "scratch") == 0
    return root, out


def test_each_runtime_certify_from_scratch_recomputed_here_is_the_exported_one(scratch):
    """Cohen's CERTIFY written out: c_hat from n0 FRESH samples, p_A from the next n, radius sigma Phi^-1(p_A)."""
    root, directory = scratch
    cert = json.loads((directory / "certificate.json").read_text())
    study = load_study(root / "tiny.toml")
    c = study.certify
    inputs = pipeline.load_inputs(study, "report")
    seeds = input_seeds(pipeline.noise_seed(study, "report"), inputs.index)
    assert cert["noise"]["streams"] == ["FRESH"] and cert["confidence"] == pytest.approx(1 - c.alpha)
    for entry in cert["certificates"]:
        function, artifact, version = _functions(directory)[entry["runtime"]]
        selection = predict_under_noise(function, inputs.x, seeds, Stream.FRESH, 0, c.n0, c.sigma, device="cpu")
        c_hat = np.array([np.bincount(row, minlength=10).argmax() for row in selection])
        estimation = predict_under_noise(
            function, inputs.x, seeds, Stream.FRESH, c.n0, c.n0 + c.n, c.sigma, device="cpu"
        )
        p_a = lower_confidence_bound((estimation == c_hat[:, None]).sum(axis=1), c.n, c.alpha)
        radii = np.where((c_hat == inputs.y.numpy()) & (p_a > 0.5), radius(p_a, c.sigma), 0.0)
        predicted = np.where(p_a > 0.5, c_hat, -1)
        _check_entry(entry, directory, artifact, version, radii, predicted, _accuracy(function, inputs))
        assert radii.max() > 0, "the test certifies something"


def test_the_certificate_records_how_to_repeat_it(exported, scratch):
    root, directory, _ = exported
    study = load_study(root / "tiny.toml")
    c = study.certify
    cert = json.loads((directory / "certificate.json").read_text())
    settings = dataclasses.replace(study.irs_settings, n_tail=study.irs_settings.tail_length(c.n))  # as resolved
    irs = Recheck("irs", c.sigma, c.n0, c.n, c.alpha, c.batch_size, settings)
    assert Recheck.from_certificate(cert) == irs
    cert = json.loads((scratch[1] / "certificate.json").read_text())
    assert Recheck.from_certificate(cert) == Recheck("scratch", c.sigma, c.n0, c.n, c.alpha, c.batch_size)
    with pytest.raises(ExportError, match="does not record how it was computed"):
        Recheck.from_certificate({"method": "irs"})
    with pytest.raises(ExportError, match="--recheck must be one of irs, scratch"):
        Recheck("exact", c.sigma, c.n0, c.n, c.alpha, c.batch_size)


def _entry(model, method="irs", fingerprint="report-a", study="s"):
    return {"study": study, "inputs_fingerprint": fingerprint, "model_sha256": model, "method": method}


def test_the_report_set_counts_distinct_certified_models(tmp_path):
    counts = [
        count_certifications(tmp_path, _entry("m1")),
        count_certifications(tmp_path, _entry("m2")),
        count_certifications(tmp_path, _entry("m1")),  # the same model by the same method: the same numbers
        count_certifications(tmp_path, _entry("m1", method="scratch")),
        count_certifications(tmp_path, _entry("m3", fingerprint="report-b")),  # another report set
        count_certifications(tmp_path, _entry("m4", study="t")),  # another study
    ]
    assert counts == [1, 2, 2, 3, 1, 1]
    data = json.loads((tmp_path / "report_certifications.json").read_text())
    assert len(data["certifications"]) == 6, "every export is listed"


def _record_many(args):
    directory, worker = args
    return [count_certifications(directory, _entry(f"w{worker}-{i}")) for i in range(5)]


def test_concurrent_exports_each_count_the_others(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        seen = pool.map(_record_many, [(tmp_path, w) for w in range(4)])
    assert sorted(x for counts in seen for x in counts) == list(range(1, 21)), "no entry is lost, no count repeated"


def test_the_certificate_is_the_runtimes_own_function_and_verify_sees_another_one(tuned, monkeypatch, capsys):
    """A runtime whose function differs from torch's f^p (here ONNX Runtime's logits pushed towards class 0) gets the
    certificate of its own function, not torch's; verify reproduces it under that runtime and reports, exit 1, what
    differs under the real one."""
    real = runtimes._LOADERS["onnxruntime"]

    def biased(path, device):
        deployable = real(path, device)
        run = deployable.run

        def shifted(x):
            logits = run(x)
            if len(x) > 2:  # (export's own check of the file runs it on two clean inputs; leave those alone)
                logits[:, 0] += 0.5 * logits.abs().max(dim=1).values  # another function: class 0 wins more often
            return logits

        deployable.run = shifted
        return deployable

    root = tuned
    fp32 = next(t for t in study_of(root).trials if t.user_attrs.get("baseline") == "fp32")
    out = root / "certificate" / "biased"
    monkeypatch.setitem(runtimes._LOADERS, "onnxruntime", biased)
    assert run_export(root, monkeypatch, "--trial", fp32.number, "--out", out) == 0
    cert = json.loads((out / "certificate.json").read_text())
    onnx, pt2 = cert["certificates"]
    assert onnx["per_input"] != pt2["per_input"] and onnx["acr"] != pt2["acr"]
    study = load_study(root / "tiny.toml")
    inputs = pipeline.load_inputs(study, "report")
    cache = load_cache(root / study.cache_path("report"))
    function = biased(out / "model.onnx", "cpu")
    result = certify_irs(function, inputs, cache, study.irs_settings, batch_size=study.certify.batch_size)
    assert [p["radius"] for p in onnx["per_input"]] == result.radius.tolist(), "the runtime's own function"
    assert main(["verify", str(out)]) == 0
    monkeypatch.setitem(runtimes._LOADERS, "onnxruntime", real)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    said = " ".join(capsys.readouterr().out.split())
    assert "model.onnx in onnxruntime" in said and "NOT reproduced" in said and "inputs differ" in said
    assert "model.pt2 in torch" in said.split("NOT reproduced")[1] and said.endswith("reproduced")
