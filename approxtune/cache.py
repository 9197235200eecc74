"""The base-certification cache C_f: what IRS reuses from certifying the smoothed base model g once.

On-disk format (version 2): a directory holding ``meta.json`` and one ``.npy`` file per array, no pickle anywhere::

    meta.json         format_version, sigma, n0, n, alpha, seed, block_size, num_classes, num_inputs,
                      model_fingerprint, inputs_fingerprint, noise_generator, noise_canary
    index.npy         int64   (N,)    dataset index of each input (its noise seed derives from it)
    label.npy         int64   (N,)    true label
    c_hat.npy         int64   (N,)    class chosen by CERTIFY's n0 selection samples
    count.npy         int64   (N,)    number of the n estimation samples that f assigned to c_hat
    p_a.npy           float64 (N,)    one-sided (1 - alpha) Clopper-Pearson lower bound on P(f(x + eps) = c_hat)
    radius.npy        float64 (N,)    sigma * Phi^-1(p_a), 0 where CERTIFY abstained (whatever the label)
    seed.npy          uint64  (N, 2)  noise seed of the input: (run seed, dataset index) (see approxtune.noise)
    predictions.npy   uint8/16 (N, n) f's class on each estimation sample, in sample order

``meta.json`` also holds ``checksums``: the SHA-256 and byte count of every ``.npy`` file, and the SHA-256 of the
metadata itself (:meth:`CacheMeta.to_json`).  :func:`load_cache` checks them all before it returns a cache, so no
trial is ever scored on damaged arrays: a truncated or changed file, a missing one or metadata that is not valid JSON
raise :class:`CacheDamagedError` naming the file (``approxtune certify`` sets such a cache aside and certifies again,
:func:`set_aside`).  Hashing every byte once costs about 0.6 ms per MB of cache on one core, 2 ms for the default
digits cache and 0.6 s for a 1 GB one (``benchmarks/cache_verify_results.md``).  A cache written before caches carried
checksums cannot be verified and is certified again.

``noise_generator`` names what made the noise (:data:`approxtune.noise.NOISE_GENERATOR`) and ``noise_canary`` is
:func:`approxtune.noise.canary` on the machine that certified: a cache is loaded only where both are reproduced, so it
is never replayed against other noise than the one it was certified with.  Format 1 (noise from torch's generator,
32-bit seeds, other bits on other CPUs) is refused with a request to certify again, and so are its partial chunks.

``predictions.npy`` is memory-mapped when loaded.  The directory is written under a temporary name and renamed into
place, so a reader never sees half a cache.  While a base certification runs, finished chunks of inputs are kept in
``<cache>.partial/``; a run that is killed and started again reuses them and ends with the same bytes as a run that
was never interrupted (per-input noise makes every chunk independent of the others).

**Split over processes or machines.**  The inputs are cut into chunks of about :data:`CHUNK_SAMPLES` noise samples
(:func:`chunk_ranges`, the same cut for every process).  :func:`certify_shard` with shard ``i`` of ``k`` certifies
chunks ``i, i + k, i + 2k, ...`` into ``<cache>.partial/`` (on storage the shards share, or copied together
afterwards), and :func:`merge_base_cache` concatenates all chunks exactly as :func:`build_base_cache` does at its
end, so the merged cache is byte-identical to a one-process run.  Every chunk file records the settings it was
certified with and the SHA-256 of each of its arrays; a merge refuses chunks of other settings (model, inputs, sigma,
n, ...), damaged chunks, chunks that do not line up with the cut (overlapping parts) and missing chunks, and a
one-process build certifies such chunks again.  Chunk files are written under a per-process name and renamed into
place, so two processes that certify the same chunk (the same shard started twice) cannot corrupt it.

**Processes started at once.**  Building, sharding and merging one cache hold its lock file ``<cache>.lock``
(:func:`build_lock`, :mod:`approxtune.locking`): a build or a merge holds it alone, shards share it.  So a second
``tune`` on a fresh study waits while the first certifies, then reuses its cache; a shard never writes into a
``<cache>.partial/`` that a finished build is removing; a shard or merge that waited finds the cache complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from approxtune.certification import DEFAULT_BATCH_SIZE, certify
from approxtune.data import Inputs
from approxtune.errors import ApproxtuneError
from approxtune.locking import file_lock, remove_leftovers, temporary_name
from approxtune.noise import DEFAULT_BLOCK_SIZE, NOISE_GENERATOR, canary, input_seeds
from approxtune.statistics import acr, certified_accuracy

__all__ = [
    "FORMAT_VERSION",
    "SAME_CACHE",
    "BaseCache",
    "CacheDamagedError",
    "CacheError",
    "CacheMeta",
    "CertifySettings",
    "NoiseMismatchError",
    "ShardResult",
    "build_base_cache",
    "build_lock",
    "cache_fingerprint",
    "cache_meta",
    "certify_shard",
    "check_noise",
    "chunk_ranges",
    "load_cache",
    "merge_base_cache",
    "model_fingerprint",
    "parse_shard",
    "set_aside",
]

FORMAT_VERSION = 2
ARRAYS = ("index", "label", "c_hat", "count", "p_a", "radius", "seed", "predictions")
CHUNK_SAMPLES = 1 << 18
"""A base certification is checkpointed after every chunk of about this many noise samples."""


class CacheError(ApproxtuneError):
    """A cache that is missing, malformed or belongs to another model, sigma or input set."""


class NoiseMismatchError(CacheError):
    """A cache whose noise this installation cannot reproduce: it must not be replayed, nor silently rebuilt."""


class CacheDamagedError(CacheError):
    """A cache whose files are not the ones it was written with: missing, truncated, changed or unreadable.

    ``path`` is the cache, ``problem`` says which file and how; the message adds ``fix``.
    """

    def __init__(self, path: Path, problem: str, fix: str = "") -> None:
        self.path, self.problem = Path(path), problem
        fix = fix or f"`approxtune certify STUDY.toml` sets it aside and certifies it again ({SAME_CACHE})"
        super().__init__(f"the base cache {path} is damaged: {problem}; {fix}")


SAME_CACHE = "the same settings give the same cache"


_FORMAT_HINTS = {
    1: "its noise came from torch's generator (32-bit seeds, other bits on other CPUs) and cannot be replayed",
}


_RECERTIFY = "certify again (approxtune certify STUDY.toml)"


def _check_format(data: dict, what: str, fix: str = _RECERTIFY) -> None:
    """Raise :class:`CacheError` saying ``fix`` unless ``data`` is metadata of this :data:`FORMAT_VERSION`."""
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        why = _FORMAT_HINTS.get(version, "written by another approxtune")
        raise CacheError(
            f"{what} has cache format {version}, this approxtune reads format {FORMAT_VERSION} ({why}): {fix}"
        )


def check_noise(meta: CacheMeta, what: str) -> None:
    """Raise :class:`NoiseMismatchError` unless this installation regenerates the noise ``meta`` was certified with
    (the same :data:`~approxtune.noise.NOISE_GENERATOR` and :func:`~approxtune.noise.canary`)."""
    if meta.noise_generator != NOISE_GENERATOR or meta.noise_canary != canary():
        generator = "the same generator" if meta.noise_generator == NOISE_GENERATOR else repr(NOISE_GENERATOR)
        raise NoiseMismatchError(
            f"{what} was certified with noise that this installation cannot reproduce (its canary "
            f"{meta.noise_canary[:16]}, here {canary()[:16]} with {generator} and numpy {np.__version__}), so "
            "replaying it would certify against other noise: use the approxtune and numpy that built it, or remove it "
            "and certify again"
        )


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict: names, dtypes, shapes and values, in order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: BN counters
    return h.hexdigest()


@dataclass(frozen=True)
class CacheMeta:
    """Everything that determines a cache's contents."""

    sigma: float
    n0: int
    n: int
    alpha: float
    seed: int
    block_size: int
    num_inputs: int
    model_fingerprint: str
    inputs_fingerprint: str
    noise_generator: str
    noise_canary: str
    num_classes: int = 0
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, what: str = "the cache", fix: str = _RECERTIFY) -> CacheMeta:
        """Parse ``meta.json``; raises :class:`CacheError` naming ``what`` (and ``fix``) for another format."""
        data = json.loads(text)
        _check_format(data, what, fix)
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise CacheError(f"cache metadata has keys {sorted(data)}, expected {sorted(names)}")
        return cls(**data)

    def differences(self, other: CacheMeta, have: str = "cache has") -> list[str]:
        """Human-readable list of the settings in which ``other`` differs (num_classes is not a setting).

        ``have`` introduces this side's value in the messages (``"sigma: cache has 0.5, requested 1.0"``).
        """
        labels = {
            "model_fingerprint": "the model (weights fingerprint)",
            "inputs_fingerprint": "the input set (fingerprint of images, labels and indices)",
            "noise_generator": "the noise generator",
            "noise_canary": "the noise (canary hash of regenerated blocks)",
        }
        out = []
        for f in fields(self):
            if f.name == "num_classes":
                continue
            value, theirs = getattr(self, f.name), getattr(other, f.name)
            if value != theirs:
                out.append(f"{labels.get(f.name, f.name)}: {have} {value!r}, requested {theirs!r}")
        return out


@dataclass
class BaseCache:
    """A loaded cache; arrays as documented in the module docstring."""

    meta: CacheMeta
    index: np.ndarray
    label: np.ndarray
    c_hat: np.ndarray
    count: np.ndarray
    p_a: np.ndarray
    radius: np.ndarray
    seed: np.ndarray
    predictions: np.ndarray
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """Results derived from this cache alone, computed once per loaded cache (tail mode's plan without a pilot).

    Not an init field, so ``dataclasses.replace`` (a cache with other arrays) starts with an empty memo."""

    def __len__(self) -> int:
        return len(self.index)

    @property
    def certified_radius(self) -> np.ndarray:
        """Radius of each input for ACR: g's radius where it predicts the label, else 0."""
        return np.where(self.c_hat == self.label, self.radius, 0.0)

    @property
    def certified(self) -> np.ndarray:
        """Inputs where g predicts the label without abstaining (the only ones IRS can certify)."""
        return (self.c_hat == self.label) & (self.p_a > 0.5)

    def summary(self, radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> dict[str, float]:
        """Base ACR and certified accuracy at a few radii."""
        r = self.certified_radius
        out = {"acr": acr(r)}
        out.update({f"cert_acc@{x:g}": certified_accuracy(r, x) for x in radii})
        return out

    def check_inputs(self, inputs: Inputs) -> None:
        """Raise :class:`CacheError` unless ``inputs`` are the ones this cache certified, in the cache's order."""
        if len(inputs) != len(self):
            raise CacheError(f"{len(inputs)} inputs given for a cache of {len(self)} inputs")
        if inputs.fingerprint() != self.meta.inputs_fingerprint:
            raise CacheError(
                "the inputs are not the ones this cache certified (their fingerprint differs: other images, labels, "
                "indices or order): pass the cache's own inputs, in the cache's order"
            )

    def check(self, expected: CacheMeta) -> None:
        """Raise :class:`CacheError` naming every setting in which this cache differs from ``expected``."""
        diffs = self.meta.differences(expected)
        if diffs:
            raise CacheError("the base cache does not belong to this study:\n  " + "\n  ".join(diffs))


def _file_checksum(file: Path) -> dict[str, int | str]:
    """Byte count and SHA-256 of a file, read in blocks (a memory-mapped array is never loaded whole)."""
    with open(file, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": file.stat().st_size, "sha256": digest}


def cache_fingerprint(cache: BaseCache | CacheMeta) -> str:
    """SHA-256 of the cache's metadata, which determines its contents (model, inputs, sigma, n, alpha, seed)."""
    meta = cache.meta if isinstance(cache, BaseCache) else cache
    return hashlib.sha256(meta.to_json().encode()).hexdigest()


def _write_arrays(directory: Path, arrays: dict[str, np.ndarray], meta: CacheMeta) -> None:
    """The cache's ``.npy`` files, then ``meta.json`` with the checksums of the files as written and of ``meta``."""
    directory.mkdir(parents=True)
    checksums: dict[str, object] = {"meta": cache_fingerprint(meta)}
    for name in ARRAYS:
        file = directory / f"{name}.npy"
        np.save(file, arrays[name], allow_pickle=False)
        checksums[file.name] = _file_checksum(file)
    (directory / "meta.json").write_text(json.dumps({**asdict(meta), "checksums": checksums}, indent=2, sort_keys=True))


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is set aside first and removed afterwards."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def load_cache(path: str | Path, mmap: bool = True) -> BaseCache:
    """Load a cache directory written by :func:`build_base_cache` (``predictions`` memory-mapped if ``mmap``).

    Every file is checked against the checksums in ``meta.json`` first (:class:`CacheDamagedError` names the file
    that differs); a cache of another format or without checksums raises :class:`CacheError` (certify it again),
    one whose noise this installation cannot reproduce :class:`NoiseMismatchError`.
    """
    path = Path(path)
    if not path.exists():
        raise CacheError(f"no base cache at {path}; create it with `approxtune certify STUDY.toml`")
    meta, checksums = _read_sealed_meta(path)
    check_noise(meta, f"the base cache {path}")
    arrays = {}
    for name in ARRAYS:
        file = path / f"{name}.npy"
        _verify_file(path, file, checksums.get(file.name))
        try:
            arrays[name] = np.load(file, mmap_mode="r" if mmap and name == "predictions" else None, allow_pickle=False)
        except (OSError, ValueError) as exc:  # not with the bytes the checksum vouches for, but never a traceback
            raise CacheDamagedError(path, f"{file.name} cannot be read ({exc})") from None
    for name, shape in (("predictions", (meta.num_inputs, meta.n)), ("seed", (meta.num_inputs, 2))):
        if arrays[name].shape != shape:
            raise CacheDamagedError(path, f"{name}.npy has shape {arrays[name].shape}, not {shape}")
    return BaseCache(meta=meta, **arrays)


def _read_sealed_meta(path: Path) -> tuple[CacheMeta, dict]:
    """``meta.json`` of the cache at ``path``: its metadata (checked against its own checksum) and the checksums."""
    file = path / "meta.json"
    if not path.is_dir():
        raise CacheDamagedError(path, "it is a file, not a cache directory")
    if not file.is_file():
        raise CacheDamagedError(path, "meta.json is missing")
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheDamagedError(path, f"meta.json is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CacheDamagedError(path, f"meta.json holds a {type(data).__name__}, not an object")
    _check_format(data, f"the base cache {path}")
    checksums = data.pop("checksums", None)
    if checksums is None:
        raise CacheError(
            f"the base cache {path} has no checksums (approxtune wrote caches without them before it verified "
            f"them), so its files cannot be verified: {_RECERTIFY} ({SAME_CACHE}, with checksums)"
        )
    names = {f.name for f in fields(CacheMeta)}
    if not isinstance(checksums, dict) or set(data) != names:
        raise CacheDamagedError(path, f"meta.json has keys {sorted(data)}, expected {sorted(names | {'checksums'})}")
    try:
        meta = CacheMeta(**data)
    except TypeError as exc:
        raise CacheDamagedError(path, f"meta.json is malformed ({exc})") from None
    if checksums.get("meta") != cache_fingerprint(meta):
        raise CacheDamagedError(path, "meta.json does not match its checksum (a value in it was changed)")
    return meta, checksums


def _verify_file(path: Path, file: Path, recorded: object) -> None:
    """Raise :class:`CacheDamagedError` unless ``file`` has the byte count and SHA-256 ``recorded``."""
    if not file.is_file():
        raise CacheDamagedError(path, f"{file.name} is missing")
    if not isinstance(recorded, dict) or set(recorded) != {"bytes", "sha256"} or type(recorded["bytes"]) is not int:
        raise CacheDamagedError(path, f"meta.json records no checksum of {file.name}")
    size = file.stat().st_size
    if size != recorded["bytes"]:
        written = recorded["bytes"]
        raise CacheDamagedError(path, f"{file.name} has {size:,} bytes, {written:,} were written (truncated?)")
    if _file_checksum(file)["sha256"] != recorded["sha256"]:
        raise CacheDamagedError(path, f"{file.name} does not match its SHA-256 checksum (changed on disk)")


def set_aside(path: str | Path) -> Path:
    """Rename the cache at ``path`` to ``<cache>.damaged-<time>`` (kept for inspection); returns the new name."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    number = 1
    while aside.exists():
        number += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{number}")
    os.replace(path, aside)
    return aside


def _lock_file(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def build_lock(path: str | Path, *, shared: bool = False, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock of the cache at ``path`` (``<cache>.lock``): alone to build or merge it, ``shared`` to certify
    a shard into ``<cache>.partial/``.  ``say`` is told whom it waits for."""
    path = Path(path)
    what = f"certifies {path}" if not shared else f"certifies shards of {path}"
    with file_lock(_lock_file(path), shared=shared, say=say, what=what):
        yield


def _remove_leftovers(path: Path) -> None:
    """What killed processes of this host left: a half-written cache, half-written chunks (under the lock)."""
    remove_leftovers(path.parent, re.escape(path.name))
    remove_leftovers(_partial_dir(path), r"chunk-\d{9}-\d{9}|meta\.json")


def _complete(path: Path, meta: CacheMeta) -> BaseCache | None:
    """The cache at ``path`` if it is complete, intact and of ``meta``'s settings (another process finished it)."""
    try:
        cache = load_cache(path)
    except CacheError:
        return None
    return cache if not cache.meta.differences(meta) else None


def chunk_ranges(num_inputs: int, samples_per_input: int) -> list[tuple[int, int]]:
    """The cut of the inputs into checkpointed chunks ``[lo, hi)``: the same for every process of a certification."""
    size = max(1, CHUNK_SAMPLES // samples_per_input)
    return [(lo, min(lo + size, num_inputs)) for lo in range(0, num_inputs, size)]


_CHUNK_NAME = re.compile(r"^chunk-(\d{9})-(\d{9})\.npz$")
_CHUNK_ARRAYS = ("c_hat", "count", "p_a", "radius", "predictions")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/k"`` -> ``(i, k)``: shard ``i`` (counted from 0) of ``k``; raises ValueError naming the fix."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"--shard takes I/K (shard I of K, I counted from 0, e.g. 0/4), got {text!r}")
    i, k = int(match.group(1)), int(match.group(2))
    if k < 1 or not 0 <= i < k:
        raise ValueError(f"--shard {text}: K must be at least 1 and I must lie in 0..K-1 (shards 0/{k} to {k - 1}/{k})")
    return i, k


@dataclass
class ShardResult:
    """What :func:`certify_shard` did: its chunks (certified now or found done) and the state of the whole run."""

    shard: tuple[int, int]
    certified: list[tuple[int, int]] = field(default_factory=list)
    reused: list[tuple[int, int]] = field(default_factory=list)
    chunks_done: int = 0
    chunks_total: int = 0
    partial: Path = Path()
    merged: bool = False
    """The cache was complete already (another process merged or built it): nothing was certified."""

    @property
    def complete(self) -> bool:
        """Whether every chunk of the run is in ``partial`` (a merge can run)."""
        return self.chunks_done == self.chunks_total


@dataclass(frozen=True)
class CertifySettings:
    """What a base certification runs with: noise level, selection and estimation samples, level, run seed, noise
    block size.  With the model and the inputs it determines the cache byte for byte (:func:`cache_meta`)."""

    sigma: float
    n0: int
    n: int
    alpha: float
    seed: int
    block_size: int = DEFAULT_BLOCK_SIZE


def cache_meta(model: nn.Module, inputs: Inputs, settings: CertifySettings) -> CacheMeta:
    """The metadata of the cache that ``settings`` give for ``model`` on ``inputs``."""
    return CacheMeta(
        sigma=float(settings.sigma),
        n0=int(settings.n0),
        n=int(settings.n),
        alpha=float(settings.alpha),
        seed=int(settings.seed),
        block_size=int(settings.block_size),
        num_inputs=len(inputs),
        model_fingerprint=model_fingerprint(model),
        inputs_fingerprint=inputs.fingerprint(),
        noise_generator=NOISE_GENERATOR,
        noise_canary=canary(),
    )


def _partial_dir(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _read_meta(partial: Path) -> CacheMeta | None:
    """The settings recorded in ``partial``, None if none can be read; :class:`CacheError` for another format."""
    try:
        data = json.loads((partial / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    _check_format(data, f"the parts in {partial}", f"remove {partial} and run the shards again")
    try:
        return CacheMeta.from_json(json.dumps(data))
    except (ValueError, TypeError):
        return None


def _write_text_atomic(file: Path, text: str) -> None:
    tmp = temporary_name(file)
    tmp.write_text(text)
    os.replace(tmp, file)


def _prepare_partial(partial: Path, meta: CacheMeta, *, discard_foreign: bool) -> None:
    """Make ``partial`` a chunk directory of ``meta``'s run.

    One that holds another run's chunks is removed when ``discard_foreign`` (a one-process build: they are useless),
    else refused: a shard must never delete the parts other shards wrote.
    """
    meta_file = partial / "meta.json"
    if partial.exists():
        try:
            existing = _read_meta(partial)
        except CacheError:  # parts of another cache format
            if not discard_foreign:
                raise
            existing = None
        if discard_foreign and existing != meta:
            shutil.rmtree(partial)  # left over from other settings: useless
        elif existing is not None and existing != meta:
            raise CacheError(
                f"{partial} holds parts of another base certification:\n  "
                + "\n  ".join(existing.differences(meta, have="the parts have"))
                + "\nEvery shard must use the same study settings and model; remove that directory to start over."
            )
    partial.mkdir(parents=True, exist_ok=True)
    if not meta_file.is_file():
        _write_text_atomic(meta_file, meta.to_json())


def _chunk_file(partial: Path, lo: int, hi: int) -> Path:
    return partial / f"chunk-{lo:09d}-{hi:09d}.npz"


def _array_checksum(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (what a chunk file records of each of its arrays)."""
    h = hashlib.sha256(f"{array.dtype.str}|{array.shape}|".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _read_chunk(file: Path, meta: CacheMeta, lo: int, hi: int) -> dict[str, np.ndarray]:
    """A finished chunk's arrays, checked against the checksums it records; raises :class:`CacheError` saying why it
    is damaged or does not belong to ``meta``'s run."""
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # OSError, ValueError, EOFError, zipfile.BadZipFile: not a whole .npz
        raise CacheError(f"part {file.name} cannot be read ({type(exc).__name__}: {exc})") from None
    if "meta" not in arrays:
        raise CacheError(f"part {file.name} records no settings (written by an older approxtune)")
    recorded = CacheMeta.from_json(
        str(arrays.pop("meta")), f"part {file.name}", f"remove {file.parent} and run the shards again"
    )
    diffs = recorded.differences(meta, have="part has")
    if diffs:
        raise CacheError(f"part {file.name} was certified with other settings:\n  " + "\n  ".join(diffs))
    if "checksums" not in arrays:
        raise CacheError(f"part {file.name} records no checksums (written by an older approxtune)")
    try:
        checksums = json.loads(str(arrays.pop("checksums")))
    except ValueError:
        checksums = {}
    expected = {"c_hat": (hi - lo,), "count": (hi - lo,), "p_a": (hi - lo,), "radius": (hi - lo,)}
    expected["predictions"] = (hi - lo, meta.n)
    for name, shape in expected.items():
        if name not in arrays or arrays[name].shape != shape:
            got = arrays[name].shape if name in arrays else "nothing"
            raise CacheError(f"part {file.name} is malformed: {name} has shape {got}, expected {shape}")
        if not isinstance(checksums, dict) or checksums.get(name) != _array_checksum(arrays[name]):
            raise CacheError(f"part {file.name} is damaged: its {name} does not match the checksum it records")
    return arrays


def _certify_chunk(
    model: nn.Module,
    inputs: Inputs,
    seeds: np.ndarray,
    lo: int,
    hi: int,
    file: Path,
    meta: CacheMeta,
    batch_size: int,
    device: torch.device | str | None,
    progress: Callable[[int], None] | None,
) -> None:
    result = certify(
        model,
        inputs.x[lo:hi],
        seeds[lo:hi],
        meta.sigma,
        meta.n0,
        meta.n,
        meta.alpha,
        batch_size=batch_size,
        block_size=meta.block_size,
        device=device,
        progress=progress,
    )
    tmp = temporary_name(file)
    arrays = {name: getattr(result, name) for name in _CHUNK_ARRAYS}
    checksums = {name: _array_checksum(array) for name, array in arrays.items()}
    np.savez(tmp, **arrays, meta=np.array(meta.to_json()), checksums=np.array(json.dumps(checksums)))
    os.replace(tmp, file)  # atomic: a reader sees the whole chunk or none; a second writer writes the same bytes


def _reuse_or_certify(
    model: nn.Module,
    inputs: Inputs,
    seeds: np.ndarray,
    lo: int,
    hi: int,
    partial: Path,
    meta: CacheMeta,
    batch_size: int,
    device: torch.device | str | None,
    progress: Callable[[int], None] | None,
) -> dict[str, np.ndarray] | None:
    """Chunk ``[lo, hi)``: its arrays when ``partial`` holds it finished with these settings (its samples counted as
    progress), else None after certifying it into ``partial`` now."""
    file = _chunk_file(partial, lo, hi)
    if file.is_file():
        try:
            part = _read_chunk(file, meta, lo, hi)
        except CacheError:
            pass  # a chunk of an older approxtune or of other settings: certify it again
        else:
            if progress is not None:
                progress((hi - lo) * (meta.n0 + meta.n))
            return part
    _certify_chunk(model, inputs, seeds, lo, hi, file, meta, batch_size, device, progress)
    return None


def build_base_cache(
    model: nn.Module,
    inputs: Inputs,
    path: str | Path,
    settings: CertifySettings,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> BaseCache:
    """Certify g = smoothed ``model`` on every input once (CERTIFY at level ``1 - alpha``) and write the cache.

    Resumable: chunks already finished in ``<path>.partial/`` for the same settings (by this function after an
    interruption, or by :func:`certify_shard`) are reused, so a run killed at any moment and started again continues
    where it stopped and writes the same bytes; damaged chunks are certified again.  ``progress`` is called with the
    number of noise samples evaluated (reused chunks included).  Holds :func:`build_lock` (waiting for shards and
    other builds of this cache).  Returns the loaded cache.
    """
    path = Path(path)
    meta = cache_meta(model, inputs, settings)
    partial = _partial_dir(path)
    with build_lock(path):
        _remove_leftovers(path)
        _prepare_partial(partial, meta, discard_foreign=True)
        seeds = input_seeds(settings.seed, inputs.index)
        parts = []
        for lo, hi in chunk_ranges(len(inputs), meta.n0 + meta.n):
            part = _reuse_or_certify(model, inputs, seeds, lo, hi, partial, meta, batch_size, device, progress)
            parts.append(part if part is not None else _read_chunk(_chunk_file(partial, lo, hi), meta, lo, hi))
        return _write_cache(model, inputs, path, meta, parts, seeds, device)


def certify_shard(
    model: nn.Module,
    inputs: Inputs,
    path: str | Path,
    shard: tuple[int, int],
    settings: CertifySettings,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> ShardResult:
    """Certify shard ``i`` of ``k`` (``shard = (i, k)``): chunks ``i, i + k, ...`` of the cut, into ``<path>.partial/``.

    Writes no cache: :func:`merge_base_cache` does, once every shard has finished.  Chunks already finished with the
    same settings are kept (a shard killed and started again resumes).  A ``<path>.partial/`` of other settings is
    refused, never removed.  ``progress`` counts the shard's noise samples.  Shards share :func:`build_lock` (``say``
    is told when one waits for a build or a merge); a shard that finds the cache complete certifies nothing
    (``merged``).
    """
    i, k = shard
    if k < 1 or not 0 <= i < k:
        raise ValueError(f"shard {i}/{k}: need 0 <= i < k")
    path = Path(path)
    meta = cache_meta(model, inputs, settings)
    partial = _partial_dir(path)
    chunks = chunk_ranges(len(inputs), meta.n0 + meta.n)
    result = ShardResult(shard=(i, k), chunks_total=len(chunks), partial=partial)
    with build_lock(path, shared=True, say=say):
        if _complete(path, meta) is not None:  # merged (or built by one process) while this shard waited
            result.chunks_done, result.merged = len(chunks), True
            return result
        _remove_leftovers(path)
        _prepare_partial(partial, meta, discard_foreign=False)
        seeds = input_seeds(settings.seed, inputs.index)
        for lo, hi in chunks[i::k]:
            part = _reuse_or_certify(model, inputs, seeds, lo, hi, partial, meta, batch_size, device, progress)
            (result.reused if part is not None else result.certified).append((lo, hi))
        result.chunks_done = sum(_chunk_file(partial, lo, hi).is_file() for lo, hi in chunks)
    return result


def _chunks_message(missing: list[int], chunks: list[tuple[int, int]]) -> str:
    shown = ", ".join(f"{j} (inputs {chunks[j][0]}-{chunks[j][1] - 1})" for j in missing[:8])
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    return f"chunk {shown}{more}" if len(missing) == 1 else f"chunks {shown}{more}"


def merge_base_cache(
    model: nn.Module,
    inputs: Inputs,
    path: str | Path,
    settings: CertifySettings,
    *,
    device: torch.device | str | None = None,
) -> BaseCache:
    """Merge the chunks that :func:`certify_shard` wrote into ``<path>.partial/`` into the cache at ``path``.

    The result is byte-identical to :func:`build_base_cache` with the same settings.  Raises :class:`CacheError`,
    writing nothing, when the parts do not belong together: a chunk or the directory certified with other settings
    (model, inputs, sigma, n, ...), chunks that do not line up with this run's cut (overlapping parts, e.g. from
    another approxtune version), damaged chunks, or missing chunks (a shard that has not finished).  Holds
    :func:`build_lock`; a cache that is complete already (merged by another process) is returned as it is.
    """
    path = Path(path)
    meta = cache_meta(model, inputs, settings)
    with build_lock(path):
        _remove_leftovers(path)
        return _complete(path, meta) or _merge(model, inputs, path, meta, settings, device)


def _merge(
    model: nn.Module,
    inputs: Inputs,
    path: Path,
    meta: CacheMeta,
    settings: CertifySettings,
    device: torch.device | str | None,
) -> BaseCache:
    partial = _partial_dir(path)
    if not partial.is_dir():
        raise CacheError(
            f"no shard parts at {partial}: run the shards first (certify --shard I/K, for I = 0 .. K-1), "
            "writing to this directory or copying their chunk files into it"
        )
    recorded = _read_meta(partial)
    if recorded is not None and recorded != meta:
        raise CacheError(
            f"the parts in {partial} belong to another base certification:\n  "
            + "\n  ".join(recorded.differences(meta, have="the parts have"))
        )
    chunks = chunk_ranges(len(inputs), meta.n0 + meta.n)
    found = {}
    for file in partial.iterdir():
        match = _CHUNK_NAME.match(file.name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = file
    stray = sorted(set(found) - set(chunks))
    if stray:
        names = ", ".join(found[c].name for c in stray[:5]) + (f" and {len(stray) - 5} more" if len(stray) > 5 else "")
        raise CacheError(
            f"{partial} holds parts that overlap this run's chunks instead of lining up with them ({names}): they were "
            f"cut for another input count or chunk size ({len(chunks)} chunks of up to {chunks[0][1]} inputs "
            "expected); remove them and run the shards again"
        )
    missing = [j for j, c in enumerate(chunks) if c not in found]
    if missing:
        raise CacheError(
            f"{partial} misses {_chunks_message(missing, chunks)} of {len(chunks)}: not every shard has "
            "finished (shard I/K certifies chunks I, I+K, I+2K, ...); run the missing shards, then merge"
        )
    parts = []
    for j, c in enumerate(chunks):
        try:
            parts.append(_read_chunk(found[c], meta, *c))
        except CacheError as exc:
            raise CacheError(
                f"{exc}\nRemove it from {partial} and run its shard again (chunk {j} belongs to shard I/K with "
                f"I = {j} mod K), then merge"
            ) from None
    return _write_cache(model, inputs, path, meta, parts, input_seeds(settings.seed, inputs.index), device)


def _write_cache(
    model: nn.Module,
    inputs: Inputs,
    path: Path,
    meta: CacheMeta,
    parts: list[dict[str, np.ndarray]],
    seeds: np.ndarray,
    device: torch.device | str | None,
) -> BaseCache:
    """Concatenate the chunks in order and write the cache atomically: the one code path of every way to build it."""
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in _CHUNK_ARRAYS}
    arrays.update(index=inputs.index.astype(np.int64), label=inputs.y.numpy().astype(np.int64), seed=seeds)
    final_meta = CacheMeta(**{**asdict(meta), "num_classes": _num_classes(model, inputs, device)})
    tmp = temporary_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_arrays(tmp, arrays, final_meta)
    _replace_dir(tmp, path)
    shutil.rmtree(_partial_dir(path), ignore_errors=True)
    return load_cache(path)


def _num_classes(model: nn.Module, inputs: Inputs, device: torch.device | str | None) -> int:
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.inference_mode():
        return int(model.eval()(inputs.x[:1].to(device)).shape[1])
