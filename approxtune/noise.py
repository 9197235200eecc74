"""Replayable Gaussian noise.

Every input gets its own seed, derived from ``(run seed, input id)``.  Its noise samples are numbered 0, 1, 2, ...
within a *stream* (selection samples of CERTIFY, estimation samples, fresh samples for a from-scratch run) and are
generated in fixed blocks of ``block_size`` samples: block ``b`` of stream ``s`` is drawn by a fresh
``torch.Generator`` seeded with ``mix(seed, s, b)``.  Any range of samples ``[start, stop)`` is therefore the same
numbers bit for bit whatever batch size, chunking or process produced it; a replay of the first ``m`` samples
regenerates exactly the noise that the base certification saw.  (A single seeded generator does not give this:
``torch.randn`` consumes its state in 16-element groups, so splitting one draw into chunks changes the numbers.)

Noise is always drawn on the CPU in float32, so a model certified on a GPU sees the same noise as on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import IntEnum

import numpy as np
import torch

__all__ = ["DEFAULT_BLOCK_SIZE", "Stream", "block_seed", "blocks", "input_seeds", "sample_noise"]

DEFAULT_BLOCK_SIZE = 64
_MASK64 = (1 << 64) - 1


class Stream(IntEnum):
    """Independent noise streams of one input."""

    SELECTION = 0  # the n0 samples that choose the top class in CERTIFY
    ESTIMATION = 1  # the n samples that bound p_A (cached, replayed by IRS)
    FRESH = 2  # samples that no cache holds (from-scratch certification of an approximation)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def input_seeds(run_seed: int, input_ids: np.ndarray | list[int]) -> np.ndarray:
    """One 63-bit noise seed per input, a deterministic function of ``(run_seed, input_id)``."""
    ids = np.asarray(input_ids, dtype=np.int64)
    base = _splitmix64(int(run_seed) & _MASK64)
    return np.array([_splitmix64(base ^ _splitmix64(int(i))) >> 1 for i in ids], dtype=np.int64)


def block_seed(seed: int, stream: int, block: int) -> int:
    """Seed of block ``block`` of stream ``stream`` of the input whose seed is ``seed``."""
    return _splitmix64(_splitmix64(int(seed) ^ (int(stream) << 56)) ^ int(block)) >> 1


def blocks(start: int, stop: int, block_size: int) -> Iterator[tuple[int, int, int]]:
    """``(block, lo, hi)`` for every block that meets ``[start, stop)``; ``[lo, hi)`` is the part inside the block."""
    if start >= stop:
        return
    for b in range(start // block_size, -(-stop // block_size)):
        lo = max(start, b * block_size) - b * block_size
        hi = min(stop, (b + 1) * block_size) - b * block_size
        yield b, lo, hi


def noise_block(
    seed: int, stream: int, block: int, shape: tuple[int, ...], block_size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The standard-normal noise of one whole block, shape ``(block_size, *shape)``, float32 on the CPU."""
    gen = torch.Generator().manual_seed(block_seed(seed, stream, block))
    return torch.randn((block_size, *shape), generator=gen, dtype=torch.float32, out=out)


def sample_noise(
    seed: int,
    stream: int,
    start: int,
    stop: int,
    shape: tuple[int, ...],
    sigma: float,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """Noise samples ``start .. stop-1`` of one input's stream, scaled by ``sigma``: shape ``(stop-start, *shape)``."""
    parts = [noise_block(seed, stream, b, shape, block_size)[lo:hi] for b, lo, hi in blocks(start, stop, block_size)]
    if not parts:
        return torch.empty((0, *shape))
    return torch.cat(parts).mul_(sigma)
