"""Sampling under noise and Cohen et al.'s CERTIFY (Algorithm 1 of the IRS paper).

The hot loop — noise, forward pass, argmax, counts — is batched across samples *and* inputs: the noise blocks of a
batch (of consecutive inputs) are drawn in one vectorised call and written side by side into one preallocated batch,
so a small model runs at close to its bare forward-pass throughput however few samples each input needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from approxtune.noise import DEFAULT_BLOCK_SIZE, Stream, blocks, normal_blocks
from approxtune.statistics import lower_confidence_bound, radius

__all__ = ["DEFAULT_BATCH_SIZE", "CertifyResult", "certify", "class_dtype", "clean_classes", "predict_under_noise"]

DEFAULT_BATCH_SIZE = 512
NOISE_CHUNK = 1 << 18
"""Noise is drawn for whole batches at a time, at least this many numbers per call: small inputs (the digits' 64
numbers) would otherwise pay the generator's fixed cost per call on every batch."""

Piece = tuple[int, int, int, int, int, int]
"""A run of one input's noise samples in a batch: (input, first column, offset in the batch, block, lo, hi)."""

Progress = Callable[[int], None]
"""Called with the number of noise samples just evaluated."""


def class_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds every class index."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_classes <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"too many classes: {num_classes}")


def clean_classes(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device | str = "cpu"
) -> np.ndarray:
    """``model``'s class (int64) on each unperturbed input of ``x``, in batches of 1024; an ``nn.Module`` is put in
    eval mode, any other function from a batch to logits is called as it is."""
    if isinstance(model, nn.Module):
        model.eval()
    with torch.inference_mode():
        chunks = [model(x[i : i + 1024].to(device)).argmax(1).cpu() for i in range(0, len(x), 1024)]
    return torch.cat(chunks).numpy().astype(np.int64) if chunks else np.zeros(0, np.int64)


def _per_input(value: int | np.ndarray, count: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value, dtype=np.int64), (count,))
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative")
    return arr


def predict_under_noise(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    seeds: np.ndarray,
    stream: int,
    start: int | np.ndarray,
    stop: int | np.ndarray,
    sigma: float,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """``model``'s predicted class on noise samples ``start .. stop-1`` of every input.

    Sample ``j`` of input ``i`` is ``inputs[i] + sigma * eps_j`` (float32) with ``eps_j`` from :mod:`approxtune.noise`
    (stream ``stream``, seed ``seeds[i]``, two words), the same bits on any machine.  ``start`` and ``stop`` are scalars
    or one value per input.  Returns an array of shape ``(len(inputs), max(stop - start))`` of the smallest unsigned
    type that holds the class count; entries past an input's own range are 0.  ``model`` is any function from a batch
    to its logits; an ``nn.Module`` is put in eval mode and runs on its parameters' device unless ``device`` is given.
    """
    n_inputs = len(inputs)
    starts = _per_input(start, n_inputs, "start")
    stops = _per_input(stop, n_inputs, "stop")
    if np.any(stops < starts):
        raise ValueError("stop must not be smaller than start")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    width = int(np.max(np.asarray(stop) - np.asarray(start), initial=0))
    shape = tuple(inputs.shape[1:])
    if isinstance(model, nn.Module):
        device = torch.device(device) if device is not None else next(model.parameters()).device
        model.eval()
    device = torch.device(device or "cpu")

    inputs_cpu = inputs.detach().to("cpu", torch.float32)
    count = block_size * int(np.prod(shape, dtype=np.int64))
    buf = torch.empty((batch_size + block_size, *shape), dtype=torch.float32)
    pieces: list[Piece] = []  # of the batch being filled
    waiting: list[list[Piece]] = []  # full batches whose noise is drawn together, NOISE_CHUNK numbers or more
    fill = 0
    out: np.ndarray | None = None
    # x + sigma * eps is computed with numpy on views of the same memory, one IEEE float32 operation per ufunc call
    # (so the same bits on every CPU: no fused or approximate SIMD arithmetic), and numpy's elementwise ops stay on
    # this thread, while torch splits a block of more than 32k numbers (64 CIFAR samples) across its thread pool,
    # which stalls whenever another process holds a core.
    buf_np, inputs_np = buf.numpy(), inputs_cpu.numpy()
    scale = np.float32(sigma)

    def forward(batch: list[Piece], eps: np.ndarray) -> None:
        """Fill the buffer with ``batch``'s noisy samples (``eps``: its blocks' noise, in order), classify them."""
        nonlocal out
        size = 0
        for (i, _, off, _, lo, hi), noise in zip(batch, eps, strict=True):
            dest = buf_np[off : off + hi - lo]
            np.multiply(noise[lo:hi], scale, out=dest)
            np.add(dest, inputs_np[i], out=dest)
            size = off + hi - lo
        logits = model(buf[:size].to(device, non_blocking=True))
        preds = logits.argmax(dim=1).cpu().numpy()
        if out is None:
            out = np.zeros((n_inputs, width), dtype=class_dtype(logits.shape[1]))
        for i, col, off, _, lo, hi in batch:
            out[i, col : col + hi - lo] = preds[off : off + hi - lo]
        if progress is not None:
            progress(size)

    def run_waiting() -> None:
        """Draw the noise of every waiting batch in one call (a vectorised pass over many blocks), then run them."""
        every = [p for batch in waiting for p in batch]
        if not every:
            return
        eps = normal_blocks(seeds[[p[0] for p in every]], stream, np.array([p[3] for p in every]), count)
        eps = eps.reshape((len(every), block_size, *shape))
        first = 0
        for batch in waiting:
            forward(batch, eps[first : first + len(batch)])
            first += len(batch)
        waiting.clear()

    with torch.inference_mode():
        for i in range(n_inputs):
            col = 0
            for block, lo, hi in blocks(int(starts[i]), int(stops[i]), block_size):
                pieces.append((i, col, fill, block, lo, hi))
                fill += hi - lo
                col += hi - lo
                if fill >= batch_size:
                    waiting.append(pieces)
                    pieces, fill = [], 0
                    if sum(map(len, waiting)) * count >= NOISE_CHUNK:
                        run_waiting()
        if pieces:
            waiting.append(pieces)
        run_waiting()
    if out is None:  # nothing was sampled
        with torch.inference_mode():
            num_classes = model(inputs_cpu[:1].to(device)).shape[1] if n_inputs else 2
        out = np.zeros((n_inputs, width), dtype=class_dtype(num_classes))
    return out


@dataclass
class CertifyResult:
    """Per-input outcome of CERTIFY.

    ``c_hat``: the class chosen from the selection samples; ``count``: how many of the ``n`` estimation samples
    ``f`` assigned to it; ``p_a``: the ``1 - alpha`` lower bound on ``P(f(x + eps) = c_hat)``; ``radius``:
    ``sigma * Phi^-1(p_a)``, 0 where CERTIFY abstains (``p_a <= 1/2``), whatever the label;
    ``predictions``: ``f``'s class on every estimation sample.
    """

    c_hat: np.ndarray
    count: np.ndarray
    p_a: np.ndarray
    radius: np.ndarray
    predictions: np.ndarray


def certify(
    model: nn.Module,
    inputs: torch.Tensor,
    seeds: np.ndarray,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> CertifyResult:
    """CERTIFY (Cohen et al., 2019) of every input at once; each certificate holds with probability ``>= 1 - alpha``.

    ``n0`` selection samples (stream SELECTION) choose ``c_hat``; ``n`` independent estimation samples (stream
    ESTIMATION) give ``p_a = LowerConfidenceBound(count[c_hat], n, 1 - alpha)``; the radius is ``sigma * Phi^-1(p_a)``
    if ``p_a > 1/2``, otherwise the input is abstained on (radius 0).
    """
    if n0 < 1 or n < 1:
        raise ValueError(f"n0 and n must be at least 1, got n0={n0}, n={n}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must lie in (0, 0.5), got {alpha}")
    kwargs = {"batch_size": batch_size, "block_size": block_size, "device": device, "progress": progress}
    selection = predict_under_noise(model, inputs, seeds, Stream.SELECTION, 0, n0, sigma, **kwargs)
    num_classes = int(np.iinfo(selection.dtype).max) + 1
    counts0 = np.stack([np.bincount(row, minlength=num_classes) for row in selection]) if len(selection) else None
    c_hat = counts0.argmax(axis=1).astype(np.int64) if counts0 is not None else np.zeros(0, np.int64)
    predictions = predict_under_noise(model, inputs, seeds, Stream.ESTIMATION, 0, n, sigma, **kwargs)
    count = (predictions == c_hat[:, None]).sum(axis=1).astype(np.int64)
    p_a = lower_confidence_bound(count, n, alpha) if len(count) else np.zeros(0)
    return CertifyResult(c_hat, count, p_a, radius(p_a, sigma), predictions)
