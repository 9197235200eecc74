"""Study settings: one definition for study files (TOML), nested dicts and the Python API's keywords.

Every section and key, its type, default and meaning is listed in the README ("Study file reference").  A study file
is read with :mod:`tomllib` (:func:`load_study`); :meth:`Study.from_dict` takes the same nested tables as a dict, and
:meth:`Study.from_keywords` the flat keywords of :func:`approxtune.tune` (a key's name, or ``<section>_<key>`` where
two sections share it: ``train_batch_size``, ``certify_batch_size``, ``model_kwargs``, ``data_kwargs``).  All three
build the same :class:`Study` through the same checks.  Relative paths are resolved against the directory approxtune
is run from.  Any problem — malformed TOML, an unknown key (the closest valid one is suggested), a wrong type, a
value out of range or not finite — raises :class:`ConfigError` naming the file (or the keywords), the key and the
fix; the command line turns it into a one-line error and exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from approxtune.accounting import IRSSettings, Mode, Zeta
from approxtune.errors import ApproxtuneError

__all__ = ["ConfigError", "Study", "keyword_table", "load_study"]


class ConfigError(ApproxtuneError):
    """A study file that cannot be used as it is."""


@dataclass(frozen=True)
class StudySection:
    name: str = ""
    """Optuna study name (default: the study file's stem)."""
    output_dir: str = ""
    """Where checkpoints, caches, the study database and plots go (default: runs/<study file stem>)."""
    seed: int = 0
    """Seed of everything random: training, noise, sampler."""


@dataclass(frozen=True)
class ModelSection:
    arch: str = ""
    """A built-in architecture (default: digits-cnn, unless factory or torchvision names the model)."""
    checkpoint: str = ""
    """Checkpoint file (built-in architectures: default <output_dir>/model.pt, trained by `approxtune train` for
    digits-cnn; factory and torchvision models: loaded only when set)."""
    factory: str = ""
    """``package.module:callable`` returning the nn.Module (imported from the study file's folder or sys.path)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the factory."""
    torchvision: str = ""
    """A torchvision classification architecture by name (weights only from checkpoint, never downloaded)."""
    num_classes: int = 0
    """torchvision: the classifier's output classes (0: the architecture's default)."""
    mean: list[float] = field(default_factory=list)
    """torchvision: per-channel mean of a normalisation layer put in front of the network (with std)."""
    std: list[float] = field(default_factory=list)
    """torchvision: per-channel standard deviation of that normalisation layer."""

    @property
    def kind(self) -> str:
        """Where the model comes from: ``factory``, ``torchvision`` or ``builtin``."""
        return "factory" if self.factory else "torchvision" if self.torchvision else "builtin"

    @property
    def builtin_arch(self) -> str:
        """The built-in architecture (``digits-cnn`` when none is named)."""
        return self.arch or "digits-cnn"


@dataclass(frozen=True)
class DataSection:
    dataset: str = "digits"
    root: str = ""
    """Folder or file of a real dataset (not used for digits or python)."""
    loader: str = ""
    """dataset "python": ``package.module:callable`` returning ``(x, y)`` or a torch Dataset of ``(x, y)`` pairs."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the loader."""
    split_seed: int = 0
    search_inputs: int = 200
    report_inputs: int = 200


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.003


@dataclass(frozen=True)
class CertifySection:
    sigma: float = 0.5
    n0: int = 64
    n: int = 10000
    alpha: float = 0.001
    batch_size: int = 512
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""


@dataclass(frozen=True)
class IRSSection:
    n_p: int = 400
    mode: str = "tail"
    zeta: str = "loss"
    """What the zeta bound counts: "loss" (f = c_hat != f^p; never a smaller radius), "disagreement" (the paper) or
    "signed" (losses minus gains, a betting bound)."""
    alpha_zeta: float = 0.001
    alpha_d: float = 0.001
    gamma: float = 0.99
    n_tail: int = 0
    """Tail mode: cached samples kept for decisions, never replayed (0: n // 2)."""
    allocate: bool = True
    """Tail mode: spread n_p x inputs over the inputs where samples buy radius (false: n_p each)."""
    block: int = 16
    """Tail mode: the allocation's step, in samples."""
    pilot: int = 0
    """Tail mode: tail samples per input run through f^p first, paid from n_p."""


@dataclass(frozen=True)
class ConstraintsSection:
    max_accuracy_drop: float = 1.0
    """Largest clean-accuracy drop from the fp32 model a feasible trial may have (fraction, 0..1)."""
    max_size_ratio: float = 1.0
    """Largest model size, as a fraction of the fp32 size, a feasible trial may have."""


@dataclass(frozen=True)
class SearchSection:
    trials: int = 40
    timeout: float = 0.0
    """Seconds; 0 means no time budget."""
    sampler: str = "guided"
    population: int = 10
    """NSGA-II population size (generation size)."""
    precisions: list[str] = field(default_factory=lambda: ["fp32", "fp16", "bf16", "int8", "int4"])
    prune: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.5])
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    baselines: bool = True
    storage: str = ""
    """Optuna storage URL (default: sqlite:///<output_dir>/study.db); a PostgreSQL URL lets workers share the study."""
    heartbeat_interval: int = 30
    """Seconds between the heartbeats a worker records for its running trial."""
    grace_period: int = 90
    """Seconds without a heartbeat after which a running trial is failed and retried by another worker."""
    race: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5])
    """Fractions of a trial's replay after which it stops if it cannot reach the front ([] turns racing off)."""
    guide_samples: int = 8
    """Sampler "guided": noise samples per input on which each single layer choice is measured (never replayed)."""
    constraints: ConstraintsSection = field(default_factory=ConstraintsSection)


SECTIONS: dict[str, type] = {
    "study": StudySection,
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "certify": CertifySection,
    "irs": IRSSection,
    "search": SearchSection,
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
"""The weight precisions of the approximation space (:mod:`approxtune.approximation` implements them)."""
ARCHITECTURES = ("digits-cnn", "cifar_resnet20", "cifar_resnet110", "resnet50")
"""The built-in architectures' names (:data:`approxtune.models.ARCHITECTURES` builds them)."""
DATASETS = ("digits", "cifar10", "imagefolder", "tensors", "python")
MAX_SIGMA = 2e37
"""certify.sigma's upper bound: sigma * eps stays a float32 number (at most 3.4e38) for every normal the noise
generator can draw (|eps| < 14: its tail step takes the logarithm of a uniform of at least 2^-53)."""
MAX_CLASSES = 2**32
"""model.num_classes' upper bound: the base cache stores a class in an unsigned integer of 8, 16 or 32 bits."""
SAMPLERS = ("nsga2", "tpe", "random", "guided")
DEVICES = ("auto", "cpu", "cuda")
KEYWORD_ORIGIN = "the keyword settings"
"""How messages name a study that came from keywords or a dict rather than a file."""


@dataclass(frozen=True)
class Study:
    """Validated study settings, from a file (``path``), a nested dict or keywords (``path`` None)."""

    path: Path | None
    study: StudySection
    model: ModelSection
    data: DataSection
    train: TrainSection
    certify: CertifySection
    irs: IRSSection
    search: SearchSection

    @property
    def origin(self) -> str:
        """Where the settings came from, for messages: the study file, or the keyword settings."""
        return str(self.path) if self.path is not None else KEYWORD_ORIGIN

    @property
    def name(self) -> str:
        return self.study.name or (self.path.stem if self.path is not None else "study")

    @property
    def output_dir(self) -> Path:
        return Path(self.study.output_dir or Path("runs") / self.name)

    @property
    def checkpoint(self) -> Path:
        return Path(self.model.checkpoint) if self.model.checkpoint else self.output_dir / "model.pt"

    @property
    def storage(self) -> str:
        return self.search.storage or f"sqlite:///{self.output_dir / 'study.db'}"

    @property
    def artifact_dir(self) -> Path:
        """Where the study's Optuna artifacts live (``optuna-dashboard --artifact-dir``)."""
        return self.output_dir / "artifacts"

    def cache_path(self, split: str) -> Path:
        """Base cache of the ``search`` or ``report`` inputs: ``base-<split>-sigma<σ>-n<n>-<key>.cache``.

        ``key`` is 8 hex digits of SHA-256 over every other study setting the cache depends on (n0, alpha, the study
        seed, the dataset — with its loader and the loader's arguments for ``python`` data — split_seed and the input
        counts that select the split), so studies that share an output_dir but differ in one of them keep separate
        caches instead of overwriting each other's.  A changed model or changed data still rebuild the cache in place.
        """
        c, d = self.certify, self.data
        counts = {"report_inputs": d.report_inputs}
        if split == "search":  # a real dataset's search inputs follow its report inputs in one permutation
            counts["search_inputs"] = d.search_inputs
        settings = {"n0": c.n0, "alpha": c.alpha, "seed": self.study.seed, "dataset": d.dataset}
        settings |= {"split_seed": d.split_seed, **counts}
        if d.dataset == "python":
            settings |= {"loader": d.loader, "loader_kwargs": d.kwargs}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
        return self.legacy_cache_path(split).with_name(f"base-{split}-sigma{c.sigma:g}-n{c.n}-{key}.cache")

    def legacy_cache_path(self, split: str) -> Path:
        """The name base caches had before :meth:`cache_path` encoded all their settings (sigma and n only)."""
        c = self.certify
        return self.output_dir / f"base-{split}-sigma{c.sigma:g}-n{c.n}.cache"

    @property
    def irs_settings(self) -> IRSSettings:
        i = self.irs
        return IRSSettings(
            n_p=i.n_p,
            alpha_zeta=i.alpha_zeta,
            alpha_d=i.alpha_d,
            mode=Mode(i.mode),
            gamma=i.gamma,
            n_tail=i.n_tail or None,
            allocate=i.allocate,
            block=i.block,
            pilot=i.pilot,
            zeta=Zeta(i.zeta),
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The settings as nested tables (every key, defaults included): what :meth:`from_dict` takes back."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: Any, path: str | Path | None = None, *, origin: str | None = None) -> Study:
        """Validate nested tables (``{"certify": {"sigma": 0.25}, ...}``, as a study file holds them).

        ``path`` names the file they were read from (None: they were given in Python); ``origin`` how messages name
        them (default: the file, or "the keyword settings").  Raises :class:`ConfigError`.
        """
        path = None if path is None else Path(path)
        origin = origin or (str(path) if path is not None else KEYWORD_ORIGIN)
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: study settings must be a table of sections, got {type(data).__name__}")
        for key in data:
            if key not in SECTIONS:
                close = difflib.get_close_matches(str(key), list(SECTIONS), n=1)
                hint = f"; did you mean [{close[0]}]?" if close else f"; valid sections: {', '.join(SECTIONS)}"
                raise ConfigError(f"{origin}: unknown section [{key}]{hint}")
        try:
            sections = {name: _build(section, data.get(name, {}), name) for name, section in SECTIONS.items()}
            study = cls(path=path, **sections)
            _validate(study)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
        return study

    @classmethod
    def from_keywords(cls, base: Study | dict | str | Path | None = None, **keywords: Any) -> Study:
        """Settings from flat keywords (:func:`keyword_table`) on top of ``base`` (a Study, nested dict or file).

        ``Study.from_keywords(sigma=0.25, n_p=200, certify_batch_size=256)``: every keyword is checked like a study
        file key (an unknown one gets the closest valid name suggested).
        """
        if isinstance(base, Study):
            tables, path = base.to_dict(), base.path
        elif isinstance(base, str | Path):
            loaded = load_study(base)
            tables, path = loaded.to_dict(), loaded.path
        else:
            tables, path = dict(base or {}), None
        if not keywords and isinstance(base, Study):
            return base
        merged = {name: dict(table) if isinstance(table, dict) else table for name, table in tables.items()}
        for keyword, value in keywords.items():
            section, key = _keyword_target(keyword)
            table = merged.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{KEYWORD_ORIGIN}: [{section}] must be a table, got {table!r}")
            if key in _CONSTRAINT_KEYS:
                table["constraints"] = {**table.get("constraints", {}), key: value}
            else:
                table[key] = value
        origin = f"{path} with {KEYWORD_ORIGIN}" if path is not None and keywords else None
        return cls.from_dict(merged, path=path, origin=origin)


_CONSTRAINT_KEYS = tuple(f.name for f in fields(ConstraintsSection))


def keyword_table() -> dict[str, tuple[str, str]]:
    """Every keyword the Python API takes: ``keyword -> (section, key)``.

    A key that one section alone has is its own keyword (``sigma``, ``n_p``, ``max_size_ratio``); every key is also
    reachable as ``<section>_<key>`` (``certify_n``), which is required where two sections share a key
    (``train_batch_size`` / ``certify_batch_size``, ``model_kwargs`` / ``data_kwargs``).
    """
    owners: dict[str, list[str]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            if f.name != "constraints":
                owners.setdefault(f.name, []).append(section)
    owners.update({key: ["search"] for key in _CONSTRAINT_KEYS})
    table = {key: (sections[0], key) for key, sections in owners.items() if len(sections) == 1}
    for key, sections in owners.items():
        for section in sections:
            table[f"{section}_{key}"] = (section, key)
    return table


def _keyword_target(keyword: str) -> tuple[str, str]:
    table = keyword_table()
    if keyword in table:
        return table[keyword]
    shared = [k for k, (_, key) in table.items() if key == keyword]
    if shared:
        raise ConfigError(
            f"{KEYWORD_ORIGIN}: {keyword!r} is a key of several sections; say which: {' or '.join(sorted(shared))}"
        )
    close = difflib.get_close_matches(keyword, list(table), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; the keywords are the study file's keys (see the README)"
    raise ConfigError(f"{KEYWORD_ORIGIN}: unknown setting {keyword!r}{hint}")


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(where: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where} must be a table of named values, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {_type_name(item)}s, got {value!r}")
        return [_coerce(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
            raise ConfigError(f"unknown key {where}.{key}{hint}")
        tp = hints[key]
        if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__"):
            kwargs[key] = _build(tp, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(f"{where}.{key}", value, tp)
    return cls(**kwargs)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where} = {value!r} is not one of {', '.join(choices)}{hint}")


def _validate(s: Study) -> None:
    c, i, d, t, q = s.certify, s.irs, s.data, s.train, s.search
    _require(
        0 < c.sigma <= MAX_SIGMA,
        f"certify.sigma must be positive and at most {MAX_SIGMA:.0e} (the noise sigma * eps is drawn in float32, "
        f"whose largest number is 3.4e38, and |eps| < 14), got {c.sigma}",
    )
    _require(0 < c.alpha < 0.5, f"certify.alpha must lie in (0, 0.5), got {c.alpha}")
    _require(c.n0 >= 1 and c.n >= 1, f"certify.n0 and certify.n must be at least 1, got {c.n0} and {c.n}")
    _require(c.batch_size >= 1, f"certify.batch_size must be at least 1, got {c.batch_size}")
    _choice("certify.device", c.device, DEVICES)
    _require(1 <= i.n_p <= c.n, f"irs.n_p must lie in [1, certify.n = {c.n}] (IRS replays cached samples), got {i.n_p}")
    _choice("irs.mode", i.mode, tuple(m.value for m in Mode))
    _choice("irs.zeta", i.zeta, tuple(z.value for z in Zeta))
    for key in ("alpha_zeta", "alpha_d"):
        value = getattr(i, key)
        _require(0 < value < 0.5, f"irs.{key} must lie in (0, 0.5), got {value}")
    _require(0.5 < i.gamma <= 1, f"irs.gamma must lie in (0.5, 1], got {i.gamma}")
    _require(0 <= i.n_tail < c.n, f"irs.n_tail must lie in [0, certify.n = {c.n}) (0: n // 2), got {i.n_tail}")
    _require(i.block >= 1 and i.pilot >= 0, f"irs.block must be >= 1 and irs.pilot >= 0, got {i.block}, {i.pilot}")
    if i.mode == Mode.TAIL:
        try:
            s.irs_settings.tail_length(c.n)
        except ValueError as exc:
            raise ConfigError(f"irs (mode 'tail'): {exc}") from None
        _require(i.block <= c.n, f"irs.block must be at most certify.n = {c.n} (a step of samples), got {i.block}")
    _validate_model(s.model)
    _validate_data(d)
    _require(0 <= s.study.seed < 2**32, f"study.seed must lie in [0, 2**32 - 1] (Optuna's range), got {s.study.seed}")
    _require(
        t.epochs >= 1 and t.batch_size >= 1 and t.lr > 0, "train.epochs, train.batch_size and train.lr must be > 0"
    )
    _require(t.lr <= 1, f"train.lr must be at most 1 (Adam's step size; the default is 0.003), got {t.lr}")
    _require(q.trials >= 0 and q.timeout >= 0, "search.trials and search.timeout must be >= 0")
    _choice("search.sampler", q.sampler, SAMPLERS)
    _require(
        1 <= q.guide_samples <= s.certify.n,
        f"search.guide_samples must lie in [1, certify.n = {s.certify.n}], got {q.guide_samples}",
    )
    _require(bool(q.precisions), "search.precisions must name at least one precision")
    for precision in q.precisions:
        _choice("search.precisions", precision, PRECISIONS)
    _require(q.population >= 2, f"search.population must be at least 2, got {q.population}")
    _require(q.heartbeat_interval >= 1, f"search.heartbeat_interval must be at least 1, got {q.heartbeat_interval}")
    _require(
        q.grace_period > q.heartbeat_interval,
        f"search.grace_period ({q.grace_period}) must exceed search.heartbeat_interval ({q.heartbeat_interval})",
    )
    _require(
        all(0 < f < 1 for f in q.race) and q.race == sorted(set(q.race)),
        f"search.race must list increasing fractions in (0, 1) (or [] for no racing), got {q.race}",
    )
    _require(bool(q.prune), "search.prune must list at least one pruning amount (0.0 for none)")
    _require(all(0 <= p < 1 for p in q.prune), f"search.prune amounts must lie in [0, 1), got {q.prune}")
    for key, values in (("search.precisions", q.precisions), ("search.prune", q.prune)):
        _require(len(set(values)) == len(values), f"{key} lists a value twice ({values}): list each choice once")
    k = q.constraints
    _require(0 <= k.max_accuracy_drop <= 1, "search.constraints.max_accuracy_drop must lie in [0, 1]")
    _require(0 < k.max_size_ratio <= 1, "search.constraints.max_size_ratio must lie in (0, 1]")


_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _validate_model(m: ModelSection) -> None:
    named = [f"model.{key} = {getattr(m, key)!r}" for key in ("arch", "factory", "torchvision") if getattr(m, key)]
    _require(len(named) <= 1, f"{' and '.join(named)}: name the model one way only (arch, factory or torchvision)")
    if m.arch:
        _choice("model.arch", m.arch, ARCHITECTURES)
    if m.factory:
        _require(
            bool(_CALLABLE.match(m.factory)),
            f"model.factory = {m.factory!r} must be 'package.module:callable' (e.g. 'mymodels:make_net')",
        )
    _require(not m.kwargs or bool(m.factory), "[model.kwargs] are the factory's arguments: set model.factory too")
    if not m.torchvision:
        extra = [key for key in ("num_classes", "mean", "std") if getattr(m, key)]
        _require(not extra, f"model.{', model.'.join(extra)} apply to torchvision models only (set model.torchvision)")
    _require(
        0 <= m.num_classes <= MAX_CLASSES,
        f"model.num_classes must lie in [1, 2**32] (or 0: the default; the cache stores classes as 32-bit integers at "
        f"most), got {m.num_classes}",
    )
    _require(
        len(m.mean) == len(m.std) and all(v > 0 for v in m.std),
        f"model.mean and model.std need one value per channel, std > 0; got mean {m.mean}, std {m.std}",
    )


def _validate_data(d: DataSection) -> None:
    _choice("data.dataset", d.dataset, DATASETS)
    _require(d.search_inputs >= 1 and d.report_inputs >= 1, "data.search_inputs and data.report_inputs must be >= 1")
    _require(d.split_seed >= 0, f"data.split_seed must be non-negative, got {d.split_seed}")
    if d.dataset == "python":
        _require(
            not d.loader or bool(_CALLABLE.match(d.loader)),
            f"data.loader = {d.loader!r} must be 'package.module:callable' (e.g. 'mydata:load')",
        )
    else:
        _require(not d.loader and not d.kwargs, 'data.loader and [data.kwargs] need data.dataset = "python"')
        _require(d.dataset == "digits" or bool(d.root), f"data.root must name the folder or file of {d.dataset} data")


def load_study(path: str | Path) -> Study:
    """Read and validate a study file; raises :class:`ConfigError` on any problem."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; give a study file (TOML), e.g. studies/digits.toml")
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist (the bundled studies are in studies/)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read study file {path} ({exc})") from None
    return Study.from_dict(data, path)
