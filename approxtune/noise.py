"""Replayable Gaussian noise: the same float32 bits for any chunking, process, CPU or operating system.

**Keys, streams and blocks.**  Every input has a *noise seed*: the pair ``(run seed, input id)`` of 64-bit words
(:func:`input_seeds`).  Its noise samples are numbered 0, 1, 2, ... within a *stream* (selection samples of CERTIFY,
estimation samples, fresh samples for a from-scratch run) and are generated in fixed blocks of ``block_size``
samples.  Block ``b`` of stream ``s`` is drawn from the counter-based generator Philox4x64-10 (Salmon et al., 2011;
numpy's ``np.random.Philox``) with key ``(run seed, input id)`` and counter ``(0, 0, b, s)``.  Philox maps a counter
to random words under a key; drawing increments the counter's first word (carrying into the second), and a block
draws far fewer than 2^64 words, so two blocks of a study (another input, stream or block) never pass through the
same (key, counter) state: by construction, not by chance.  (torch's CPU generator, used before, kept only the low
32 bits of its seed, so blocks collided by chance.)  Any range of samples ``[start, stop)`` is therefore the same
numbers bit for bit whatever batch size, chunking or process produced it; a replay of the first ``m`` samples
regenerates exactly the noise that the base certification saw.

**Normals from integer and IEEE operations only.**  Philox's raw words are integers, the same on every machine.
They are turned into float32 standard normals by a 256-layer ziggurat (Marsaglia & Tsang, 2000; the layout of
numpy's float32 one: 8 bits choose the layer, 1 the sign, 23 the position), written here because numpy's and torch's
normal generators call libm (``log1pf``, ``exp``) or SIMD kernels that differ between CPUs, C libraries and versions
(torch's ``randn`` differs in 38 % of a block between ``ATEN_CPU_CAPABILITY=default`` and ``avx2``).  Here every
floating-point step is an IEEE-754 operation that is correctly rounded by definition (``+ - * /``, conversions,
``frexp``) and done one ufunc at a time, so no compiler or SIMD path can fuse or approximate it; the logarithm of the
rare rejection and tail steps is a series evaluated the same way (:func:`_log`), and the layer tables are computed at
import with :mod:`decimal`, whose ``exp``, ``ln`` and ``sqrt`` are correctly rounded.  The result is the same bits
on any machine whose numpy provides Philox (numpy >= 1.17; its raw output is integer arithmetic) and computes
float32/float64 in IEEE arithmetic; tests/test_noise.py checks it under every CPU feature setting numpy and torch can
be given.  The ziggurat is exact: every sample is N(0, 1) up to the float32 rounding of the layer tables (and of the
sample).  A cache records :data:`NOISE_GENERATOR` and :func:`canary`, and refuses to load where the canary cannot be
reproduced, so no numpy release can silently change the noise a cache is replayed with.

Noise is always drawn on the CPU in float32, so a model certified on a GPU sees the same noise as on a CPU.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from decimal import Context
from enum import IntEnum
from functools import cache

import numpy as np
import torch

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "NOISE_GENERATOR",
    "Stream",
    "blocks",
    "canary",
    "input_seeds",
    "noise_block",
    "normal_blocks",
    "sample_noise",
    "standard_normal",
]

DEFAULT_BLOCK_SIZE = 64
_WORD = 1 << 64
_PIECE = 1 << 16
"""Normals are produced in pieces of at most this many (a fixed part of the generator: it sets which words are used)."""

NOISE_GENERATOR = (
    "approxtune-noise-2: Philox4x64-10 (numpy >= 1.17) key (run seed, input id), counter (0, 0, block, stream); "
    "float32 normals by a 256-layer ziggurat on 32-bit halves of its raw words, IEEE basic operations only, "
    f"pieces of {_PIECE}"
)
"""What makes the noise: a base cache records it and refuses to replay noise of another generator."""


class Stream(IntEnum):
    """Independent noise streams of one input."""

    SELECTION = 0  # the n0 samples that choose the top class in CERTIFY
    ESTIMATION = 1  # the n samples that bound p_A (cached, replayed by IRS)
    FRESH = 2  # samples that no cache holds (from-scratch certification of an approximation)


def input_seeds(run_seed: int, input_ids: np.ndarray | list[int]) -> np.ndarray:
    """The noise seed of every input: ``(run_seed mod 2^64, input_id)`` as two uint64 words, shape ``(N, 2)``.

    Distinct run seeds (within any 2^64 consecutive integers) and distinct non-negative ids give distinct seeds:
    no hashing, so no collisions.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 1 or (ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0)):
        raise ValueError("input ids must be a flat array of non-negative integers")
    out = np.empty((len(ids), 2), dtype=np.uint64)
    out[:, 0] = int(run_seed) % _WORD
    out[:, 1] = ids.astype(np.uint64)
    return out


def blocks(start: int, stop: int, block_size: int) -> Iterator[tuple[int, int, int]]:
    """``(block, lo, hi)`` for every block that meets ``[start, stop)``; ``[lo, hi)`` is the part inside the block."""
    if start >= stop:
        return
    for b in range(start // block_size, -(-stop // block_size)):
        lo = max(start, b * block_size) - b * block_size
        hi = min(stop, (b + 1) * block_size) - b * block_size
        yield b, lo, hi


# ---------------------------------------------------------------------------------------------------------------------
# The ziggurat: layer tables (exact decimal arithmetic) and the sampler (integer and IEEE basic operations)

_R = 3.6541528853610088  # right edge of the base layer for 256 layers (Marsaglia & Tsang, 2000)
_V = "0.00492867323399"  # the area of every layer under exp(-x^2 / 2)


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k, w, f)`` of the 256 layers, indexed by the 9 low bits of a word (layer, then sign).

    Layer ``i >= 1`` is the box ``[0, x_i] x [f(x_i), f(x_{i-1})]`` with ``f(x) = exp(-x^2 / 2)``, ``x_0 = 0``,
    ``x_255 = R``; each has area ``V``.  Layer 0 is ``[0, V / f(R)] x [0, f(R)]``: the box under the curve up to
    ``R`` and, beyond it, the tail.  ``w = ±x_i / 2^23`` (float32, signed by bit 8), ``k = floor(2^23 x_{i-1} / x_i)``
    (positions below it lie under the curve: accepted at once), ``f = f(x_i)`` (float64, 256 entries).
    """
    ctx = Context(prec=40)
    r, v, scale = ctx.create_decimal(repr(_R)), ctx.create_decimal(_V), ctx.create_decimal(1 << 23)

    def curve(x):
        return ctx.exp(ctx.minus(ctx.multiply(x, x)) / 2)

    x = [ctx.create_decimal(0)] * 256
    x[255] = r
    for i in range(254, 0, -1):  # f(x_i) = V / x_{i+1} + f(x_{i+1}): every layer has area V
        x[i] = ctx.sqrt(-2 * ctx.ln(ctx.add(ctx.divide(v, x[i + 1]), curve(x[i + 1]))))
    base = ctx.divide(v, curve(r))  # layer 0's width
    k = [int(ctx.divide(r, base) * scale)] + [int(ctx.divide(x[i - 1], x[i]) * scale) for i in range(1, 256)]
    width = [float(ctx.divide(base, scale))] + [float(ctx.divide(x[i], scale)) for i in range(1, 256)]
    f = [1.0] + [float(curve(x[i])) for i in range(1, 256)]
    w = np.asarray(width, dtype=np.float64).astype(np.float32)
    return (
        np.tile(np.asarray(k, dtype=np.uint32), 2),
        np.concatenate([w, -w]),
        np.asarray(f, dtype=np.float64),
    )


_K, _W, _F = _tables()
_INV_R = 1.0 / _R
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that e * _LN2_HI is exact (fdlibm)
_LN2_LO = 1.90821492927058770002e-10
_SQRT_HALF = 0.7071067811865476
_ATANH = [1.0 / (2 * j + 1) for j in range(1, 12)]  # 2 atanh(s) = 2 (s + s^3/3 + ... + s^23/23 + ...)


def _log(x: np.ndarray) -> np.ndarray:
    """Natural logarithm of positive normal float64 values, to a few ulp, from ``frexp`` and ``+ - * /`` alone.

    ``x = m 2^e`` with ``m`` in [sqrt(1/2), sqrt(2)); ``ln m = 2 atanh(s)``, ``s = (m - 1) / (m + 1)``, ``|s| <
    0.172``, summed to ``s^23`` (relative error below 1e-18).  Not libm's: its last bits differ between C libraries.
    """
    m, e = np.frexp(x)
    small = m < _SQRT_HALF
    m = np.where(small, m * 2.0, m)
    e = (e - small).astype(np.float64)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    series = np.full_like(z, _ATANH[-1])
    for c in reversed(_ATANH[:-1]):
        series = series * z + c
    log_m = 2.0 * s + 2.0 * s * (z * series)
    return e * _LN2_HI + (log_m + e * _LN2_LO)


def _uniforms(raw: np.ndarray, open_at_zero: bool = False) -> np.ndarray:
    """Float64 uniforms on [0, 1) (or (0, 1]) from the top 53 bits of raw words: exact, no rounding."""
    u = (raw >> np.uint64(11)).astype(np.float64)
    return (u + 1.0) * 2.0**-53 if open_at_zero else u * 2.0**-53


def _draw(gens: list[np.random.Philox], counts: np.ndarray) -> np.ndarray:
    """``counts[j]`` raw words from generator ``j`` each, concatenated in generator order."""
    parts = [gens[j].random_raw(int(c)) for j, c in enumerate(counts) if c]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def _piece(gens: list[np.random.Philox], need: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One piece of every block: ``(values, got)``, the accepted normals of each generator (up to ``need[j]`` and
    more, fewer only in the rare case that rejections used up the spare words) in generator order, and how many each
    gave.

    Per generator the words are used in a fixed order whatever the other generators do: the candidates
    (``need // 2 + need // 128 + 16`` raw words, each split into its low and high 32 bits), one uniform per wedge
    candidate, then rounds of two uniforms per tail candidate still pending.  So a block's normals do not depend on
    which blocks are drawn with it.
    """
    n_raw = need // 2 + need // 128 + 16
    bounds = np.concatenate([[0], np.cumsum(2 * n_raw)])  # generator j's candidates: bounds[j] .. bounds[j + 1] - 1
    words = _draw(gens, n_raw).astype("<u8", copy=False).view("<u4")  # low, high 32 bits of each word, on any CPU
    index = (words & np.uint32(0x1FF)).astype(np.intp)  # layer (8 bits) and sign (bit 8)
    position = words >> np.uint32(9)  # 23 bits
    x = position.astype(np.float32)
    x *= _W.take(index)
    accept = position < _K.take(index)
    rest = np.flatnonzero(~accept)
    layer = index[rest] & 0xFF
    wedge, pending = rest[layer != 0], rest[layer == 0]

    def per_gen(candidates: np.ndarray) -> np.ndarray:
        return np.bincount(np.searchsorted(bounds, candidates, side="right") - 1, minlength=len(gens))

    # Wedge: a point of a layer's box outside the curve's inner part, kept if it lies under the curve.  Its height is
    # drawn now, the tail's first round too, so that one logarithm call serves both.
    i = layer[layer != 0]
    height = _F[i] + _uniforms(_draw(gens, per_gen(wedge))) * (_F[i - 1] - _F[i])
    while True:  # tail, beyond R: Marsaglia's method, each candidate repeated until it accepts (not a rejection)
        count = per_gen(pending)
        u = _uniforms(_draw(gens, 2 * count), open_at_zero=True)  # generator j: count[j] for far, count[j] height
        start = np.repeat(2 * (np.cumsum(count) - count), count)
        rank = np.arange(len(pending)) - np.repeat(np.cumsum(count) - count, count)
        logs = _log(np.concatenate([height, u]))
        if height.size:
            xw = x[wedge].astype(np.float64)
            accept[wedge] = logs[: height.size] < -0.5 * xw * xw
            height = height[:0]
        logs = logs[len(logs) - len(u) :]
        far = -logs[start + rank] * _INV_R
        tail_height = -logs[start + np.repeat(count, count) + rank]
        ok = tail_height + tail_height > far * far
        done = pending[ok]
        value = (_R + far[ok]).astype(np.float32)
        x[done] = np.where(index[done] >= 256, -value, value)
        accept[done] = True
        pending = pending[~ok]
        if not pending.size:
            return np.compress(accept, x), np.add.reduceat(accept, bounds[:-1], dtype=np.int64)


_EMPTY_BUFFER = np.zeros(4, dtype=np.uint64)
_LOCAL = threading.local()


def _generators(count: int) -> list[np.random.Philox]:
    """``count`` Philox objects of this thread, reused from call to call (their state is set before every use)."""
    pool = getattr(_LOCAL, "pool", [])
    pool.extend(np.random.Philox(0) for _ in range(count - len(pool)))
    _LOCAL.pool = pool
    return pool[:count]


def normal_blocks(seeds: np.ndarray, stream: int, block: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` float32 standard normals of block ``block[j]`` of stream ``stream`` of the input whose seed is
    ``seeds[j]``, for every ``j``: shape ``(len(seeds), count)``.  Each row is the same whichever rows come with it."""
    seeds = np.asarray(seeds, dtype=np.uint64).reshape(-1, 2)
    block = np.broadcast_to(np.asarray(block, dtype=np.uint64), (len(seeds),))
    gens = _generators(len(seeds))
    for gen, (k0, k1), b in zip(gens, seeds.tolist(), block.tolist(), strict=True):
        gen.state = {  # a fresh generator at (key, counter): 4 times as fast as constructing one
            "bit_generator": "Philox",
            "state": {"counter": np.array([0, 0, b, stream], dtype=np.uint64), "key": np.array([k0, k1], np.uint64)},
            "buffer": _EMPTY_BUFFER,
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
    out = np.empty((len(gens), count), dtype=np.float32)
    filled = np.zeros(len(gens), dtype=np.int64)
    active = np.arange(len(gens))
    while active.size:
        need = np.minimum(count - filled[active], _PIECE)
        values, got = _piece([gens[j] for j in active], need)
        start = np.cumsum(got) - got
        for a, j in enumerate(active.tolist()):
            take = min(int(got[a]), int(need[a]))
            out[j, filled[j] : filled[j] + take] = values[start[a] : start[a] + take]
            filled[j] += take
        active = active[filled[active] < count]
    return out


def standard_normal(seed: np.ndarray, stream: int, block: int, count: int) -> np.ndarray:
    """The ``count`` float32 standard normals of block ``block`` of stream ``stream`` of the input whose seed is
    ``seed`` (two words)."""
    return normal_blocks(np.asarray(seed)[None], stream, np.array([block]), count)[0]


def noise_block(seed: np.ndarray, stream: int, block: int, shape: tuple[int, ...], block_size: int) -> np.ndarray:
    """The standard-normal noise of one whole block, shape ``(block_size, *shape)``, float32."""
    count = block_size * int(np.prod(shape, dtype=np.int64))
    return standard_normal(seed, stream, block, count).reshape((block_size, *shape))


def sample_noise(
    seed: np.ndarray,
    stream: int,
    start: int,
    stop: int,
    shape: tuple[int, ...],
    sigma: float,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Noise samples ``start .. stop-1`` of one input's stream, scaled by ``sigma`` (as float32): shape
    ``(stop-start, *shape)``."""
    parts = [noise_block(seed, stream, b, shape, block_size)[lo:hi] for b, lo, hi in blocks(start, stop, block_size)]
    if not parts:
        return torch.empty((0, *shape))
    noise = np.concatenate(parts)
    return torch.from_numpy(np.multiply(noise, np.float32(sigma), out=noise))


@cache
def canary() -> str:
    """SHA-256 of a few regenerated blocks (extreme seeds, every stream, a block far out, several pieces) and of
    ``x + sigma * eps`` on them, as the engine computes it: equal on every installation that reproduces the noise."""
    h = hashlib.sha256(NOISE_GENERATOR.encode())
    seeds = [np.array([0, 0], dtype=np.uint64), np.array([_WORD - 1, _WORD - 1], dtype=np.uint64)]
    seeds.append(input_seeds(12345, [678])[0])
    for seed in seeds:
        for stream in Stream:
            for block in (0, 1, (1 << 40) + 3):
                eps = standard_normal(seed, stream, block, 2 * _PIECE + 1001 if block == 1 else 3001)
                h.update(eps.tobytes())
    x = np.linspace(0.0, 1.0, eps.size, dtype=np.float32)
    h.update(np.add(np.multiply(eps, np.float32(0.25)), x).tobytes())
    return h.hexdigest()
