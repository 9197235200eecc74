"""The guided search: layer sensitivities predict every configuration, and each trial certifies the one predicted to
add the most to the front (``search.sampler = "guided"``).

:class:`Guide` predicts a configuration's ``(ACR, accuracy)`` from the measured sensitivities
(:meth:`approxtune.sensitivity.Sensitivity.predict`); its size is exact (per-layer bytes add up,
:func:`approxtune.approximation.model_size_bytes`).  :class:`GuidedSampler` proposes, at every trial, the
configuration not yet tried whose predicted values add the most hypervolume (:mod:`approxtune.hypervolume`) to the
front of the complete feasible trials so far.  The candidates are

* the *predicted front*: for a grid of weights ``(lam, mu)``, the configuration that minimises
  ``size / fp32 size + lam * (ACR lost) / base ACR + mu * (accuracy lost)`` with each layer's losses predicted alone
  (a sum over layers, so each layer picks its own choice), computed once;
* every configuration one layer choice away from a configuration on the observed front (refinement).

Each prediction is first corrected by the error it made on the nearest complete trial (fewest layers chosen
differently): ACR by their ratio, accuracy by their difference.  When no candidate is predicted to add more than
:data:`MIN_GAIN` of the front's hypervolume (gains that small are within the prediction's error, and certifying
near-twins of front members is what wastes trials once the front is found), a random untried neighbour of the
observed front is proposed instead (exploration), and a random configuration when there is none.  With several
workers, a configuration another worker is running counts as tried, and of two trials choosing at the same moment the
later one takes the next-best proposal.

The prediction only chooses which configuration to certify next: every trial is certified by IRS in full, or stopped
by racing's sound bound, exactly as with the other samplers, and the sensitivities read no sample that a certificate
replays (:mod:`approxtune.sensitivity` says why that biases no certificate).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from approxtune.approximation import ApproximationConfig, LayerChoice, fp32_size_bytes, model_size_bytes
from approxtune.cache import BaseCache
from approxtune.config import Study
from approxtune.data import Inputs
from approxtune.hypervolume import STUDY_REFERENCE, hypervolume, to_loss
from approxtune.irs import IRSSettings
from approxtune.sensitivity import (
    Sensitivity,
    ensure_sensitivity,
    measure,
    measurement_key,
    single_choices,
)
from approxtune.trials import dominates, feasible

__all__ = ["Guide", "GuidedSampler", "build_guide", "guide_variants"]

WEIGHTS = np.concatenate([[0.0], np.logspace(-2, 3, 26)])
"""The grid of ``lam`` and of ``mu`` that the predicted front is computed for."""

MIN_GAIN = 1e-3
"""Smallest predicted gain, as a share of the observed front's hypervolume, that a proposal must promise."""

Key = tuple[int, ...]
"""A configuration as the index of its choice in :attr:`Guide.choices`, one per layer."""


class Guide:
    """Predicted values of configurations of one search space, and the candidates the guided search proposes from.

    ``precisions`` and ``prune`` are the search space (``search.precisions``, ``search.prune``); ``base_acr`` scales
    the ACR axis of the hypervolume as the benchmarks do (the base model's ACR).
    """

    def __init__(
        self,
        sensitivity: Sensitivity,
        model: nn.Module,
        settings: IRSSettings,
        precisions: Sequence[str],
        prune: Sequence[float],
        base_acr: float,
    ) -> None:
        self.sensitivity, self.settings = sensitivity, settings
        self.layers = sensitivity.layers
        self.choices = [LayerChoice(p, a) for p in precisions for a in prune]
        self.fp32_size = fp32_size_bytes(model)
        self.base_acr = base_acr if base_acr > 0 else 1.0
        # Bytes each layer choice adds to (or saves from) the fp32 size: sizes add up over layers.
        self.layer_bytes = np.array(
            [
                [model_size_bytes(model, ApproximationConfig({name: c})) - self.fp32_size for c in self.choices]
                for name in self.layers
            ],
            dtype=np.int64,
        )
        self._predicted: dict[Key, tuple[float, float]] = {}
        self._pool: list[Key] | None = None

    # ---------------------------------------------------------------------------------------- configurations

    def config(self, key: Key) -> ApproximationConfig:
        return ApproximationConfig({name: self.choices[j] for name, j in zip(self.layers, key, strict=True)})

    def key(self, params: dict) -> Key | None:
        """The key of a trial's parameters (``<layer>.precision``, ``<layer>.prune``), None if incomplete or foreign."""
        try:
            return tuple(
                self.choices.index(LayerChoice(params[f"{name}.precision"], params[f"{name}.prune"]))
                for name in self.layers
            )
        except (KeyError, ValueError):
            return None

    def params(self, key: Key) -> dict:
        """The trial parameters of ``key``."""
        out = {}
        for name, j in zip(self.layers, key, strict=True):
            out[f"{name}.precision"] = self.choices[j].precision
            out[f"{name}.prune"] = self.choices[j].prune
        return out

    def distributions(self) -> dict[str, BaseDistribution]:
        precisions = list(dict.fromkeys(c.precision for c in self.choices))
        prune = list(dict.fromkeys(c.prune for c in self.choices))
        out: dict[str, BaseDistribution] = {}
        for name in self.layers:
            out[f"{name}.precision"] = CategoricalDistribution(precisions)
            out[f"{name}.prune"] = CategoricalDistribution(prune)
        return out

    def size(self, key: Key) -> int:
        return int(self.fp32_size + self.layer_bytes[np.arange(len(key)), list(key)].sum())

    def predict(self, key: Key) -> tuple[float, float, int]:
        """Predicted ``(ACR, accuracy)`` and the exact size of ``key`` (memoised)."""
        if key not in self._predicted:
            self._predicted[key] = self.sensitivity.predict(self.config(key), self.settings)
        return (*self._predicted[key], self.size(key))

    # -------------------------------------------------------------------------------------------- candidates

    def predicted_front(self) -> list[Key]:
        """The configurations that minimise the weighted sum of size and per-layer predicted losses (module doc)."""
        if self._pool is None:
            fp32 = self.choices.index(LayerChoice("fp32", 0.0)) if LayerChoice("fp32", 0.0) in self.choices else None
            base = self.predict(tuple([fp32] * len(self.layers))) if fp32 is not None else None
            base_acr, base_accuracy = (base[0], base[1]) if base else (self.base_acr, self.sensitivity.base_accuracy)
            lost_acr = np.zeros(self.layer_bytes.shape)
            lost_accuracy = np.zeros(self.layer_bytes.shape)
            for i, name in enumerate(self.layers):
                for j, choice in enumerate(self.choices):
                    acr, accuracy = self.sensitivity.predict(ApproximationConfig({name: choice}), self.settings)
                    lost_acr[i, j], lost_accuracy[i, j] = max(base_acr - acr, 0.0), max(base_accuracy - accuracy, 0.0)
            pool = {}
            for lam, mu in itertools.product(WEIGHTS, WEIGHTS):
                cost = self.layer_bytes / self.fp32_size + lam * lost_acr / self.base_acr + mu * lost_accuracy
                pool[tuple(int(j) for j in cost.argmin(axis=1))] = None
            self._pool = list(pool)
        return self._pool

    def neighbours(self, key: Key) -> list[Key]:
        """Every configuration that differs from ``key`` in one layer's choice."""
        out = []
        for i in range(len(key)):
            for j in range(len(self.choices)):
                if j != key[i]:
                    out.append((*key[:i], j, *key[i + 1 :]))
        return out

    def propose(self, observed: list[tuple[Key, tuple[float, float, int]]], taken: set[Key], rng, skip: int = 0) -> Key:
        """The untried configuration predicted to add the most hypervolume to the front of ``observed``.

        ``observed``: complete feasible trials (key, values); ``taken``: every configuration tried or running;
        ``skip``: how many of the best proposals to leave to other workers' trials that are choosing at this moment.
        """
        front = _front(observed)
        candidates = [k for k in dict.fromkeys([*self.predicted_front(), *_around(self, front)]) if k not in taken]
        if candidates:
            values = self._corrected(candidates, observed)
            points = to_loss(values, self.base_acr, self.fp32_size)
            base = to_loss([v for _, v in front], self.base_acr, self.fp32_size)
            before = hypervolume(base, STUDY_REFERENCE)
            gains = np.full(len(points), -np.inf)
            for i, point in enumerate(points):
                if not np.any(np.all(base <= point, axis=1)):  # not dominated by (or equal to) a front member
                    gains[i] = hypervolume(np.vstack([base, point[None, :]]), STUDY_REFERENCE) - before
            promising = np.flatnonzero(gains > MIN_GAIN * before)
            if len(promising) > skip and skip == 0:  # the best, ties broken at random
                return candidates[int(rng.choice(np.flatnonzero(gains == gains.max())))]
            if len(promising) > skip:
                return candidates[int(promising[np.argsort(-gains[promising], kind="stable")][skip])]
        untried = [k for k in _around(self, front) if k not in taken]
        if untried:
            return untried[int(rng.integers(len(untried)))]
        return tuple(int(j) for j in rng.integers(len(self.choices), size=len(self.layers)))

    def _corrected(self, keys: list[Key], observed: list[tuple[Key, tuple[float, float, int]]]) -> list[tuple]:
        """Predicted values of ``keys``, each corrected by the error made on the nearest observed configuration."""
        raw = np.array([self.predict(k) for k in keys], dtype=np.float64)
        if not observed:
            return [tuple(r) for r in raw]
        seen = np.array([k for k, _ in observed])
        actual = np.array([v for _, v in observed], dtype=np.float64)
        predicted = np.array([self.predict(k) for k, _ in observed], dtype=np.float64)
        ratio = np.where(predicted[:, 0] > 0, actual[:, 0] / np.maximum(predicted[:, 0], 1e-12), 1.0)
        shift = actual[:, 1] - predicted[:, 1]
        nearest = (np.array(keys)[:, None, :] != seen[None, :, :]).sum(axis=2).argmin(axis=1)
        raw[:, 0] *= ratio[nearest]
        raw[:, 1] += shift[nearest]
        return [tuple(r) for r in raw]


def _front(observed: list[tuple[Key, tuple[float, float, int]]]) -> list[tuple[Key, tuple[float, float, int]]]:
    return [(k, v) for k, v in observed if not any(dominates(w, v) for _, w in observed)]


def _around(guide: Guide, front: list[tuple[Key, tuple[float, float, int]]]) -> list[Key]:
    return [n for k, _ in front for n in guide.neighbours(k)]


class GuidedSampler(optuna.samplers.BaseSampler):
    """Optuna sampler of the guided search (module docstring); parameters outside the guide's space are random."""

    def __init__(self, guide: Guide, seed: int | None = None) -> None:
        self.guide = guide
        self._rng = np.random.default_rng(seed)
        self._independent = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self._independent.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.guide.distributions()

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict:
        if not search_space:
            return {}
        observed, taken, choosing = [], set(), 0
        for t in study.get_trials(deepcopy=False):
            if t.number == trial.number or t.state == TrialState.FAIL:
                continue
            key = self.guide.key({**t.params, **t.system_attrs.get("fixed_params", {})})
            if key is None:  # an earlier trial of another worker that has not chosen yet: it takes a better proposal
                choosing += t.state == TrialState.RUNNING and t.number < trial.number
                continue
            taken.add(key)
            if t.state == TrialState.COMPLETE and feasible(t):
                observed.append((key, tuple(t.values)))
        return self.guide.params(self.guide.propose(observed, taken, self._rng, skip=choosing))

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ):
        return self._independent.sample_independent(study, trial, param_name, param_distribution)


def guide_variants(study: Study, layers: Sequence[str]) -> int:
    """How many single-layer choices :func:`build_guide` measures."""
    return len(layers) * len(single_choices(study.search.precisions, study.search.prune))


def build_guide(
    study: Study,
    model: nn.Module,
    inputs: Inputs,
    cache: BaseCache,
    layers: Sequence[str],
    *,
    device: torch.device | str = "cpu",
    progress: Callable[[int], AbstractContextManager[Callable[[int], None]]] | None = None,
) -> tuple[Guide, bool]:
    """The study's guide: its sensitivities stored beside the search cache, or measured now; and whether they were.

    ``inputs``: the cache's search inputs; ``layers``: the searched layers.  ``progress(total)``, only when the
    sensitivities are measured, opens a progress display and gives ``advance(count)``.
    """
    settings, space = study.irs_settings, study.search
    key = measurement_key(cache, layers, space.precisions, space.prune, settings, space.guide_samples)

    def measure_now() -> Sensitivity:
        with progress(guide_variants(study, layers)) if progress is not None else nullcontext() as advance:
            return measure(
                model, inputs, cache, key, batch_size=study.certify.batch_size, device=device, progress=advance
            )

    sensitivity, measured = ensure_sensitivity(study.cache_path("search"), key, measure_now)
    guide = Guide(sensitivity, model, settings, space.precisions, space.prune, float(cache.summary()["acr"]))
    return guide, measured
