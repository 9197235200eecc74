"""Layer sensitivity, measured once per study: what each single layer choice costs f, and a prediction from it.

**What is measured.**  For every searched layer ``l`` and every choice of the search space that changes it alone --
each precision other than fp32 (unpruned), each pruning amount above 0 (fp32) -- the model ``f_lc`` (f with only that
change) runs on a small fixed set of noise samples: the first ``search.guide_samples`` *guide positions* of every
search input whose cached ``c_hat`` is its label and on which f predicts ``c_hat`` more often than not there.  Kept:
which of those samples ``f_lc`` *loses* (``f = c_hat != f_lc``, what IRS's zeta counts) and ``f_lc``'s class on every
clean search input.  f's own classes on the guide positions are in the cache, so only ``f_lc``'s forward passes are
paid: ``choices x (rows x guide_samples + search inputs)`` in all (:attr:`Sensitivity.samples`).

**Guide positions** are cached estimation samples that no IRS replay ever reads: the tail ``[n - n_tail, n)`` in tail
mode (which IRS never replays), ``[n_p, n)`` in the other modes (IRS replays the first ``n_p``).  Where they are too
few (``n_p`` close to ``n`` outside tail mode), the guide draws noise stream FRESH of the search inputs instead, which
no cache or certificate of them uses, and pays f's forward passes there too (``FRESH_F_SAMPLES`` per input, for f's
frequency of ``c_hat``).

**Why the guide spends no confidence and biases no certificate.**  Everything the guide reads -- the inputs, their
labels, ``c_hat`` (from the independent selection stream), f's and the ``f_lc``'s classes on guide positions, clean
predictions -- is independent of the noise samples that any trial's certificate replays: those are other positions
of the same i.i.d. stream.  Conditionally on what the guide read, a trial's replayed samples are therefore still
i.i.d., and its zeta and direct bounds keep their levels *whichever* ``f^p`` the guide chose to certify; the base
bound's failure event does not depend on ``f^p`` at all.  In tail mode the guide's data are part of the tail that
the tail argument of :mod:`approxtune.irs` conditions on.  So choosing which ``f^p`` to certify from the
sensitivities biases no reported certificate, and the guide itself certifies nothing.  (Had the guide read the
replayed samples, it would favour configurations whose losses happen to fall outside them -- exactly the
configurations whose zeta bound on those samples is too optimistic.)  What the guide does not remove is the selection
effect every sampler has: a search that proposes from earlier trials' results (NSGA-II, TPE, and the guide's own
refinement around the observed front) chooses ``f^p`` from certificates computed on the replayed samples, which is
why ``approxtune export`` certifies the chosen model again on held-out inputs.

**Prediction** (:meth:`Sensitivity.predict`).  For a configuration, an input's lost samples are predicted as the
union of those its changed layers' choices lose alone (a precision and a pruning amount of one layer are two
changes): samples near f's decision boundary are the ones every change loses, so losses overlap rather than add.  The
rate of each input is shrunk halfway to the mean over inputs, as tail mode's pilot does, and its radius is the larger
of tail mode's plausible direct and zeta radii (:func:`approxtune.irs.plausible_radii`) at ``n_p`` samples with f's
frequency of ``c_hat`` on the guide positions; the ACR is their mean over all search inputs.  The predicted clean
class of an input is f's, replaced by each changed choice's where that one differs.  Size needs no prediction.  The
prediction only ranks configurations for the search; it is never reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from approxtune.approximation import ApproximationConfig, LayerChoice, apply_approximation
from approxtune.cache import BaseCache
from approxtune.certification import DEFAULT_BATCH_SIZE, clean_classes, predict_under_noise
from approxtune.data import Inputs
from approxtune.irs import IRSSettings, Mode, plausible_radii
from approxtune.locking import file_lock, remove_leftovers, temporary_name
from approxtune.noise import Stream

__all__ = [
    "FORMAT_VERSION",
    "Sensitivity",
    "ensure_sensitivity",
    "guide_positions",
    "measure",
    "sensitivity_path",
    "single_choices",
]

FORMAT_VERSION = 1
FRESH_F_SAMPLES = 64
"""Samples per input of f on stream FRESH (when no cached sample is free) that give f's frequency of c_hat."""


def single_choices(precisions: Sequence[str], prune: Sequence[float]) -> list[LayerChoice]:
    """The choices that change a layer in one way: each precision but fp32 unpruned, each amount > 0 in fp32."""
    return [LayerChoice(p, 0.0) for p in precisions if p != "fp32"] + [LayerChoice("fp32", a) for a in prune if a > 0]


def guide_positions(settings: IRSSettings, n: int, samples: int) -> tuple[Stream, int]:
    """Where the guide measures ``samples`` per input: ``(ESTIMATION, first position no replay reads)`` -- ``n -
    n_tail`` in tail mode, ``n_p`` otherwise -- when they fit in the cache's ``n``, else ``(FRESH, 0)``."""
    start = n - settings.tail_length(n) if settings.mode is Mode.TAIL else settings.n_p
    return (Stream.ESTIMATION, start) if start + samples <= n else (Stream.FRESH, 0)


@dataclass(frozen=True)
class Sensitivity:
    """What every single-layer choice loses (see the module docstring) and the prediction built on it."""

    key: dict
    """What the measurement depends on: cache metadata, layers, search space, guide positions (checked on reuse)."""
    rows: np.ndarray
    """Cache rows measured (c_hat is the label, f's frequency of c_hat on the guide positions above 1/2)."""
    q: np.ndarray
    """f's frequency of c_hat on all guide positions of each row."""
    labels: np.ndarray
    base_clean: np.ndarray
    """f's class on every clean search input."""
    lost: dict[tuple[str, LayerChoice], np.ndarray]
    """(layer, choice) -> bool (rows, guide_samples): the samples that choice alone loses."""
    clean: dict[tuple[str, LayerChoice], np.ndarray]
    """(layer, choice) -> that choice's class on every clean search input."""
    samples: int
    """Forward passes the measurement cost."""
    seconds: float
    """Seconds the measurement took."""

    @property
    def layers(self) -> list[str]:
        return list(self.key["layers"])

    @property
    def base_accuracy(self) -> float:
        return float(np.mean(self.base_clean == self.labels)) if len(self.labels) else 0.0

    def lost_by(self, config: ApproximationConfig) -> np.ndarray:
        """The predicted lost samples of ``config``: the union over its layers' single changes."""
        out = np.zeros(self.lost_shape, dtype=bool)
        for name, choice in config.layers.items():
            for part in _parts(choice):
                out |= self.lost[(name, part)]
        return out

    @property
    def lost_shape(self) -> tuple[int, int]:
        return (len(self.rows), int(self.key["samples"]))

    def predict(self, config: ApproximationConfig, settings: IRSSettings) -> tuple[float, float]:
        """Predicted ``(ACR, clean accuracy)`` of ``config`` under ``settings`` (a guide, not a certificate)."""
        if config.global_prune:
            raise ValueError("the sensitivities predict per-layer choices only, not global pruning")
        meta = self.key["cache"]
        classes = self.base_clean.copy()
        for name, choice in config.layers.items():
            for part in _parts(choice):
                other = self.clean[(name, part)]
                changed = other != self.base_clean
                classes[changed] = other[changed]
        accuracy = float(np.mean(classes == self.labels)) if len(self.labels) else 0.0
        if not len(self.rows):
            return 0.0, accuracy
        rate = self.lost_by(config).mean(axis=1)
        rate = (rate + rate.mean()) / 2.0
        direct, zeta = plausible_radii(
            self.q,
            settings.n_p,
            n=meta["n"],
            alpha=meta["alpha"],
            alpha_zeta=settings.alpha_zeta,
            alpha_d=settings.alpha_d,
            sigma=meta["sigma"],
            d=rate,
        )
        return float(np.maximum(direct, zeta).sum() / meta["num_inputs"]), accuracy

    def to_json(self) -> str:
        variants = []
        for (name, choice), lost in self.lost.items():
            clean = self.clean[(name, choice)]
            changed = np.flatnonzero(clean != self.base_clean)
            variants.append(
                {
                    "layer": name,
                    "precision": choice.precision,
                    "prune": choice.prune,
                    "lost": np.flatnonzero(lost).tolist(),
                    "changed": changed.tolist(),
                    "changed_to": clean[changed].tolist(),
                }
            )
        data = {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "rows": self.rows.tolist(),
            "q": self.q.tolist(),
            "labels": self.labels.tolist(),
            "base_clean": self.base_clean.tolist(),
            "samples": self.samples,
            "seconds": self.seconds,
            "variants": variants,
        }
        return json.dumps(data) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Sensitivity:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sensitivity format {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        rows, base = np.asarray(data["rows"], dtype=np.int64), np.asarray(data["base_clean"], dtype=np.int64)
        shape = (len(rows), int(data["key"]["samples"]))
        lost, clean = {}, {}
        for v in data["variants"]:
            key = (v["layer"], LayerChoice(v["precision"], v["prune"]))
            mask = np.zeros(shape[0] * shape[1], dtype=bool)
            mask[np.asarray(v["lost"], dtype=np.int64)] = True
            lost[key] = mask.reshape(shape)
            classes = base.copy()
            classes[np.asarray(v["changed"], dtype=np.int64)] = np.asarray(v["changed_to"], dtype=np.int64)
            clean[key] = classes
        return cls(
            key=data["key"],
            rows=rows,
            q=np.asarray(data["q"], dtype=np.float64),
            labels=np.asarray(data["labels"], dtype=np.int64),
            base_clean=base,
            lost=lost,
            clean=clean,
            samples=int(data["samples"]),
            seconds=float(data["seconds"]),
        )


def _parts(choice: LayerChoice) -> list[LayerChoice]:
    """The single changes a layer choice is made of (none for fp32 unpruned)."""
    parts = [LayerChoice(choice.precision, 0.0)] if choice.precision != "fp32" else []
    return parts + ([LayerChoice("fp32", choice.prune)] if choice.prune > 0 else [])


def measurement_key(
    cache: BaseCache,
    layers: Sequence[str],
    precisions: Sequence[str],
    prune: Sequence[float],
    settings: IRSSettings,
    samples: int,
) -> dict:
    """What a measurement depends on (positions from :func:`guide_positions`); a stored one is reused only when its
    key is equal."""
    stream, start = guide_positions(settings, cache.meta.n, samples)
    return {
        "cache": json.loads(cache.meta.to_json()),
        "layers": list(layers),
        "choices": [[c.precision, c.prune] for c in single_choices(precisions, prune)],
        "stream": stream.name.lower(),
        "start": start,
        "samples": int(samples),
    }


def measure(
    model: nn.Module,
    inputs: Inputs,
    cache: BaseCache,
    key: dict,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> Sensitivity:
    """Measure every single-layer choice of ``key`` (:func:`measurement_key`) at its guide positions.

    ``inputs``: the cache's own search inputs, in its order (anything else is refused); ``progress`` is called with 1
    after each choice.
    """
    cache.check_inputs(inputs)
    x = inputs.x
    started = time.perf_counter()
    n, start, m = cache.meta.n, key["start"], key["samples"]
    stream = Stream[key["stream"].upper()]
    kwargs = {"batch_size": batch_size, "block_size": cache.meta.block_size, "device": device}
    labelled = np.flatnonzero(cache.c_hat == cache.label)
    if stream is Stream.ESTIMATION:  # f's classes there are cached
        if not 0 <= start < start + m <= n:
            raise ValueError(f"guide positions [{start}, {start + m}) do not fit in the cache's n = {n} samples")
        f_guide = np.asarray(cache.predictions[labelled, start:n]) == cache.c_hat[labelled, None]
        paid = 0
    else:
        width = max(m, FRESH_F_SAMPLES)
        x_labelled = x[torch.as_tensor(labelled, dtype=torch.long)]
        preds = predict_under_noise(
            model, x_labelled, cache.seed[labelled], stream, start, start + width, cache.meta.sigma, **kwargs
        )
        f_guide = preds == cache.c_hat[labelled, None]
        paid = len(labelled) * width
    q_all = f_guide.mean(axis=1)
    keep = q_all > 0.5
    rows, f_hit = labelled[keep], f_guide[keep, :m]
    c_hat = cache.c_hat[rows, None]
    x_rows = x[torch.as_tensor(rows, dtype=torch.long)]
    base_clean = clean_classes(model, x, device)
    lost, clean = {}, {}
    for name in key["layers"]:
        for precision, amount in key["choices"]:
            choice = LayerChoice(precision, amount)
            approx = apply_approximation(model, ApproximationConfig({name: choice})).to(device)
            preds = predict_under_noise(
                approx, x_rows, cache.seed[rows], stream, start, start + m, cache.meta.sigma, **kwargs
            )
            lost[(name, choice)] = f_hit & (preds != c_hat)
            clean[(name, choice)] = clean_classes(approx, x, device)
            if progress is not None:
                progress(1)
    variants = len(key["layers"]) * len(key["choices"])
    return Sensitivity(
        key=key,
        rows=rows,
        q=q_all[keep],
        labels=np.asarray(cache.label, dtype=np.int64),
        base_clean=base_clean,
        lost=lost,
        clean=clean,
        samples=variants * (len(rows) * m + len(x)) + paid,
        seconds=time.perf_counter() - started,
    )


def sensitivity_path(cache_path: Path, key: dict) -> Path:
    """``<cache name>.sensitivity-<hash of key>.json`` beside the base cache."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return cache_path.with_name(f"{cache_path.name.removesuffix('.cache')}.sensitivity-{digest}.json")


def ensure_sensitivity(cache_path: Path, key: dict, measure_now: Callable[[], Sensitivity]) -> tuple[Sensitivity, bool]:
    """The stored measurement of ``key`` beside the cache at ``cache_path``, or ``measure_now()`` written there
    atomically; and whether it was measured now.

    A file of another key or format, or an unreadable one, is measured again.  Processes starting at once take turns
    (the lock file ``<file>.lock``), so one measures and the others read what it wrote; what a killed measurement left
    is removed.
    """
    path = sensitivity_path(cache_path, key)
    with file_lock(path.with_name(f"{path.name}.lock")):
        remove_leftovers(path.parent, re.escape(path.name))
        try:
            stored = Sensitivity.from_json(path.read_text())
            if stored.key == key:
                return stored, False
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):  # measured again
            pass
        result = measure_now()
        tmp = temporary_name(path)
        tmp.write_text(result.to_json())
        os.replace(tmp, path)
        return result, True
