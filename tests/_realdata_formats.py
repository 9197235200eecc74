"""Writers of test fixtures in the exact on-disk formats of real data (CIFAR-10 python batches, ImageFolders).

The CIFAR-10 batches of ``cifar-10-python.tar.gz`` were written by Python 2's ``cPickle`` (protocol 2): their strings
are Python 2 ``str`` (``SHORT_BINSTRING`` / ``BINSTRING`` opcodes, which Python 3 reads with ``encoding="latin1"``)
and their image array refers to ``numpy.core.multiarray._reconstruct``.  Python 3's pickle cannot write that, so
:func:`py2_cifar_batch_bytes` emits the opcodes directly; :func:`write_cifar_batch` can also write the dict with
Python 3's own pickle, as a user re-packing CIFAR-10-format data would.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])  # BININT1
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)  # BININT2
    return b"J" + struct.pack("<i", value)  # BININT


def _str(value: bytes) -> bytes:
    if len(value) < 256:
        return b"U" + bytes([len(value)]) + value  # SHORT_BINSTRING (a Python 2 str)
    return b"T" + struct.pack("<i", len(value)) + value  # BINSTRING


def _uint8_array(arr: np.ndarray) -> bytes:
    """A C-contiguous uint8 2-D array as numpy under Python 2 pickled it (version-1 state, raw data as a str)."""
    assert arr.dtype == np.uint8 and arr.ndim == 2
    dtype = b"cnumpy\ndtype\n" + _str(b"u1") + _int(0) + _int(1) + b"\x87R"  # dtype('u1', 0, 1)
    dtype += b"(" + _int(3) + _str(b"|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + _int(0) + b"tb"
    out = b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _int(0) + b"\x85" + _str(b"b") + b"\x87R"
    shape = _int(arr.shape[0]) + _int(arr.shape[1]) + b"\x86"
    return out + b"(" + _int(1) + shape + dtype + b"\x89" + _str(arr.tobytes()) + b"tb"


def _py2(value: object) -> bytes:
    """``value`` (int, str, bytes, list, dict or uint8 array) as Python 2's pickle protocol 2 writes it."""
    if isinstance(value, np.ndarray):
        return _uint8_array(value)
    if isinstance(value, bool) or value is None:
        raise TypeError(value)
    if isinstance(value, int):
        return _int(value)
    if isinstance(value, str | bytes):
        return _str(value.encode() if isinstance(value, str) else value)
    if isinstance(value, list):
        return b"](" + b"".join(_py2(v) for v in value) + b"e"
    if isinstance(value, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in value.items()) + b"u"
    raise TypeError(value)


def py2_pickle_bytes(value: dict) -> bytes:
    """The bytes Python 2's ``cPickle.dump(value, f, 2)`` writes (memo opcodes omitted, which readers do not need)."""
    return b"\x80\x02" + _py2(value) + b"."


def py2_cifar_batch_bytes(data: np.ndarray, labels: list[int], batch_label: str) -> bytes:
    """A CIFAR-10 batch file's bytes: the dict ``{batch_label, labels, data, filenames}`` pickled by Python 2."""
    names = [f"synthetic_{i:05d}.png" for i in range(len(labels))]
    return py2_pickle_bytes({"batch_label": batch_label, "labels": labels, "data": data, "filenames": names})


def synthetic_cifar(count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """``count`` random images in CIFAR's row layout (N, 3072: 1024 red, then green, then blue values) and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 3072), dtype=np.uint8), rng.integers(0, 10, count).tolist()


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], *, py2: bool = True, protocol: int = 2) -> None:
    """One batch file, as CIFAR-10's own python-2 pickle (``py2``) or as Python 3's ``pickle.dump`` of the same dict."""
    label = f"{path.name} (synthetic)"
    if py2:
        path.write_bytes(py2_cifar_batch_bytes(data, labels, label))
        return
    batch = {b"batch_label": label.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def write_cifar10(root: Path, sizes: dict[str, int], **kwargs) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``root/cifar-10-batches-py/`` with the named batch files (``test_batch``, ``data_batch_1`` ...) and meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"num_cases_per_batch": 10000, "label_names": CIFAR_LABEL_NAMES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle_bytes(meta))
    written = {}
    for seed, (name, count) in enumerate(sizes.items()):
        written[name] = synthetic_cifar(count, seed)
        write_cifar_batch(folder / name, *written[name], **kwargs)
    return written
