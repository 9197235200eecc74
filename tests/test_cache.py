"""The base-certification cache: format, atomic and resumable writing, mismatch detection."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _caches import as_format_1, reseal, rewrite_meta
from torch import nn

from approxtune import cache as cache_mod
from approxtune.cache import CacheError, CertifySettings, build_base_cache, load_cache, model_fingerprint
from approxtune.certification import certify
from approxtune.data import Inputs
from approxtune.noise import NOISE_GENERATOR, canary, input_seeds

SETTINGS = CertifySettings(sigma=0.5, n0=16, n=300, alpha=0.001, seed=3)


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
    cache = build_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    seeds = input_seeds(SETTINGS.seed, inputs.index)
    args = (SETTINGS.sigma, SETTINGS.n0, SETTINGS.n, SETTINGS.alpha)
    direct = certify(model, inputs.x, seeds, *args)
    assert np.array_equal(cache.c_hat, direct.c_hat)
    assert np.array_equal(cache.count, direct.count)
    assert np.array_equal(cache.p_a, direct.p_a)
    assert np.array_equal(cache.predictions, direct.predictions)
    assert np.array_equal(cache.seed, seeds)
    assert np.array_equal(cache.label, inputs.y.numpy()) and np.array_equal(cache.index, inputs.index)
    assert cache.predictions.dtype == np.uint8 and cache.meta.num_classes == 3
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["format_version"] == 2 and meta["model_fingerprint"] == model_fingerprint(model)
    assert (meta["noise_generator"], meta["noise_canary"]) == (NOISE_GENERATOR, canary())
    assert cache.seed.dtype == np.uint64 and cache.seed.shape == (10, 2)
    assert isinstance(load_cache(tmp_path / "c").predictions, np.memmap)
    assert not (tmp_path / "c.partial").exists()
    assert np.array_equal(cache.certified_radius, np.where(cache.c_hat == cache.label, cache.radius, 0))


def _samples_to_build(model, inputs, path) -> int:
    """Build the cache at ``path``; returns the noise samples f evaluated (not the class count's one input)."""
    evaluated = []
    hook = model.register_forward_hook(lambda module, args, output: evaluated.append(len(args[0])))
    build_base_cache(model, inputs, path, SETTINGS)
    hook.remove()
    return sum(evaluated) - 1


def test_no_pickle_in_the_format(tmp_path):
    build_base_cache(make_model(), make_inputs(), tmp_path / "c", SETTINGS)
    for file in (tmp_path / "c").glob("*.npy"):
        np.load(file, allow_pickle=False)  # raises if any array needed pickle


def test_interrupted_build_resumes_to_identical_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)  # three inputs per chunk
    model, inputs = make_model(), make_inputs(10)
    build_base_cache(model, inputs, tmp_path / "ref", SETTINGS)

    calls = []

    def explode(count):
        calls.append(count)
        if len(calls) == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_base_cache(model, inputs, tmp_path / "c", SETTINGS, progress=explode)
    chunks = sorted((tmp_path / "c.partial").glob("chunk-*.npz"))
    assert 1 <= len(chunks) < 4, "some but not all chunks were finished"
    assert not (tmp_path / "c").exists(), "no half-written cache is visible"

    evaluated = _samples_to_build(model, inputs, tmp_path / "c")
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")
    finished_inputs = 3 * len(chunks)
    assert evaluated == (10 - finished_inputs) * 316, "finished chunks are reused, not recomputed"


def test_partial_chunks_of_other_settings_are_discarded(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)
    model, inputs = make_model(), make_inputs(10)
    other = dataclasses.replace(SETTINGS, sigma=0.25)
    with pytest.raises(KeyboardInterrupt):
        build_base_cache(model, inputs, tmp_path / "c", other, progress=_raise_after(5))
    build_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    build_base_cache(model, inputs, tmp_path / "ref", SETTINGS)
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
    cache = build_base_cache(model, inputs, tmp_path / "c", SETTINGS)
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
    build_base_cache(make_model(), make_inputs(), tmp_path / "c", SETTINGS)
    os.remove(tmp_path / "c" / "p_a.npy")
    with pytest.raises(CacheError, match=r"p_a\.npy is missing"):
        load_cache(tmp_path / "c")


def test_rebuild_replaces_an_existing_cache(tmp_path):
    inputs = make_inputs()
    build_base_cache(make_model(0), inputs, tmp_path / "c", SETTINGS)
    second = build_base_cache(make_model(1), inputs, tmp_path / "c", SETTINGS)
    assert load_cache(tmp_path / "c").meta == second.meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from torch import nn
    from approxtune import cache as c
    from approxtune.data import Inputs
    c.CHUNK_SAMPLES = 2 * 2064
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 4, 4, generator=g); y = torch.randint(0, 3, (40,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    inputs, settings = Inputs(x, y, np.arange(40)), c.CertifySettings(0.5, 64, 2000, 0.001, 1)
    action = sys.argv[2] if len(sys.argv) > 2 else "build"
    if action == "build":
        c.build_base_cache(model, inputs, sys.argv[1], settings)
    elif action == "merge":
        c.merge_base_cache(model, inputs, sys.argv[1], settings)
    else:
        i, k = map(int, action.split("/"))
        c.certify_shard(model, inputs, sys.argv[1], (i, k), settings)
    """
)
"""Certifies a 40-input cache at ``argv[1]``: ``build`` (the default), ``merge`` or shard ``I/K``."""


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


# Base certification split into shards (tests/test_cluster.py runs them as processes through the command line)


def _shard_all(model, inputs, path, k, settings=SETTINGS):
    return [cache_mod.certify_shard(model, inputs, path, (i, k), settings) for i in range(k)]


def test_shards_merge_to_the_bytes_of_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)  # three inputs per chunk: 4 chunks
    model, inputs = make_model(), make_inputs(10)
    build_base_cache(model, inputs, tmp_path / "ref", SETTINGS)
    results = _shard_all(model, inputs, tmp_path / "c", 3)
    assert [len(r.certified) for r in results] == [2, 1, 1], "shard i takes chunks i, i+k, ..."
    assert results[-1].complete and not (tmp_path / "c").exists()
    again = cache_mod.certify_shard(model, inputs, tmp_path / "c", (0, 3), SETTINGS)
    assert again.certified == [] and len(again.reused) == 2, "a shard run twice reuses its chunks"
    merged = cache_mod.merge_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")
    assert merged.meta == load_cache(tmp_path / "ref").meta and not (tmp_path / "c.partial").exists()


def test_a_one_process_build_finishes_what_shards_started(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)
    model, inputs = make_model(), make_inputs(10)
    build_base_cache(model, inputs, tmp_path / "ref", SETTINGS)
    cache_mod.certify_shard(model, inputs, tmp_path / "c", (1, 2), SETTINGS)
    evaluated = _samples_to_build(model, inputs, tmp_path / "c")
    assert evaluated == 6 * 316, "only shard 0's chunks (inputs 0-2 and 6-8) were certified"
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")


def test_merge_refuses_parts_that_do_not_belong_together(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)
    model, inputs = make_model(), make_inputs(10)
    partial = tmp_path / "c.partial"
    with pytest.raises(CacheError, match="no shard parts"):
        cache_mod.merge_base_cache(model, inputs, tmp_path / "c", SETTINGS)

    cache_mod.certify_shard(model, inputs, tmp_path / "c", (0, 2), SETTINGS)
    with pytest.raises(CacheError, match=r"misses chunks 1 \(inputs 3-5\), 3 \(inputs 9-9\) of 4"):
        cache_mod.merge_base_cache(model, inputs, tmp_path / "c", SETTINGS)

    # Shard 1 of another sigma, certified elsewhere and copied in: the chunk says which settings it has.
    other = dataclasses.replace(SETTINGS, sigma=0.25)
    cache_mod.certify_shard(model, inputs, tmp_path / "d", (1, 2), other)
    for chunk in (tmp_path / "d.partial").glob("chunk-*.npz"):
        shutil.copy(chunk, partial / chunk.name)
    with pytest.raises(CacheError, match=r"part chunk-000000003-000000006\.npz was certified with other settings"):
        cache_mod.merge_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    with pytest.raises(CacheError, match=r"sigma: part has 0\.25, requested 0\.5"):
        cache_mod.merge_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    # ... and the whole directory belongs to sigma 0.5: a shard of other settings refuses it and deletes nothing.
    refused = r"holds parts of another base certification:\s+sigma: the parts have 0\.5, requested 0\.25"
    with pytest.raises(CacheError, match=refused):
        cache_mod.certify_shard(model, inputs, tmp_path / "c", (1, 2), other)
    with pytest.raises(CacheError, match="belong to another base certification"):
        cache_mod.merge_base_cache(model, inputs, tmp_path / "c", other)
    assert len(list(partial.glob("chunk-*.npz"))) == 4

    # Parts cut with another chunk size overlap this run's chunks instead of lining up with them.
    for chunk in partial.glob("chunk-*.npz"):
        chunk.unlink()
    cache_mod.certify_shard(model, inputs, tmp_path / "c", (0, 2), SETTINGS)
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 4 * 316)
    cache_mod.certify_shard(model, inputs, tmp_path / "c", (1, 2), SETTINGS)
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)
    with pytest.raises(CacheError, match=r"overlap this run's chunks.*chunk-000000004-000000008\.npz"):
        cache_mod.merge_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    assert not (tmp_path / "c").exists(), "a refused merge writes nothing"


def test_chunks_without_recorded_settings_are_recertified_or_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)
    model, inputs = make_model(), make_inputs(10)
    build_base_cache(model, inputs, tmp_path / "ref", SETTINGS)
    _shard_all(model, inputs, tmp_path / "c", 2)
    old = tmp_path / "c.partial" / "chunk-000000000-000000003.npz"
    with np.load(old) as data:
        arrays = {k: data[k] for k in data.files if k != "meta"}
    np.savez(old, **arrays)  # as approxtune wrote chunks before shards existed
    with pytest.raises(CacheError, match="records no settings"):
        cache_mod.merge_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    build_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")


@pytest.mark.parametrize(("text", "expected"), [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2))])
def test_parse_shard(text, expected):
    assert cache_mod.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "0/0", "-1/2"])
def test_parse_shard_errors(text):
    with pytest.raises(ValueError, match="--shard"):
        cache_mod.parse_shard(text)


# Cache format 2: the noise generator and its canary; older caches and parts are refused with what to do


def test_an_old_format_cache_is_refused_with_a_request_to_certify_again(tmp_path):
    build_base_cache(make_model(), make_inputs(), tmp_path / "c", SETTINGS)
    as_format_1(tmp_path / "c")
    expected = (
        rf"the base cache {tmp_path / 'c'} has cache format 1, this approxtune reads format 2 \(its noise came from "
        r"torch's generator .*\): certify again \(approxtune certify STUDY\.toml\)"
    )
    with pytest.raises(CacheError, match=expected) as refused:
        load_cache(tmp_path / "c")
    assert not isinstance(refused.value, cache_mod.NoiseMismatchError), "an old cache may be rebuilt"


def test_a_cache_whose_noise_this_installation_cannot_reproduce_is_refused(tmp_path, monkeypatch):
    cache = build_base_cache(make_model(), make_inputs(), tmp_path / "c", SETTINGS)
    assert cache.meta.noise_canary == canary()
    before = rewrite_meta(tmp_path / "c", noise_canary="0" * 64)  # as if certified where numpy drew otherwise
    with pytest.raises(cache_mod.NoiseMismatchError, match=r"cannot reproduce \(its canary 0{16}, here .*remove it"):
        load_cache(tmp_path / "c")
    (tmp_path / "c" / "meta.json").write_text(json.dumps(before))
    load_cache(tmp_path / "c")
    # ... and where this installation's numpy draws other noise than the one that certified.
    monkeypatch.setattr(cache_mod, "canary", lambda: "f" * 64)
    with pytest.raises(cache_mod.NoiseMismatchError, match=r"its canary .* here f{16} with the same generator"):
        load_cache(tmp_path / "c")
    monkeypatch.setattr(cache_mod, "NOISE_GENERATOR", "another generator")
    with pytest.raises(cache_mod.NoiseMismatchError, match="with 'another generator' and numpy"):
        load_cache(tmp_path / "c")


def test_parts_of_an_old_format_are_refused_by_shards_and_merges_and_discarded_by_a_build(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)
    model, inputs = make_model(), make_inputs(10)
    build_base_cache(model, inputs, tmp_path / "ref", SETTINGS)
    partial = tmp_path / "c.partial"
    cache_mod.certify_shard(model, inputs, tmp_path / "c", (0, 2), SETTINGS)
    as_format_1(partial)
    fix = rf"has cache format 1, this approxtune reads format 2 .*: remove {partial} and run the shards again"
    with pytest.raises(CacheError, match=rf"the parts in {partial} {fix}"):
        cache_mod.certify_shard(model, inputs, tmp_path / "c", (1, 2), SETTINGS)
    with pytest.raises(CacheError, match=rf"the parts in {partial} {fix}"):
        cache_mod.merge_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    assert len(list(partial.glob("chunk-*.npz"))) == 2, "a refusing shard deletes nothing"
    # A chunk of the old format inside an otherwise current directory.
    (partial / "meta.json").unlink()
    cache_mod.certify_shard(model, inputs, tmp_path / "c", (1, 2), SETTINGS)
    chunk = partial / "chunk-000000000-000000003.npz"
    with np.load(chunk) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    meta = {k: v for k, v in meta.items() if not k.startswith("noise_")} | {"format_version": 1}
    np.savez(chunk, **{**arrays, "meta": np.array(json.dumps(meta))})
    with pytest.raises(CacheError, match=rf"part {chunk.name} {fix}"):
        cache_mod.merge_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    # A one-process build certifies such parts again, to the same bytes.
    as_format_1(partial)
    build_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")


def test_a_malformed_seed_array_is_refused(tmp_path):
    build_base_cache(make_model(), make_inputs(), tmp_path / "c", SETTINGS)
    np.save(tmp_path / "c" / "seed.npy", np.zeros(10, dtype=np.int64))
    reseal(tmp_path / "c", "seed.npy")
    with pytest.raises(cache_mod.CacheDamagedError, match=r"seed\.npy has shape \(10,\), not \(10, 2\)"):
        load_cache(tmp_path / "c")


def test_irs_inputs_must_be_the_cache_inputs_in_cache_order(tmp_path):
    cache = build_base_cache(make_model(), make_inputs(), tmp_path / "c", SETTINGS)
    inputs = make_inputs()
    cache.check_inputs(inputs)
    order = np.array([1, 0, *range(2, 10)])
    swapped = Inputs(inputs.x[order], inputs.y[order], inputs.index[order])
    with pytest.raises(CacheError, match=r"not the ones this cache certified .*in the cache's order"):
        cache.check_inputs(swapped)
    with pytest.raises(CacheError, match="3 inputs given for a cache of 10 inputs"):
        cache.check_inputs(inputs.head(3))
    shifted = Inputs(inputs.x, inputs.y, inputs.index + 1)  # same images, other dataset indices: other noise seeds
    with pytest.raises(CacheError, match="fingerprint differs"):
        cache.check_inputs(shifted)


# Integrity: checksums of every file, verified on load; damaged chunks


def _flip(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-7])


def _edit_meta(cache: Path, change) -> None:
    """Change the parsed ``meta.json`` of ``cache`` in place with ``change(meta)``, written back as JSON."""
    meta = json.loads((cache / "meta.json").read_text())
    change(meta)
    (cache / "meta.json").write_text(json.dumps(meta, indent=2))


DAMAGE = {
    "truncated predictions": (
        lambda c: _truncate(c / "predictions.npy"),
        r"predictions\.npy has 3,121 bytes, 3,128 were written \(truncated\?\)",
    ),
    "flipped header byte": (lambda c: _flip(c / "p_a.npy", 30), r"p_a\.npy does not match its SHA-256 checksum"),
    "flipped data byte": (
        lambda c: _flip(c / "predictions.npy", 2000),
        r"predictions\.npy does not match its SHA-256 checksum \(changed on disk\)",
    ),
    "flipped radius bit": (lambda c: _flip(c / "radius.npy", 140), r"radius\.npy does not match its SHA-256"),
    "garbage meta.json": (
        lambda c: (c / "meta.json").write_text('{"sigma": 0.5 "n": 3}'),
        r"meta\.json is not valid JSON \(Expecting ',' delimiter: line 1 column 15",
    ),
    "binary meta.json": (lambda c: (c / "meta.json").write_bytes(b"\xff\xfe\x00"), r"meta\.json is not valid JSON"),
    "meta.json of a list": (lambda c: (c / "meta.json").write_text("[]"), r"meta\.json holds a list, not an object"),
    "changed meta value": (
        lambda c: (c / "meta.json").write_text(
            (c / "meta.json").read_text().replace('"alpha": 0.001', '"alpha": 0.01')
        ),
        r"meta\.json does not match its checksum \(a value in it was changed\)",
    ),
    "missing array": (lambda c: (c / "count.npy").unlink(), r"count\.npy is missing"),
    "missing meta.json": (lambda c: (c / "meta.json").unlink(), r"meta\.json is missing"),
    "a key renamed": (
        lambda c: (c / "meta.json").write_text((c / "meta.json").read_text().replace('"seed"', '"sead"')),
        r"meta\.json has keys .*'sead'.*, expected",
    ),
    "a byte count as text": (
        lambda c: _edit_meta(c, lambda meta: meta["checksums"]["label.npy"].update(bytes="208")),
        r"meta\.json records no checksum of label\.npy",
    ),
    "a checksum dropped": (
        lambda c: (c / "meta.json").write_text((c / "meta.json").read_text().replace('"label.npy"', '"lbl.npy"')),
        r"meta\.json records no checksum of label\.npy",
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_any_damage_is_refused_in_one_line_naming_the_file_and_the_fix(tmp_path, damage):
    build_base_cache(make_model(), make_inputs(), tmp_path / "c", SETTINGS)
    change, message = DAMAGE[damage]
    change(tmp_path / "c")
    with pytest.raises(cache_mod.CacheDamagedError, match=message) as refused:
        load_cache(tmp_path / "c")
    text = str(refused.value)
    assert "\n" not in text and text.startswith(f"the base cache {tmp_path / 'c'} is damaged: ")
    assert text.endswith(
        "`approxtune certify STUDY.toml` sets it aside and certifies it again (the same settings give the same cache)"
    )


def test_a_cache_without_checksums_is_certified_again_not_called_damaged(tmp_path):
    build_base_cache(make_model(), make_inputs(), tmp_path / "c", SETTINGS)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    del meta["checksums"]  # as approxtune wrote format 2 before it verified caches
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"has no checksums .* so its files cannot be verified: certify again") as exc:
        load_cache(tmp_path / "c")
    assert not isinstance(exc.value, cache_mod.CacheDamagedError)
    (tmp_path / "c").rename(tmp_path / "file")
    (tmp_path / "c").write_text("")
    with pytest.raises(cache_mod.CacheDamagedError, match="it is a file, not a cache directory"):
        load_cache(tmp_path / "c")


def test_checksums_record_every_file_and_the_metadata(tmp_path):
    build_base_cache(make_model(), make_inputs(), tmp_path / "c", SETTINGS)
    checksums = json.loads((tmp_path / "c" / "meta.json").read_text())["checksums"]
    assert set(checksums) == {"meta"} | {f"{name}.npy" for name in cache_mod.ARRAYS}
    for name in cache_mod.ARRAYS:
        data = (tmp_path / "c" / f"{name}.npy").read_bytes()
        assert checksums[f"{name}.npy"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_set_aside_keeps_a_damaged_cache_under_a_name_of_its_own(tmp_path):
    (tmp_path / "c").mkdir()
    first = cache_mod.set_aside(tmp_path / "c")
    (tmp_path / "c").mkdir()
    second = cache_mod.set_aside(tmp_path / "c")
    assert first != second and first.name.startswith("c.damaged-") and second.is_dir() and not (tmp_path / "c").exists()


@pytest.fixture
def three_per_chunk(monkeypatch):
    """A model and 10 inputs whose certification is cut into chunks of three inputs (four chunks)."""
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", 3 * 316)
    return make_model(), make_inputs(10)


def _chunk_arrays(file: Path) -> dict:
    with np.load(file) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "changed array", "no checksums"])
def test_a_damaged_chunk_is_certified_again_by_a_build_and_refused_by_a_merge(tmp_path, three_per_chunk, how):
    model, inputs = three_per_chunk
    build_base_cache(model, inputs, tmp_path / "ref", SETTINGS)
    _shard_all(model, inputs, tmp_path / "c", 2)
    chunk = tmp_path / "c.partial" / "chunk-000000003-000000006.npz"
    if how == "flipped byte":
        _flip(chunk, chunk.stat().st_size // 2)
        message = r"part chunk-000000003-000000006\.npz cannot be read \(BadZipFile: Bad CRC-32"
    elif how == "truncated":
        _truncate(chunk)
        message = r"part chunk-000000003-000000006\.npz cannot be read"
    else:  # a whole .npz whose arrays are not the ones its checksums record, or that records none
        arrays = _chunk_arrays(chunk)
        if how == "changed array":
            arrays["predictions"] = arrays["predictions"].copy()
            arrays["predictions"][1, 7] ^= 1
            message = r"part chunk-000000003-000000006\.npz is damaged: its predictions does not match the checksum"
        else:
            del arrays["checksums"]
            message = r"part chunk-000000003-000000006\.npz records no checksums"
        np.savez(chunk, **arrays)
    with pytest.raises(CacheError, match=message) as refused:
        cache_mod.merge_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    assert "run its shard again (chunk 1 belongs to shard I/K with I = 1 mod K)" in str(refused.value)
    assert not (tmp_path / "c").exists(), "a refused merge writes nothing"

    evaluated = _samples_to_build(model, inputs, tmp_path / "c")
    assert evaluated == 3 * 316, "only the damaged chunk (inputs 3-5) was certified again"
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")


def test_what_killed_builders_left_is_removed_by_the_next_build(tmp_path, three_per_chunk):
    model, inputs = three_per_chunk
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"{socket.gethostname()}-{dead.pid}"
    (tmp_path / f"c.tmp-{tag}").mkdir()  # a half-written cache
    (tmp_path / "c.partial").mkdir()
    (tmp_path / "c.partial" / f"chunk-000000000-000000003.tmp-{tag}.npz").write_bytes(b"half")
    live = tmp_path / f"c.tmp-{socket.gethostname()}-{os.getppid()}"  # another process, alive: never touched
    live.mkdir()
    build_base_cache(model, inputs, tmp_path / "c", SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", live.name]


@pytest.mark.slow
def test_builds_and_shards_started_at_once_never_collide(tmp_path):
    """Before the lock, a build that finished removed <cache>.partial while another process wrote into it
    ("No such file or directory: ...chunk-...tmp-<host>-<pid>.npz").  Now builds take turns, shards run side by side
    and wait for a build, a shard that waited for a build finds the cache complete, and so does a merge after them."""
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, script, tmp_path / "ref", "build"], check=True)

    def start(*args):
        return subprocess.Popen([sys.executable, script, *map(str, args)], stdout=subprocess.PIPE, text=True)

    procs = [start(tmp_path / "c", what) for what in ("build", "0/2", "build", "1/2")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build.py", "c", "ref"], "no parts, lock or temporary left"
    subprocess.run([sys.executable, script, tmp_path / "c", "merge"], check=True)
    assert dir_bytes(tmp_path / "c") == dir_bytes(tmp_path / "ref")
