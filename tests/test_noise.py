"""Replayable noise: any range of an input's samples is the same bits whatever the chunking, the blocks drawn with it,
the process, the CPU features in use; every block of a study has a generator state of its own; the normals are
standard normal."""

import json
import math
import os
import subprocess
import sys
import textwrap
from decimal import Context

import numpy as np
import pytest
import torch
from scipy import stats

from approxtune import noise
from approxtune.noise import Stream, blocks, canary, input_seeds, noise_block, normal_blocks, sample_noise

SHAPE = (1, 5, 3)  # 15 elements per sample: blocks whose size is no multiple of anything the generator works in

CANARY = "336bcc6e006509ef7d24c0189ab1a90d0518a1cb1a32a8a9b5d165129b0e2d57"
"""The noise of approxtune's cache format 2.  If this changes, the noise changed: every cache must be certified
again, so bump approxtune.cache.FORMAT_VERSION (and say why in its hints) before updating this value."""


def test_the_noise_is_the_one_format_2_caches_hold():
    assert canary() == CANARY


@pytest.mark.parametrize("block_size", [1, 7, 64])
@pytest.mark.parametrize("chunk", [1, 5, 16, 33, 100, 1000])
def test_any_chunking_gives_the_same_samples(block_size, chunk):
    seed = input_seeds(3, [42])[0]
    whole = sample_noise(seed, Stream.ESTIMATION, 0, 300, SHAPE, 0.5, block_size)
    pieces = torch.cat(
        [
            sample_noise(seed, Stream.ESTIMATION, lo, min(lo + chunk, 300), SHAPE, 0.5, block_size)
            for lo in range(0, 300, chunk)
        ]
    )
    assert torch.equal(whole, pieces)


@pytest.mark.parametrize("m", [1, 15, 16, 17, 64, 65, 299])
def test_prefix_is_the_start_of_the_full_draw(m):
    seed = input_seeds(0, [7])[0]
    full = sample_noise(seed, Stream.ESTIMATION, 0, 300, SHAPE, 1.0)
    assert torch.equal(sample_noise(seed, Stream.ESTIMATION, 0, m, SHAPE, 1.0), full[:m])


def test_a_block_does_not_depend_on_the_blocks_drawn_with_it():
    """The engine draws a batch's blocks in one call; each row is the block drawn alone, pieces and rejections alike."""
    seeds = input_seeds(5, [0, 1, 2, 3, 4])
    block = np.array([0, 3, 1 << 50, 2, 9])
    count = 2 * noise._PIECE + 123  # three pieces per block
    together = normal_blocks(seeds, Stream.SELECTION, block, count)
    for j in range(5):
        np.testing.assert_array_equal(together[j], noise.standard_normal(seeds[j], Stream.SELECTION, block[j], count))
    pair = normal_blocks(seeds[[4, 1]], Stream.SELECTION, block[[4, 1]], count)
    np.testing.assert_array_equal(pair, together[[4, 1]])
    np.testing.assert_array_equal(noise_block(seeds[2], 0, block[2], (count,), 1)[0], together[2])


def test_seeds_are_the_run_seed_and_the_input_id_so_they_never_collide():
    """Two inputs, two runs or two blocks never share a generator state: the seed is (run seed, id), not a hash."""
    seeds = input_seeds(7, [0, 1, 2**40, 2**63 - 1])
    assert seeds.dtype == np.uint64 and seeds.shape == (4, 2)
    assert seeds[:, 0].tolist() == [7] * 4 and seeds[:, 1].tolist() == [0, 1, 2**40, 2**63 - 1]
    assert input_seeds(-1, [3])[0].tolist() == [2**64 - 1, 3]
    assert input_seeds(0, [5])[0].tolist() == input_seeds(0, [9, 5])[1].tolist(), "depends only on (run seed, id)"
    with pytest.raises(ValueError, match="non-negative"):
        input_seeds(0, [-1])
    # The defect of torch's generator (only the low 32 bits of a seed were used): seeds that differ above bit 32.
    for high in (1 << 32, 1 << 40, 1 << 63):
        a = noise.standard_normal(np.array([1, 5], dtype=np.uint64), 1, 0, 64)
        b = noise.standard_normal(np.array([1 ^ high, 5], dtype=np.uint64), 1, 0, 64)
        c = noise.standard_normal(np.array([1, 5 ^ high], dtype=np.uint64), 1, 0, 64)
        assert not np.array_equal(a, b) and not np.array_equal(a, c)
    # Streams and blocks, far apart too.
    seed = input_seeds(0, [0])[0]
    draws = {(s, b): noise.standard_normal(seed, s, b, 64).tobytes() for s in Stream for b in (0, 1, 1 << 40)}
    assert len(set(draws.values())) == len(draws)


def test_a_block_only_moves_the_low_counter_words():
    """Philox with key (run seed, id) and counter (0, 0, block, stream): drawing a block (many pieces, rejections and
    tail rounds included) advances only counter word 0, so no block ever reaches another block's counters."""
    seed = input_seeds(3, [11])[0]
    gen = np.random.Philox(key=[int(seed[0]), int(seed[1])], counter=[0, 0, 5, int(Stream.ESTIMATION)])
    noise._piece([gen], np.array([noise._PIECE]))
    counter = gen.state["state"]["counter"].tolist()
    assert counter[1:] == [0, 5, int(Stream.ESTIMATION)] and 0 < counter[0] < 2**20


def test_normals_are_standard_normal():
    """10^7 normals: moments, Kolmogorov-Smirnov, chi-square on 2,000 bins, and the mass and shape of the tail beyond R
    (the ziggurat's rarest path) against N(0, 1)."""
    x = normal_blocks(input_seeds(3, np.arange(10)), Stream.ESTIMATION, 0, 1_000_000).ravel().astype(np.float64)
    n = x.size
    assert abs(x.mean()) < 5 / math.sqrt(n) and abs(x.var() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(x, "norm").pvalue > 1e-4
    edges = np.linspace(-5.0, 5.0, 2001)
    observed, _ = np.histogram(x, edges)
    expected = np.diff(stats.norm.cdf(edges)) * n
    assert stats.chi2.sf(((observed - expected) ** 2 / expected).sum(), len(observed) - 1) > 1e-4
    tail = np.abs(x) > noise._R
    p_tail = 2 * stats.norm.sf(noise._R)
    assert abs(tail.sum() - n * p_tail) < 5 * math.sqrt(n * p_tail)
    r = noise._R
    assert stats.kstest(np.abs(x[tail]) - r, lambda t: 1 - stats.norm.sf(r + t) / stats.norm.sf(r)).pvalue > 1e-4


def test_sample_noise_is_scaled_by_sigma_in_float32():
    seed = input_seeds(0, [0])[0]
    eps = noise_block(seed, Stream.ESTIMATION, 0, (1, 4, 4), 64)
    got = sample_noise(seed, Stream.ESTIMATION, 0, 64, (1, 4, 4), 0.3)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), eps * np.float32(0.3))


def test_the_ziggurat_layers_have_equal_areas():
    """Every layer box has area V (computed in decimal), the base layer too: what makes the ziggurat exact."""
    ctx = Context(prec=40)
    scale = 2.0**23
    k, w, f = noise._K[:256].astype(float), noise._W[:256].astype(float), noise._F
    assert np.array_equal(noise._W[256:], -noise._W[:256]) and np.array_equal(noise._K[256:], noise._K[:256])
    x = w * scale
    v = float(ctx.create_decimal(noise._V))
    areas = x[1:] * (f[:-1] - f[1:])  # layer i: [0, x_i] x [f(x_i), f(x_{i-1})]
    np.testing.assert_allclose(areas[1:], v, rtol=1e-6)  # x_i rounded to float32
    assert areas[0] == pytest.approx(v, rel=1e-6), "the top layer meets the curve at x = 0"
    assert x[0] * f[-1] == pytest.approx(v, rel=1e-6) and x[-1] == pytest.approx(noise._R)
    # The fast path stays under the curve (up to the float32 rounding of x_i), and in the base layer below R.
    np.testing.assert_array_less(k[1:] / scale, np.append(0.0, x[1:-1]) / x[1:] * (1 + 2e-7) + 1e-300)
    assert k[0] / scale <= noise._R / x[0] * (1 + 2e-7) and k[1] == 0


def test_log_is_accurate_and_built_from_basic_operations():
    rng = np.random.default_rng(0)
    u = np.concatenate([rng.random(100_000), [2.0**-53, 0.5, 1.0, 1.0 - 2.0**-53, 1e-300, 3.7e7]])
    np.testing.assert_allclose(noise._log(u), np.log(u), rtol=4e-16, atol=0)
    assert noise._log(np.array([1.0]))[0] == 0.0


def test_blocks_cover_the_range_exactly():
    assert list(blocks(0, 10, 4)) == [(0, 0, 4), (1, 0, 4), (2, 0, 2)]
    assert list(blocks(5, 9, 4)) == [(1, 1, 4), (2, 0, 1)]
    assert list(blocks(3, 3, 4)) == []


# ---------------------------------------------------------------------------------------------------------------------
# The same bits under every CPU feature setting that numpy and torch can be told to use

_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, numpy as np, torch
    from torch import nn
    from approxtune.certification import predict_under_noise
    from approxtune.noise import Stream, canary, input_seeds, normal_blocks

    class Recorder(nn.Module):  # hashes the exact bits of every noisy batch it is given
        def __init__(self):
            super().__init__()
            self.h, self.w = hashlib.sha256(), nn.Parameter(torch.zeros(1))
        def forward(self, x):
            self.h.update(x.numpy().tobytes())
            return torch.zeros((len(x), 3))

    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    model = Recorder()
    seeds = input_seeds(2**64 - 5, [0, 7, 2**62])
    predict_under_noise(model, x, seeds, Stream.ESTIMATION, [0, 5, 64], [130, 100, 200], 0.37, batch_size=100)
    blocks = normal_blocks(seeds, Stream.FRESH, np.array([0, 1, 2**63]), 3 * 32 * 32 * 64)
    print(json.dumps({
        "canary": canary(),
        "blocks": hashlib.sha256(blocks.tobytes()).hexdigest(),
        "engine": model.h.hexdigest(),
        "torch": torch.backends.cpu.get_cpu_capability(),
    }))
    """
)


def _feature_settings() -> list[dict[str, str]]:
    """Environments: numpy's SIMD dispatch (every target, all but the lowest off, all off) and torch's CPU capability
    (the best this CPU offers, default, avx2 below avx512)."""
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

    dispatch = [t for t in __cpu_dispatch__ if __cpu_features__.get(t)]  # e.g. X86_V3 (AVX2), X86_V4 (AVX-512)
    numpy_off = [" ".join(dispatch[1:]), " ".join(dispatch)] if len(dispatch) > 1 else [" ".join(dispatch)]
    top = torch.backends.cpu.get_cpu_capability().lower()
    torch_on = ["default"] + (["avx2"] if top == "avx512" else [])  # the top one is what runs without a setting
    envs = [{}] + [{"NPY_DISABLE_CPU_FEATURES": n} for n in numpy_off if n]
    return envs + [{"ATEN_CPU_CAPABILITY": t, "NPY_DISABLE_CPU_FEATURES": numpy_off[-1]} for t in torch_on]


@pytest.mark.slow
def test_noise_and_noisy_inputs_are_the_same_bits_under_every_cpu_feature_setting():
    """torch's randn differed in 38 % of a block between ATEN_CPU_CAPABILITY=default and avx2; this noise, and the
    x + sigma * eps the engine feeds the model, must be bit-identical under every setting."""
    settings = _feature_settings()
    assert len(settings) >= 4, settings  # at least two numpy and two torch settings are really compared
    results = []
    for env in settings:
        full_env = {k: v for k, v in os.environ.items() if k not in ("NPY_DISABLE_CPU_FEATURES", "ATEN_CPU_CAPABILITY")}
        out = subprocess.run(
            [sys.executable, "-c", _SCRIPT], env={**full_env, **env}, check=True, capture_output=True, text=True
        )
        results.append(json.loads(out.stdout.splitlines()[-1]))
    capabilities = {r.pop("torch") for r in results}
    assert len(capabilities) >= 2, f"torch ran with one CPU capability only: {capabilities}"
    assert all(r == results[0] for r in results), list(zip(settings, results, strict=True))
    assert results[0]["canary"] == CANARY
