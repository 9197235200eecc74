"""Replayable noise: any prefix or range of an input's samples is the same bits whatever the chunking."""

import numpy as np
import pytest
import torch

from approxtune.noise import Stream, blocks, input_seeds, noise_block, sample_noise

SHAPE = (1, 5, 3)  # 15 elements per sample: not a multiple of torch's 16-element generation granularity


@pytest.mark.parametrize("block_size", [1, 7, 64])
@pytest.mark.parametrize("chunk", [1, 5, 16, 33, 100, 1000])
def test_any_chunking_gives_the_same_samples(block_size, chunk):
    seed = int(input_seeds(3, [42])[0])
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
    seed = int(input_seeds(0, [7])[0])
    full = sample_noise(seed, Stream.ESTIMATION, 0, 300, SHAPE, 1.0)
    assert torch.equal(sample_noise(seed, Stream.ESTIMATION, 0, m, SHAPE, 1.0), full[:m])


def test_a_single_generator_is_not_replayable_in_chunks():
    """Why blocks exist: one generator drawn in chunks whose element count is not a multiple of 16 drifts."""
    g = torch.Generator().manual_seed(0)
    whole = torch.randn((10, *SHAPE), generator=g)
    g = torch.Generator().manual_seed(0)
    chunks = torch.cat([torch.randn((1, *SHAPE), generator=g) for _ in range(10)])
    assert not torch.equal(whole, chunks)


def test_streams_inputs_and_run_seeds_differ():
    s = input_seeds(0, [0, 1])
    a = sample_noise(int(s[0]), Stream.SELECTION, 0, 10, SHAPE, 1.0)
    b = sample_noise(int(s[0]), Stream.ESTIMATION, 0, 10, SHAPE, 1.0)
    c = sample_noise(int(s[1]), Stream.ESTIMATION, 0, 10, SHAPE, 1.0)
    assert not torch.equal(a, b) and not torch.equal(b, c)
    assert input_seeds(0, [5])[0] != input_seeds(1, [5])[0]
    assert input_seeds(0, [5])[0] == input_seeds(0, [9, 5])[1], "an input's seed depends only on (run seed, id)"


def test_noise_is_standard_normal_scaled_by_sigma():
    seed = int(input_seeds(0, [0])[0])
    x = sample_noise(seed, Stream.ESTIMATION, 0, 4000, (1, 4, 4), 0.5).numpy().ravel()
    assert abs(x.mean()) < 0.01 and abs(x.std() - 0.5) < 0.01
    assert np.all(np.isfinite(x))


def test_blocks_cover_the_range_exactly():
    assert list(blocks(0, 10, 4)) == [(0, 0, 4), (1, 0, 4), (2, 0, 2)]
    assert list(blocks(5, 9, 4)) == [(1, 1, 4), (2, 0, 1)]
    assert list(blocks(3, 3, 4)) == []


def test_noise_block_writes_into_out():
    out = torch.empty((8, *SHAPE))
    got = noise_block(1, 1, 2, SHAPE, 8, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, noise_block(1, 1, 2, SHAPE, 8))
