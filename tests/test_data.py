"""Dataset readers, on files written in the exact on-disk formats of the real data sets.

CIFAR-10: ``torchvision.datasets.CIFAR10(root, download=False)`` compares every batch file's MD5 sum with the official
release, so it refuses any synthetic file ("Dataset not found or corrupted").  approxtune therefore reads the batch
files itself (a restricted unpickler, shapes and labels validated; MD5 sums only with ``check_md5=True``), and these
tests write batches byte for byte as Python 2's ``cPickle`` wrote the real ones (see ``_realdata_formats``), as well
as with Python 3's pickle.  One cross-check reads the same files with torchvision's own ``CIFAR10`` parser, with its
MD5 check patched out in that test only, to show both readers agree on image layout and labels.

ImageNet: a tiny ImageFolder of PNG/JPEG images of odd sizes checks Cohen et al.'s 256-resize / 224-centre-crop.
Tensor files: ``.npz`` / ``.pt`` files as ``np.savez`` / ``torch.save`` write them.
"""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from _realdata_formats import write_cifar10, write_cifar_batch
from PIL import Image

from approxtune.data import (
    DIGITS_SPLIT,
    DataError,
    cifar10_inputs,
    digits_splits,
    imagefolder_inputs,
    tensor_file_inputs,
)


class _RunsShell:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _as_images(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255


def test_digits_splits_unchanged() -> None:
    splits = digits_splits()
    assert {k: len(v) for k, v in splits.items()} == {**DIGITS_SPLIT, "train": 1797 - 600}
    assert splits["report"].x.shape[1:] == (1, 8, 8)


# --- CIFAR-10 ---------------------------------------------------------------------------------------------------


def test_cifar10_test_split_in_python2_format(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path, {"test_batch": 12})
    data, labels = written["test_batch"]
    inputs = cifar10_inputs(tmp_path)
    assert inputs.x.dtype == torch.float32 and inputs.x.shape == (12, 3, 32, 32)
    assert torch.equal(inputs.x, _as_images(data)) and inputs.y.tolist() == labels
    assert inputs.y.dtype == torch.int64 and inputs.index.tolist() == list(range(12))
    # the red plane is the first 1024 bytes of a row, row-major
    assert round(inputs.x[3, 0, 1, 2].item() * 255) == data[3, 1 * 32 + 2]
    assert round(inputs.x[3, 2, 0, 0].item() * 255) == data[3, 2048]
    same_folder = cifar10_inputs(tmp_path / "cifar-10-batches-py", indices=[7, 2])
    assert same_folder.index.tolist() == [7, 2] and torch.equal(same_folder.x, inputs.x[[7, 2]])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_batches_pickled_by_python3(tmp_path: Path, protocol: int) -> None:
    written = write_cifar10(tmp_path, {"test_batch": 5}, py2=False, protocol=protocol)
    inputs = cifar10_inputs(tmp_path)
    assert torch.equal(inputs.x, _as_images(written["test_batch"][0])) and inputs.y.tolist() == written["test_batch"][1]


def test_cifar10_agrees_with_torchvision_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10, cifar

    write_cifar10(tmp_path, {"test_batch": 6})
    with pytest.raises(RuntimeError, match="Dataset not found or corrupted"):
        CIFAR10(str(tmp_path), train=False, download=False)  # the MD5 check refuses synthetic files
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)  # in this test only
    reference = CIFAR10(str(tmp_path), train=False, download=False)
    inputs = cifar10_inputs(tmp_path)
    expected = torch.from_numpy(reference.data).permute(0, 3, 1, 2).float() / 255  # torchvision stores NHWC
    assert torch.equal(inputs.x, expected) and inputs.y.tolist() == reference.targets
    assert reference.classes[0] == "airplane"  # batches.meta is in the real format too


def test_cifar10_train_split_reads_only_the_batches_it_needs(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path, {f"data_batch_{i}": 4 for i in range(1, 6)})
    full = cifar10_inputs(tmp_path, "train")
    assert len(full) == 20 and torch.equal(full.x[4:8], _as_images(written["data_batch_2"][0]))
    (tmp_path / "cifar-10-batches-py" / "data_batch_5").write_bytes(b"broken")
    picked = cifar10_inputs(tmp_path, "train", indices=np.array([9, 0]))
    assert picked.index.tolist() == [9, 0] and picked.y.tolist() == [written["data_batch_3"][1][1], full.y[0].item()]
    with pytest.raises(DataError, match="data_batch_5 is not a CIFAR-10 python batch"):
        cifar10_inputs(tmp_path, "train", indices=[16])


def test_cifar10_md5_check_is_opt_in(tmp_path: Path) -> None:
    write_cifar10(tmp_path, {"test_batch": 2})
    with pytest.raises(DataError, match=r"test_batch is not the official CIFAR-10 file \(MD5 .*check_md5=False"):
        cifar10_inputs(tmp_path, check_md5=True)


def test_cifar10_missing_folder_says_what_to_extract_where(tmp_path: Path) -> None:
    expected = (
        f"CIFAR-10 not found: {tmp_path}/cifar-10-batches-py/test_batch does not exist (approxtune never downloads "
        f"data). Extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into {tmp_path} so "
        f"that {tmp_path}/cifar-10-batches-py/test_batch exists"
    )
    with pytest.raises(DataError) as err:
        cifar10_inputs(tmp_path)
    assert str(err.value) == expected
    with pytest.raises(DataError, match=r"data_batch_1 \.\. data_batch_5 exist$"):
        cifar10_inputs(tmp_path, "train")
    write_cifar10(tmp_path, {"data_batch_1": 1, "data_batch_2": 1})
    with pytest.raises(DataError, match="lacks data_batch_3, data_batch_4, data_batch_5; re-extract"):
        cifar10_inputs(tmp_path, "train")


def test_cifar10_malformed_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_cifar_batch(folder / "test_batch", rng.integers(0, 256, (2, 3000), dtype=np.uint8), [0, 1])
    with pytest.raises(
        DataError, match=r"'data' must be a uint8 array of shape \(N, 3072\), found uint8 array of shape"
    ):
        cifar10_inputs(tmp_path)
    write_cifar_batch(folder / "test_batch", rng.integers(0, 256, (2, 3072), dtype=np.uint8), [0, 10])
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9, found 0\.\.10"):
        cifar10_inputs(tmp_path)
    write_cifar_batch(folder / "test_batch", rng.integers(0, 256, (2, 3072), dtype=np.uint8), [0])
    with pytest.raises(DataError, match="'labels' must be a list of 2 integers"):
        cifar10_inputs(tmp_path)
    with pytest.raises(DataError, match="split must be one of test, train, not 'val'"):
        cifar10_inputs(tmp_path, "val")
    write_cifar_batch(folder / "test_batch", rng.integers(0, 256, (3, 3072), dtype=np.uint8), [0, 1, 2])
    with pytest.raises(DataError, match=r"has 3 images, so indices must lie in \[0, 3\); got \[3\]"):
        cifar10_inputs(tmp_path, indices=[0, 3])
    with pytest.raises(DataError, match="indices must be positions in the dataset"):
        cifar10_inputs(tmp_path, indices=[-1])


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_cifar_batch_is_refused_without_running_code(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"batch_label": _RunsShell(marker)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(DataError, match=r"refusing to read .*test_batch: refusing (posix|os)\.system"):
        cifar10_inputs(tmp_path)
    assert not marker.exists()
    pickle.loads((folder / "test_batch").read_bytes())  # control: unrestricted unpickling does run the command
    assert marker.exists()


def test_cifar_batch_with_object_array_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {b"data": np.array([b"x", 1], dtype=object), b"labels": [0]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match="refusing an object-dtype numpy array"):
        cifar10_inputs(tmp_path)


# --- ImageNet-style ImageFolder ----------------------------------------------------------------------------------


def _striped(width: int, height: int) -> Image.Image:
    """Red outer quarters left and right, green centre half: squashing would bring red into the centre crop."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, :, 0] = 255
    pixels[:, width // 4 : width - width // 4] = (0, 255, 0)
    return Image.fromarray(pixels)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "val"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "empty").mkdir()
    _striped(400, 200).save(root / "cat" / "a_wide.png")
    Image.fromarray(np.full((333, 150, 3), 200, np.uint8)).save(root / "cat" / "b_tall.JPEG", quality=95)
    Image.fromarray(np.full((90, 97), 60, np.uint8), mode="L").save(root / "dog" / "gray.png")
    return root


def test_imagefolder_preprocessing_resizes_then_centre_crops(image_folder: Path) -> None:
    inputs = imagefolder_inputs(image_folder)
    assert inputs.x.shape == (3, 3, 224, 224) and inputs.x.dtype == torch.float32
    assert inputs.y.tolist() == [0, 0, 1] and inputs.index.tolist() == [0, 1, 2]  # cat, cat, dog; "empty" is class 2
    wide = inputs.x[0]
    assert wide[1].min() > 0.99 and wide[0].max() < 0.01  # only the green centre survives: cropped, not squashed
    assert (inputs.x[1] - 200 / 255).abs().max() < 0.03  # JPEG
    assert torch.equal(inputs.x[2, 0], inputs.x[2, 2]) and (inputs.x[2] - 60 / 255).abs().max() < 1e-6  # grey to RGB
    assert inputs.x.min() >= 0 and inputs.x.max() <= 1  # no normalisation: the model has it


def test_imagefolder_decodes_only_the_selected_images(image_folder: Path) -> None:
    (image_folder / "dog" / "z_broken.png").write_bytes(b"not an image")
    picked = imagefolder_inputs(image_folder, indices=[2, 0])
    assert picked.index.tolist() == [2, 0] and picked.y.tolist() == [1, 0]
    with pytest.raises(DataError, match=r"cannot read image .*z_broken\.png .*replace or remove it"):
        imagefolder_inputs(image_folder, indices=[3])


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"image folder .*/missing does not exist \(approxtune never downloads data\); put"
    ):
        imagefolder_inputs(tmp_path / "missing")
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.JPEG")
    with pytest.raises(DataError, match=r"has no class folders; put one folder per class in .*n01440764/ILSVRC2012"):
        imagefolder_inputs(tmp_path)
    (tmp_path / "n01440764").mkdir()
    with pytest.raises(DataError, match="has class folders but no images in them"):
        imagefolder_inputs(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "n01440764" / "x.JPEG")
    with pytest.raises(DataError, match=r"has 1 ImageNet class folders, not 1000; .*Keep all 1000 class folders"):
        imagefolder_inputs(tmp_path)


# --- tensor files ------------------------------------------------------------------------------------------------


def test_npz_uint8_nhwc(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([3, 1, 4, 1]))
    inputs = tensor_file_inputs(tmp_path / "d.npz")
    assert inputs.x.shape == (4, 3, 5, 6) and inputs.x.dtype == torch.float32 and inputs.y.dtype == torch.int64
    assert torch.equal(inputs.x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert inputs.y.tolist() == [3, 1, 4, 1] and inputs.index.tolist() == [0, 1, 2, 3]
    picked = tensor_file_inputs(tmp_path / "d.npz", indices=[3, 1])
    assert picked.index.tolist() == [3, 1] and torch.equal(picked.x, inputs.x[[3, 1]])


def test_npz_float_nchw_and_grey(tmp_path: Path) -> None:
    images = np.random.default_rng(0).random((2, 1, 8, 8)).astype(">f8")  # big-endian, as other tools may write
    np.savez(tmp_path / "d.npz", x=images, y=np.array([0, 9], dtype=np.uint8))
    assert torch.equal(tensor_file_inputs(tmp_path / "d.npz").x, torch.from_numpy(images.astype(np.float32)))
    np.savez(tmp_path / "g.npz", x=images[:, 0], y=[0, 9])
    assert tensor_file_inputs(tmp_path / "g.npz").x.shape == (2, 1, 8, 8)


def test_pt_dict_of_tensors(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    torch.save({"x": images, "y": torch.tensor([1, 2, 3])}, tmp_path / "d.pt")
    inputs = tensor_file_inputs(tmp_path / "d.pt")
    assert torch.equal(inputs.x, images.float() / 255) and inputs.y.tolist() == [1, 2, 3]


def test_tensor_file_errors(tmp_path: Path) -> None:
    def fails(name: str, match: str, **arrays) -> None:
        path = tmp_path / name
        if name.endswith(".npz"):
            np.savez(path, **arrays)
        else:
            torch.save(arrays, path)
        with pytest.raises(DataError, match=match):
            tensor_file_inputs(path)

    hint = r"write one with np\.savez\(PATH, x=images, y=labels\) or torch\.save"
    y2 = np.array([0, 1])
    fails(
        "a.npz",
        r"has neither of the keys 'x' / 'images' for the images \(keys found: 'img', 'y'\); " + hint,
        img=y2,
        y=y2,
    )
    fails("b.npz", "has both of the keys", x=np.zeros((2, 3, 4, 4)), images=np.zeros((2, 3, 4, 4)), y=y2)
    fails("c.npz", r"shape \(2, 3, 4, 3\) are neither .* ambiguous", x=np.zeros((2, 3, 4, 3)), y=y2)
    fails(
        "d.npz",
        r"must lie in \[0, 1\] .* span \[255, 255\]; divide 0\.\.255 images by 255",
        x=np.full((2, 3, 4, 4), 255.0),
        y=y2,
    )
    fails("e.npz", "images are torch.int64; store uint8", x=np.zeros((2, 3, 4, 4), np.int64), y=y2)
    fails(
        "f.npz",
        r"labels have shape \(3,\); expected one label per image, \(2,\)",
        x=np.zeros((2, 3, 4, 4)),
        y=[0, 1, 2],
    )
    fails("g.npz", "labels are torch.float64; store integer class indices", x=np.zeros((2, 3, 4, 4)), y=[0.0, 1.0])
    fails("h.npz", "no NaN or inf", x=np.full((2, 1, 4, 4), np.nan), y=y2)
    fails(
        "i.pt",
        r"refusing to load .*refers to numpy\._core\.multiarray\._reconstruct.*save torch tensors, not numpy",
        x=np.zeros((2, 3, 4, 4)),
        y=y2,
    )
    np.savez(tmp_path / "obj.npz", x=np.array([None, 1], dtype=object), y=y2)
    with pytest.raises(DataError, match="Object arrays cannot be loaded when allow_pickle=False"):
        tensor_file_inputs(tmp_path / "obj.npz")
    with pytest.raises(DataError, match=r"tensor file .*nope\.npz does not exist; " + hint):
        tensor_file_inputs(tmp_path / "nope.npz")
    for name in ("junk.npz", "junk.pt"):
        (tmp_path / name).write_bytes(b"\x80\x02garbage")
        with pytest.raises(DataError, match=rf"{name} is not a readable \.pt file|cannot read .*{name}"):
            tensor_file_inputs(tmp_path / name)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(DataError, match="holds a list, not a dict of tensors"):
        tensor_file_inputs(tmp_path / "list.pt")
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match=r"a tensor file must end in \.npz, \.pt or \.pth, not '\.csv'"):
        tensor_file_inputs(tmp_path / "d.csv")


def test_malicious_pt_tensor_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save(
        {"x": torch.zeros(1, 1, 2, 2), "y": torch.zeros(1, dtype=torch.int64), "z": _RunsShell(marker)},
        tmp_path / "m.pt",
    )
    with pytest.raises(
        DataError, match=r"refusing to load .*m\.pt: unsafe: it holds more than tensors \(it refers to posix\.system"
    ):
        tensor_file_inputs(tmp_path / "m.pt")
    assert not marker.exists()


# --- a user's own data -------------------------------------------------------------------------------------------


def test_user_data_from_arrays_tensors_or_a_dataset_reads_only_what_is_selected():
    from approxtune.data import UserData

    x = np.arange(24, dtype=np.float64).reshape(6, 2, 2) - 5  # any shape, any range: kept as it is, as float32
    y = np.array([0, 1, 2, 0, 1, 2])
    arrays = UserData((x, y)).read([4, 1])
    assert arrays.x.dtype == torch.float32 and arrays.x.shape == (2, 2, 2) and arrays.x[0, 0, 0] == 11
    assert arrays.y.tolist() == [1, 1] and arrays.index.tolist() == [4, 1]

    class Counting(torch.utils.data.Dataset):
        def __init__(self):
            self.read = []

        def __len__(self):
            return 6

        def __getitem__(self, i):
            self.read.append(i)
            return torch.from_numpy(x[i]), int(y[i])

    dataset = Counting()
    from_dataset = UserData(dataset).read([4, 1])
    assert dataset.read == [4, 1] and torch.equal(from_dataset.x, arrays.x) and torch.equal(from_dataset.y, arrays.y)
    assert from_dataset.fingerprint() == arrays.fingerprint()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ((np.zeros((3, 2)), np.zeros(4, int)), "x has 3 inputs but y has 4 labels"),
        ((np.zeros(3), np.zeros(3, int)), r"has shape \(3,\); give a batch \(N, \*shape\)"),
        ((np.zeros((3, 2)), np.array([0, -1, 1])), r"class indices 0, 1, ...; found -1"),
        ((np.zeros((3, 2)), np.array([[0], [1], [1]])), r"labels y have shape \(3, 1\)"),
        ((np.array([[0.0, np.inf], [0, 0], [0, 0]]), np.zeros(3, int)), r"NaN or infinite values \(rows \[0\]\)"),
        ((np.array([["a", "b"]]), np.zeros(1, int)), "holds <U1 values; give numbers"),
        (42, "the data is a int; give \\(x, y\\) tensors or arrays"),
    ],
)
def test_user_data_problems_are_named(data, message):
    from approxtune.data import UserData

    with pytest.raises(DataError, match=message):
        UserData(data).read(range(len(data[0])) if isinstance(data, tuple) else [0])
