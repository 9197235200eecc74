"""Datasets: the embedded scikit-learn digits default, CIFAR-10, ImageNet and tensor files read from disk, and a
user's own data given from Python.

Inputs are float32 tensors of shape ``(N, *shape)``: images (N, C, H, W) in [0, 1] for the readers here, any shape
and range for a user's data (audio, tabular, ...), since noise is added in the input space the model receives.
Labels are int64.  ``index`` holds each input's index in its dataset: it names the input (its noise seed derives from
it) and goes into the cache.

Nothing is ever downloaded: every reader takes a path to files the user has put in place, and a missing file raises a
:class:`DataError` that says which files to put where.  Readers that take ``indices`` decode only the selected images.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from approxtune.errors import ApproxtuneError
from approxtune.safeload import UnreadableFile, UnsafeFile, load_plain

__all__ = [
    "CIFAR10_DIR",
    "DIGITS_SPLIT",
    "DataError",
    "Inputs",
    "UserData",
    "cifar10_inputs",
    "dataset_size",
    "digits_splits",
    "imagefolder_inputs",
    "read_inputs",
    "tensor_file_inputs",
]

DIGITS_SPLIT = {"report": 300, "search": 300}
"""Sizes of the held-out parts of the digits split; the remaining 1,197 images are for training."""

CIFAR10_DIR = "cifar-10-batches-py"
"""The folder that extracting ``cifar-10-python.tar.gz`` creates (torchvision's on-disk layout)."""

_CIFAR10_BATCHES = {"test": ("test_batch",), "train": tuple(f"data_batch_{i}" for i in range(1, 6))}
_CIFAR10_PIXELS = 3 * 32 * 32
_IMAGENET_CLASSES = 1000
_WNID = re.compile(r"n\d{8}")


class DataError(ApproxtuneError):
    """Input data that is missing, malformed or unsafe to read; the message names the problem and the fix."""


@dataclass(frozen=True)
class Inputs:
    """A set of labelled inputs: ``x`` (N, *shape) float32, ``y`` (N,) int64, ``index`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    index: np.ndarray
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.y)

    def head(self, count: int) -> Inputs:
        """The first ``count`` inputs."""
        return Inputs(self.x[:count], self.y[:count], self.index[:count])

    def fingerprint(self) -> str:
        """SHA-256 of the images, labels and indices (what a cache was computed on).

        Computed once per object (every IRS trial checks it): an ``Inputs`` is never changed in place.
        """
        if "fingerprint" not in self._memo:
            h = hashlib.sha256()
            for arr in (self.x.contiguous().numpy(), self.y.numpy(), self.index):
                h.update(str((arr.dtype.str, arr.shape)).encode())
                h.update(np.ascontiguousarray(arr).tobytes())
            self._memo["fingerprint"] = h.hexdigest()
        return self._memo["fingerprint"]


def digits_splits(split_seed: int = 0) -> dict[str, Inputs]:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], split by a fixed seeded permutation.

    Returns ``{"train", "search", "report"}``; the report inputs are held out from both training and search.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = np.random.default_rng(split_seed).permutation(len(y))
    bounds = {"report": (0, DIGITS_SPLIT["report"])}
    bounds["search"] = (bounds["report"][1], bounds["report"][1] + DIGITS_SPLIT["search"])
    bounds["train"] = (bounds["search"][1], len(y))
    out = {}
    for name, (lo, hi) in bounds.items():
        idx = np.sort(order[lo:hi])
        out[name] = Inputs(x[idx], y[idx], idx.astype(np.int64))
    return out


def _as_indices(indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """``indices`` as a flat int64 array of non-negative integers."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise DataError(f"indices must be a flat list of integers; got an array of {idx.dtype} with shape {idx.shape}")
    idx = idx.astype(np.int64)
    if idx.size and idx.min() < 0:
        raise DataError(f"indices must be positions in the dataset (0, 1, ...); got {idx[idx < 0][:10].tolist()}")
    return idx


def _selection(indices: Sequence[int] | np.ndarray | None, count: int, source: str) -> np.ndarray:
    """``indices`` as a checked int64 array (all of ``range(count)`` when None), in the order given."""
    if indices is None:
        return np.arange(count, dtype=np.int64)
    idx = _as_indices(indices)
    if idx.size and idx.max() >= count:
        raise DataError(
            f"{source} has {count} images, so indices must lie in [0, {count}); got {idx[idx >= count][:10].tolist()}"
        )
    return idx


# --- CIFAR-10 ---------------------------------------------------------------------------------------------------


class _Refused(pickle.UnpicklingError):
    """A global or value that the restricted unpickler will not build."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3's protocol-2 pickles use it for bytes, limited to latin-1."""
    if encoding.replace("-", "").replace("_", "").lower() != "latin1" or not isinstance(text, str):
        raise _Refused(f"refusing _codecs.encode with encoding {encoding!r} in a CIFAR batch file")
    return text.encode("latin-1")


def _plain_dtype(*args: object) -> np.dtype:
    """``numpy.dtype`` that refuses object dtypes, so no array in a batch file can hold Python objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise _Refused("refusing an object-dtype numpy array in a CIFAR batch file")
    return dtype


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy callables that pickled plain arrays refer to, under their names in numpy 1.x and 2.x."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, whatever module it lives in
    scalar = np.int64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol-5 pickles of contiguous arrays
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _plain_dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, strings, bytes, numbers and plain numpy arrays.

    CIFAR-10's python batches are pickled dicts, and unpickling an arbitrary file can run arbitrary code, so every
    global a file names is looked up in a short allow-list of numpy's array-reconstruction functions and refused
    otherwise (the "restricting globals" recipe of the :mod:`pickle` documentation).
    """

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str) -> object:
        if _CifarUnpickler._allowed is None:
            _CifarUnpickler._allowed = _numpy_globals()
        try:
            return _CifarUnpickler._allowed[(module, name)]
        except KeyError:
            raise _Refused(f"refusing {module}.{name}: a CIFAR batch holds only plain arrays") from None

    def persistent_load(self, pid: object) -> object:
        raise _Refused("refusing a persistent id: a CIFAR batch holds only plain arrays")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3072) uint8 and labels (N,) int64 of one CIFAR-10 python batch file, validated."""
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise DataError(
            f"refusing to read {path}: {exc}; replace it with the file from cifar-10-python.tar.gz"
        ) from None
    except Exception as exc:  # a truncated or foreign file fails anywhere inside the unpickler
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc}); re-extract it") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict; re-extract it")
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "fine_labels" in batch:
        raise DataError(f"{path} is a CIFAR-100 batch; approxtune reads CIFAR-10 (cifar-10-python.tar.gz)")
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR10_PIXELS:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), found {found}; re-extract it")
    labels = np.asarray(labels) if isinstance(labels, list | tuple | np.ndarray) else None
    if labels is None or labels.shape != (len(data),) or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: 'labels' must be a list of {len(data)} integers; re-extract it")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}; re-extract it")
    return data, labels.astype(np.int64)


def _cifar10_folder(root: Path, files: Sequence[str]) -> Path:
    """``root/cifar-10-batches-py`` (or ``root`` itself if it is that folder) holding all of ``files``."""
    for folder in (root / CIFAR10_DIR, root):
        if (folder / files[0]).is_file():
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise DataError(
                    f"CIFAR-10 folder {folder} lacks {', '.join(missing)}; re-extract cifar-10-python.tar.gz"
                )
            return folder
    wanted = f"{files[0]} exists" if len(files) == 1 else f"{files[0]} .. {files[-1]} exist"
    raise DataError(
        f"CIFAR-10 not found: {root / CIFAR10_DIR / files[0]} does not exist (approxtune never downloads data). "
        f"Extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into {root} so that "
        f"{root / CIFAR10_DIR}/{wanted}"
    )


def _check_cifar10_md5(folder: Path, files: Sequence[str]) -> None:
    """Raise unless every file in ``files`` has the MD5 sum of the official release (torchvision's table)."""
    from torchvision.datasets import CIFAR10

    official = dict(CIFAR10.train_list + CIFAR10.test_list)
    for name in files:
        digest = hashlib.md5((folder / name).read_bytes(), usedforsecurity=False).hexdigest()
        if digest != official[name]:
            raise DataError(
                f"{folder / name} is not the official CIFAR-10 file (MD5 {digest}, expected {official[name]}); "
                f"re-extract cifar-10-python.tar.gz, or pass check_md5=False to read CIFAR-10-format files of your own"
            )


def cifar10_inputs(
    root: str | Path,
    split: str = "test",
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    check_md5: bool = False,
) -> Inputs:
    """CIFAR-10 images (N, 3, 32, 32) in [0, 1] from torchvision's on-disk layout, ``root/cifar-10-batches-py/``.

    ``split`` is ``"test"`` (``test_batch``, 10,000 images) or ``"train"`` (``data_batch_1`` .. ``data_batch_5``,
    50,000); ``index`` is the position in that split, the index torchvision's ``CIFAR10`` and Cohen et al.'s code use.
    ``root`` may also be the ``cifar-10-batches-py`` folder itself.  ``indices`` selects images, in the order given;
    training batches after the last selected image are not read.

    The batches are read with a restricted unpickler that builds only dicts, lists, strings and plain numpy arrays and
    refuses every other global, so a tampered file cannot run code; shapes and labels are validated.  Unlike
    ``torchvision.datasets.CIFAR10``, which refuses any file whose MD5 sum differs from the official release, MD5 sums
    are compared only with ``check_md5=True``, so that CIFAR-10-format files written by others (corrupted-CIFAR
    variants, test fixtures) can be read too.
    """
    if split not in _CIFAR10_BATCHES:
        raise DataError(f"CIFAR-10 split must be one of {', '.join(_CIFAR10_BATCHES)}, not {split!r}")
    files = _CIFAR10_BATCHES[split]
    folder = _cifar10_folder(Path(root), files)
    wanted = None if indices is None else _as_indices(indices)
    last = int(wanted.max()) if wanted is not None and wanted.size else None
    data, labels, count = [], [], 0
    for name in files:
        if last is not None and count > last:
            break  # every selected image is in the batches read so far
        if check_md5:
            _check_cifar10_md5(folder, [name])
        x, y = _read_cifar_batch(folder / name)
        data.append(x)
        labels.append(y)
        count += len(y)
    idx = _selection(indices, count, f"the CIFAR-10 {split} split")
    x = np.concatenate(data)[idx].reshape(-1, 3, 32, 32)
    return Inputs(torch.from_numpy(x).float().div_(255.0), torch.from_numpy(np.concatenate(labels)[idx]), idx)


# --- ImageNet (an ImageFolder) -----------------------------------------------------------------------------------


def _imagenet_transform() -> Callable:
    """Cohen et al.'s test-time ImageNet preprocessing: shorter side to 256 (aspect kept), centre 224 crop, [0, 1]."""
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])


def _imagefolder_hint(root: Path) -> str:
    return (
        f"put one folder per class in {root}, named by WordNet id, holding that class's images "
        f"(e.g. {root}/n01440764/ILSVRC2012_val_00000293.JPEG); the flat ILSVRC2012 validation folder must first be "
        f"sorted into class folders (e.g. with valprep.sh)"
    )


def _check_imagenet_classes(classes: Sequence[str], root: Path) -> None:
    """Refuse a partial set of ImageNet class folders, which would silently shift every label."""
    if classes and all(_WNID.fullmatch(c) for c in classes) and len(classes) != _IMAGENET_CLASSES:
        raise DataError(
            f"{root} has {len(classes)} ImageNet class folders, not {_IMAGENET_CLASSES}; labels are positions in the "
            f"sorted list of class folders, so a partial set would give wrong labels. Keep all {_IMAGENET_CLASSES} "
            f"class folders (empty ones are fine) and select images with indices"
        )


def imagefolder_inputs(root: str | Path, indices: Sequence[int] | np.ndarray | None = None) -> Inputs:
    """Images (N, 3, 224, 224) in [0, 1] of an ImageFolder ``root/<class>/<image>`` (e.g. the ImageNet val set).

    Preprocessing is Cohen et al.'s for ImageNet: resize the shorter side to 256 keeping the aspect ratio, crop the
    central 224x224, scale to [0, 1] (no normalisation: the model has it).  Labels and ``index`` follow torchvision's
    ``ImageFolder`` order (class folders sorted by name, images sorted within each), as in Cohen et al.'s code.
    Only the images that ``indices`` selects are decoded; without ``indices`` every image is (50,000 ImageNet
    validation images take 30 GB as float32, so select).  Empty class folders are allowed, so a subset of ImageNet
    keeps its labels as long as all 1,000 class folders exist.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist (approxtune never downloads data); " + _imagefolder_hint(root)
        )
    try:
        dataset = ImageFolder(str(root), transform=_imagenet_transform(), allow_empty=True)
    except FileNotFoundError:
        raise DataError(f"image folder {root} has no class folders; " + _imagefolder_hint(root)) from None
    if not len(dataset):
        raise DataError(f"image folder {root} has class folders but no images in them; " + _imagefolder_hint(root))
    _check_imagenet_classes(dataset.classes, root)
    idx = _selection(indices, len(dataset), f"image folder {root}")
    images, labels = [], []
    for i in idx:
        try:
            image, label = dataset[int(i)]
        except OSError as exc:  # PIL's UnidentifiedImageError included
            raise DataError(f"cannot read image {dataset.samples[int(i)][0]} ({exc}); replace or remove it") from None
        images.append(image)
        labels.append(label)
    x = torch.stack(images) if images else torch.empty(0, 3, 224, 224)
    return Inputs(x.contiguous(), torch.tensor(labels, dtype=torch.int64), idx)


# --- tensor files (.npz / .pt) -----------------------------------------------------------------------------------

_IMAGE_KEYS = ("x", "images")
_LABEL_KEYS = ("y", "labels")
_TENSOR_FILE_HINT = "write one with np.savez(PATH, x=images, y=labels) or torch.save({'x': images, 'y': labels}, PATH)"


def _load_tensor_file(path: Path) -> Mapping[str, object]:
    """The arrays of a ``.npz`` (no pickles allowed) or ``.pt`` (``weights_only``) file, by name."""
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".pt", ".pth"):
        raise DataError(f"{path}: a tensor file must end in .npz, .pt or .pth, not {suffix or 'nothing'!r}")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {name: npz[name] for name in npz.files}
        obj = load_plain(path)
    except UnsafeFile as exc:
        raise DataError(
            f"refusing to load {path}: unsafe: it holds more than tensors (it refers to {exc.blocked}), and "
            f"unpickling it could run code; save torch tensors, not numpy arrays or other objects: {_TENSOR_FILE_HINT}"
        ) from None
    except UnreadableFile as exc:
        raise DataError(f"{path} is not a readable {suffix} file ({exc.reason}); {_TENSOR_FILE_HINT}") from None
    except ValueError as exc:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise DataError(f"cannot read {path} ({exc}); store plain numeric arrays: {_TENSOR_FILE_HINT}") from None
    except Exception as exc:  # a truncated or foreign file fails anywhere inside the reader
        raise DataError(
            f"{path} is not a readable {suffix} file ({type(exc).__name__}: {exc}); {_TENSOR_FILE_HINT}"
        ) from None
    if not isinstance(obj, Mapping):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a dict of tensors; {_TENSOR_FILE_HINT}")
    return obj


def _entry(arrays: Mapping[str, object], names: Sequence[str], what: str, path: Path) -> torch.Tensor:
    """The one array stored under one of ``names``, as a tensor."""
    found = [name for name in names if name in arrays]
    if len(found) != 1:
        problem = "both" if found else "neither"
        raise DataError(
            f"{path} has {problem} of the keys {' / '.join(map(repr, names))} for the {what} (keys found: "
            f"{', '.join(map(repr, arrays)) or 'none'}); {_TENSOR_FILE_HINT}"
        )
    value = arrays[found[0]]
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "uif":
            raise DataError(f"{path}: {found[0]!r} is a {value.dtype} array; the {what} must be numeric")
        value = torch.from_numpy(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("=")))
    if not isinstance(value, torch.Tensor):
        raise DataError(
            f"{path}: {found[0]!r} is a {type(value).__name__}, not an array or tensor; {_TENSOR_FILE_HINT}"
        )
    return value


def _nchw(images: torch.Tensor, path: Path) -> torch.Tensor:
    """``images`` as (N, C, H, W) with C in {1, 3}, from NCHW, NHWC or (N, H, W) when the layout is unambiguous."""
    if images.ndim == 3:
        return images.unsqueeze(1)
    if images.ndim == 4:
        channels_first, channels_last = images.shape[1] in (1, 3), images.shape[3] in (1, 3)
        if channels_first and not channels_last:
            return images
        if channels_last and not channels_first:
            return images.permute(0, 3, 1, 2)
    raise DataError(
        f"{path}: images of shape {tuple(images.shape)} are neither (N, C, H, W) nor (N, H, W, C) with 1 or 3 "
        f"channels (or the layout is ambiguous, as when H or W is 1 or 3); store them as (N, C, H, W)"
    )


def _unit_float(images: torch.Tensor, path: Path) -> torch.Tensor:
    """uint8 images scaled by 1/255, or float images checked to lie in [0, 1], as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise DataError(f"{path}: images are {images.dtype}; store uint8 (0..255) or floating point in [0, 1]")
    images = images.float()
    if images.numel() and not (torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
        lo, hi = images.nan_to_num().min().item(), images.nan_to_num().max().item()
        raise DataError(
            f"{path}: float images must lie in [0, 1] with no NaN or inf, but span [{lo:g}, {hi:g}]"
            f"{'; divide 0..255 images by 255 or store them as uint8' if hi > 1 else ''}"
        )
    return images


def _labels(labels: torch.Tensor, count: int, path: Path) -> torch.Tensor:
    """Labels checked to be ``count`` non-negative integers, as int64."""
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(f"{path}: labels have shape {tuple(labels.shape)}; expected one label per image, ({count},)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"{path}: labels are {labels.dtype}; store integer class indices (e.g. int64)")
    if count and labels.min() < 0:
        raise DataError(f"{path}: labels must be class indices 0, 1, ...; found {labels.min().item()}")
    return labels.to(torch.int64)


def _as_tensor(value: object, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists, objects
        raise DataError(f"{what} cannot be read as an array ({type(exc).__name__}: {exc})") from None
    if array.dtype.kind not in "biuf":
        raise DataError(f"{what} holds {array.dtype} values; give numbers (a tensor or a numeric array)")
    return torch.from_numpy(np.ascontiguousarray(array))


def _user_labels(y: torch.Tensor, count: int) -> torch.Tensor:
    if y.ndim != 1:
        raise DataError(f"the labels y have shape {tuple(y.shape)}; give one integer class index per input, ({count},)")
    if y.is_floating_point() and bool((y != y.round()).any()):
        raise DataError("the labels y are not whole numbers; give integer class indices 0, 1, ...")
    if y.dtype == torch.bool or y.is_complex():
        raise DataError(f"the labels y are {y.dtype}; give integer class indices 0, 1, ...")
    if count and int(y.min()) < 0:
        raise DataError(f"the labels y must be class indices 0, 1, ...; found {int(y.min())}")
    return y.to(torch.int64)


def _user_inputs(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim < 2:
        raise DataError(f"{what} has shape {tuple(x.shape)}; give a batch (N, *shape) with one row per input")
    x = x.to(torch.float32)
    bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()[:10].tolist()
        raise DataError(f"{what} holds NaN or infinite values (rows {rows}); clean or drop those inputs")
    return x.contiguous()


class UserData:
    """A user's own labelled data: ``(x, y)`` tensors or arrays, or a ``torch.utils.data.Dataset`` of ``(x, y)``.

    ``x`` is taken as float32 as it is (no scaling): noise is added in the input space the model receives.  A Dataset
    is read item by item, and only the items a split selects are read.  ``what`` names the data in messages.  Every
    check of :meth:`read` (lengths, finite inputs, integer labels >= 0, one shape) raises :class:`DataError`.
    """

    def __init__(self, data: object, what: str = "the data") -> None:
        self.what = what
        self._dataset = None
        if isinstance(data, tuple | list) and len(data) == 2:
            x = _as_tensor(data[0], f"{what}: x")
            y = _as_tensor(data[1], f"{what}: y")
            if len(x) != len(y):
                raise DataError(f"{what}: x has {len(x)} inputs but y has {len(y)} labels; give one label per input")
            self._x, self._y = x, y
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, str | bytes):
            self._dataset = data
        else:
            raise DataError(
                f"{what} is a {type(data).__name__}; give (x, y) tensors or arrays, or a torch Dataset of (x, y) pairs"
            )

    def __len__(self) -> int:
        return len(self._dataset) if self._dataset is not None else len(self._x)

    def read(self, indices: Sequence[int] | np.ndarray) -> Inputs:
        """The inputs at ``indices`` (positions in the data), checked, with ``index`` = those positions."""
        idx = _selection(indices, len(self), self.what)
        if self._dataset is None:
            x, y = self._x[torch.from_numpy(idx)], self._y[torch.from_numpy(idx)]
        else:
            xs, ys = [], []
            for i in idx.tolist():
                item = self._dataset[i]
                if not isinstance(item, tuple | list) or len(item) != 2:
                    raise DataError(f"{self.what}: item {i} is a {type(item).__name__}, not an (x, y) pair")
                xs.append(_as_tensor(item[0], f"{self.what}: item {i}'s x"))
                ys.append(_as_tensor(item[1], f"{self.what}: item {i}'s y").reshape(-1))
            shapes = {tuple(t.shape) for t in xs}
            if len(shapes) > 1:
                raise DataError(f"{self.what}: the inputs have different shapes {sorted(shapes)[:4]}; give one shape")
            x = torch.stack(xs) if xs else torch.empty(0, 1)
            y = torch.cat(ys) if ys else torch.empty(0, dtype=torch.int64)
            if len(y) != len(x):
                raise DataError(f"{self.what}: every item's label y must be one number")
        return Inputs(_user_inputs(x, f"{self.what}: x"), _user_labels(y, len(x)), idx)


def tensor_file_inputs(path: str | Path, indices: Sequence[int] | np.ndarray | None = None) -> Inputs:
    """Labelled images from a ``.npz`` file or a ``.pt`` / ``.pth`` dict of tensors; ``index`` is the row number.

    Images are under ``x`` or ``images``, labels under ``y`` or ``labels``.  Images are uint8 (0..255, scaled to
    [0, 1]) or floating point already in [0, 1]; their layout is (N, C, H, W), (N, H, W, C) or (N, H, W) with C 1 or
    3, whichever is unambiguous.  ``.npz`` files are read with ``allow_pickle=False`` and ``.pt`` files with
    ``weights_only=True``, so neither can run code.  ``indices`` selects rows, in the order given.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tensor file {path} does not exist; {_TENSOR_FILE_HINT}")
    arrays = _load_tensor_file(path)
    images = _entry(arrays, _IMAGE_KEYS, "images", path)
    labels = _entry(arrays, _LABEL_KEYS, "labels", path)
    if images.ndim == 0 or not len(images):
        raise DataError(f"{path} holds no images; {_TENSOR_FILE_HINT}")
    labels = _labels(labels, len(images), path)
    idx = _selection(indices, len(images), f"tensor file {path}")
    x = _unit_float(_nchw(images, path)[torch.from_numpy(idx)], path)
    return Inputs(x.contiguous(), labels[torch.from_numpy(idx)].contiguous(), idx)


def dataset_size(dataset: str, root: str | Path) -> tuple[int, str]:
    """The number of test/validation images under ``root`` and how to name them, decoding no image.

    Every check of the readers runs first, so a missing or malformed dataset raises their :class:`DataError`.
    ``dataset``: ``cifar10`` (its test split), ``imagefolder`` or ``tensors``.
    """
    root = Path(root)
    if dataset == "cifar10":
        folder = _cifar10_folder(root, _CIFAR10_BATCHES["test"])
        _, labels = _read_cifar_batch(folder / "test_batch")
        return len(labels), f"the CIFAR-10 test split in {folder}"
    if dataset == "imagefolder":
        imagefolder_inputs(root, indices=[])  # the reader's checks of the folder; decodes nothing
        from torchvision.datasets import ImageFolder

        return len(ImageFolder(str(root), allow_empty=True).samples), f"image folder {root}"
    if dataset == "tensors":
        if not root.is_file():
            tensor_file_inputs(root)  # raises the reader's DataError for a missing file
        return len(_entry(_load_tensor_file(root), _LABEL_KEYS, "labels", root)), f"tensor file {root}"
    raise ValueError(f"dataset {dataset!r} is not supported")


def read_inputs(dataset: str, root: str | Path, indices: Sequence[int] | np.ndarray) -> Inputs:
    """The images ``indices`` (of :func:`dataset_size`'s numbering) of a real dataset, decoded as its reader does."""
    if dataset == "cifar10":
        return cifar10_inputs(root, "test", indices)
    if dataset == "imagefolder":
        return imagefolder_inputs(root, indices)
    return tensor_file_inputs(root, indices)
