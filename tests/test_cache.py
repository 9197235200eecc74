"""The base-certification cache: format, atomic and resumable writing, mismatch detection."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from approxtune import cache as cache_mod
from approxtune.cache import CacheError, build_base_cache, load_cache, model_fingerprint
from approxtune.certification import certify
from approxtune.data import Inputs
from approxtune.noise import input_seeds

SETTINGS = {"sigma": 0.5, "n0": 16, "n": 300, "alpha": 0.001, "seed": 3}


def make_inputs(count=10, offset=0):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(count, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (count,), generator=g)
    return Inputs(x, y, np.arange(offset, offset + count, dtype=np.int64))


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_cache_contents_match_certify(tmp_path):
    model, inputs = make_model(), make_inputs()
    cache = build_base_cache(model, inputs, tmp_path / "c", **SETTINGS)
    seeds = input_seeds(SETTINGS["seed"], inputs.index)
    args = (SETTINGS["sigma"], SETTINGS["n0"], SETTINGS["n"], SETTINGS["alpha"])
    direct = certify(model, inputs.x, seeds, *args)
    assert np.array_equal(cache.c_hat, direct.c_hat)
    assert np.array_equal(cache.count, direct.count)
    assert np.array_equal(cache.p_a, direct.p_a)
    assert np.array_equal(cache.predictions, direct.predictions)
    assert np.array_equal(cache.seed, seeds)
    assert np.array_equal(cache.label, inputs.y.numpy()) and np.array_equal(cache.index, inputs.index)
    assert cache.predictions.dtype == np.uint8 and cache.meta.num_classes == 3
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["model_fingerprint"] == model_fingerprint(model)
    assert isinstance(load_cache(tmp_path / "c").predictions, np.memmap)
    assert not (tmp_path / "c.partial").exists()
    assert np.array_equal(cache.certified_radius, np.where(cache.c_hat == cache.label, cache.radius, 0))


def test_no_pickle_in_the_format(tmp_path):
    build_base_cache(make_model(), make_inputs(), tmp_path / "c", **SETTINGS)
    for file in (tmp_path / "c").glob("*.npy"):
        np.load(file, allow_pickle=False)  # raises if any array needed pickle


def test_interrupted_build_resumes_to_identical_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)  # three inputs per chunk
    model, inputs = make_model(), make_inputs(10)
    build_base_cache(model, inputs, tmp_path / "ref", **SETTINGS)

    calls = []

    def explode(count):
        calls.append(count)
        if len(calls) == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_base_cache(model, inputs, tmp_path / "c", progress=explode, **SETTINGS)
    chunks = sorted((tmp_path / "c.partial").glob("chunk-*.npz"))
    assert 1 <= len(chunks) < 4, "some but not all chunks were finished"
    assert not (tmp_path / "c").exists(), "no half-written cache is visible"

    evaluated = []
    model.register_forward_hook(lambda module, args, output: evaluated.append(len(args[0])))
    build_base_cache(model, inputs, tmp_path / "c", **SETTINGS)
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")
    finished_inputs = 3 * len(chunks)
    assert sum(evaluated) - 1 == (10 - finished_inputs) * 316, "finished chunks are reused, not recomputed"


def test_partial_chunks_of_other_settings_are_discarded(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)
    model, inputs = make_model(), make_inputs(10)
    other = {**SETTINGS, "sigma": 0.25}
    with pytest.raises(KeyboardInterrupt):
        build_base_cache(model, inputs, tmp_path / "c", progress=_raise_after(5), **other)
    build_base_cache(model, inputs, tmp_path / "c", **SETTINGS)
    build_base_cache(model, inputs, tmp_path / "ref", **SETTINGS)
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")


def _raise_after(k):
    calls = []

    def progress(count):
        calls.append(count)
        if len(calls) >= k:
            raise KeyboardInterrupt

    return progress


def test_mismatch_names_what_differs(tmp_path):
    model, inputs = make_model(), make_inputs()
    cache = build_base_cache(model, inputs, tmp_path / "c", **SETTINGS)
    other_model = cache_mod.CacheMeta(**{**cache.meta.__dict__, "model_fingerprint": model_fingerprint(make_model(1))})
    with pytest.raises(CacheError, match="the model"):
        cache.check(other_model)
    with pytest.raises(CacheError, match=r"sigma: cache has 0\.5, requested 1\.0"):
        cache.check(cache_mod.CacheMeta(**{**cache.meta.__dict__, "sigma": 1.0}))
    shifted = make_inputs(offset=1)
    with pytest.raises(CacheError, match="the input set"):
        cache.check(cache_mod.CacheMeta(**{**cache.meta.__dict__, "inputs_fingerprint": shifted.fingerprint()}))
    cache.check(cache.meta)  # itself: fine


def test_load_errors(tmp_path):
    with pytest.raises(CacheError, match="no base cache"):
        load_cache(tmp_path / "missing")
    build_base_cache(make_model(), make_inputs(), tmp_path / "c", **SETTINGS)
    os.remove(tmp_path / "c" / "p_a.npy")
    with pytest.raises(CacheError, match=r"p_a\.npy is missing"):
        load_cache(tmp_path / "c")


def test_rebuild_replaces_an_existing_cache(tmp_path):
    inputs = make_inputs()
    build_base_cache(make_model(0), inputs, tmp_path / "c", **SETTINGS)
    second = build_base_cache(make_model(1), inputs, tmp_path / "c", **SETTINGS)
    assert load_cache(tmp_path / "c").meta == second.meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from torch import nn
    from approxtune.cache import build_base_cache
    from approxtune.data import Inputs
    import approxtune.cache as c
    c.CHUNK_SAMPLES = 2 * 2064
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=g); y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    build_base_cache(model, Inputs(x, y, np.arange(40)), sys.argv[1], sigma=0.5, n0=64, n=2000, alpha=0.001, seed=1)
    """
)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(tmp_path):
    """A real kill -9 while chunks are being written; the resumed cache equals an uninterrupted one byte for byte."""
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, script, tmp_path / "ref"], check=True)
    proc = subprocess.Popen([sys.executable, script, tmp_path / "c"])
    partial = tmp_path / "c.partial"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(partial.glob("chunk-*.npz"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "c").exists()
    assert len(list(partial.glob("chunk-*.npz"))) >= 3
    subprocess.run([sys.executable, script, tmp_path / "c"], check=True)
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")
