"""Image datasets read from local files: ImageNet-style folders, ObjectNet, Fashion-MNIST (IDX),
and CIFAR-10/100 and STL-10 through torchvision. Nothing is downloaded: a missing root is an error
that says how to get the files.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sslbench import hookimpl
from sslbench.errors import SSLBenchError
from sslbench.imagenet_val import IMAGE_EXTENSIONS
from sslbench.imaging import load_rgb
from sslbench.inputs import NO_LABEL
from sslbench.interfaces import Dataset, DatasetEntry, Split

from .datasets import ArraySplit


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FileSplit(Split):
    """Images listed as files, read with PIL in the listed order."""

    def __init__(self, root: Path, files: Sequence[str], labels: np.ndarray) -> None:
        self.root = root
        self.files = list(files)
        self._labels = labels.astype(np.int64)
        self._fingerprint: str | None = None

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        return load_rgb(self.root / self.files[index])

    def reduced_sample(self, index: int, min_side: int) -> Any:
        return load_rgb(self.root / self.files[index], min_side)

    def describe(self, index: int) -> str:
        return str(self.root / self.files[index])

    def fingerprint(self) -> str:
        """A digest of the relative file names and their labels, computed once per split.

        Dataset files are taken as immutable: no file is stat'ed or read here (ImageNet's train split
        would cost 1.28 M ``stat`` calls per model), so an image replaced in place under the same
        name is not detected (clear its cache entries, or give it a new name), while a file added,
        removed or renamed, or a changed label, gives another digest and so a new extraction.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, label in zip(self.files, self._labels.tolist(), strict=True):
                digest.update(f"{name}\0{label}\n".encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


# Errors pathlib's globbing treats as "not there" rather than raising (a dangling or looping link).
_IGNORED_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP})


def _entry_is(entry: os.DirEntry[str], kind: Literal["dir", "file"], follow_symlinks: bool = True) -> bool:
    """``entry.is_dir()``/``is_file()`` as ``Path.is_dir()``/``is_file()`` answer: false for a dangling link."""
    try:
        if kind == "dir":
            return entry.is_dir(follow_symlinks=follow_symlinks)
        return entry.is_file(follow_symlinks=follow_symlinks)
    except OSError as exc:
        if exc.errno in _IGNORED_ERRNOS:
            return False
        raise


def _is_image_name(name: str) -> bool:
    # Path.suffix's rule: the part from the last dot, unless that dot starts the name (".jpg" is hidden).
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def _image_files(folder: Path) -> list[str]:
    """The image files anywhere under ``folder``, as sorted paths relative to it.

    Walks with ``os.scandir``, whose entries know their file type from the directory listing, so a
    regular file costs no ``stat`` call (a symlink costs one, to see what it points at). The result is
    ``folder.rglob("*")`` filtered by suffix and ``is_file()``, as before: symlinked files count,
    symlinked folders inside ``folder`` are not descended into, unreadable folders are skipped.
    """
    found: list[str] = []
    pending = [(os.fspath(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as listing:
                entries = list(listing)
        except PermissionError:
            continue
        except OSError as exc:
            if exc.errno in _IGNORED_ERRNOS:
                continue
            raise
        for entry in entries:
            if _entry_is(entry, "dir", follow_symlinks=False):
                pending.append((entry.path, f"{prefix}{entry.name}{os.sep}"))
            elif _is_image_name(entry.name) and _entry_is(entry, "file"):
                found.append(f"{prefix}{entry.name}")
    return sorted(found)


def _subfolders(folder: Path) -> list[str]:
    """Sorted names of the folders (or links to folders) directly in ``folder``, without a ``stat`` each."""
    with os.scandir(folder) as listing:
        return sorted(entry.name for entry in listing if _entry_is(entry, "dir"))


def _need_dir(path: Path, what: str, how: str) -> Path:
    if not path.is_dir():
        raise SSLBenchError(f"{what} not found: {path} ({how})")
    return path


# --------------------------------------------------------------------------------------------------
# ImageNet-style folders


class ImageFolderOptions(_Options):
    root: str = Field(description="folder holding one sub-folder per split")
    splits: dict[str, str] = Field(
        default={"train": "train", "val": "val"}, description="split name → sub-folder of root"
    )


def load_image_folder(options: ImageFolderOptions) -> Dataset:
    """``root/<split>/<class>/<image>``; classes are the sorted class folders of all splits."""
    root = _need_dir(Path(options.root).expanduser(), "image folder root", "expected root/<split>/<class>/*")
    folders = {
        name: _need_dir(root / sub, f"split '{name}' folder", "expected one sub-folder per class")
        for name, sub in options.splits.items()
    }
    class_folders = {name: _subfolders(folder) for name, folder in folders.items()}
    classes = sorted({cls for names in class_folders.values() for cls in names})
    if not classes:
        raise SSLBenchError(f"no class folders under {root}")
    index = {name: i for i, name in enumerate(classes)}
    splits: dict[str, Split] = {}
    for name, folder in folders.items():
        files, labels = [], []
        for cls in class_folders[name]:
            for file in _image_files(folder / cls):
                files.append(f"{cls}/{file}")
                labels.append(index[cls])
        if not files:
            raise SSLBenchError(f"split '{name}' has no images under {folder}")
        splits[name] = FileSplit(folder, files, np.array(labels))
    return Dataset("imagefolder", classes, splits, f"image folders under {root}")


# --------------------------------------------------------------------------------------------------
# Folders of images without classes


class ImagesOptions(_Options):
    root: str = Field(description="folder holding one sub-folder per split")
    splits: dict[str, str] = Field(
        default={"train": "train", "val": "val"}, description="split name → sub-folder of root"
    )


def load_images(options: ImagesOptions) -> Dataset:
    """``root/<split>/**/<image>`` without class labels: every image under a split's folder, at any
    depth, in sorted path order; sub-folders are not classes."""
    root = _need_dir(Path(options.root).expanduser(), "image folder root", "expected root/<split>/*")
    splits: dict[str, Split] = {}
    for name, sub in options.splits.items():
        folder = _need_dir(root / sub, f"split '{name}' folder", "expected one sub-folder per split")
        files = _image_files(folder)
        if not files:
            raise SSLBenchError(f"split '{name}' has no images under {folder}")
        splits[name] = FileSplit(folder, files, np.full(len(files), NO_LABEL, dtype=np.int64))
    return Dataset("images", [], splits, f"images without labels under {root}")


# --------------------------------------------------------------------------------------------------
# ObjectNet


class ObjectNetOptions(_Options):
    root: str = Field(description="the objectnet-1.0 folder (images/, mappings/)")


def load_objectnet(options: ObjectNetOptions) -> Dataset:
    """ObjectNet's 313 classes as one ``test`` split, with its mapping onto ImageNet-1k classes.

    ``metadata["imagenet_classes"]`` maps each ObjectNet class index to the ImageNet class indices
    it corresponds to (empty for the classes ImageNet does not have); ``metadata["in_imagenet"]``
    flags the intersecting classes, and ``metadata["class_groups"]`` lists both groups, so that
    clusters fitted on ObjectNet report ACC on each (the paper's Table 2).
    """
    how = "download ObjectNet from objectnet.dev and unpack it; give the objectnet-1.0 folder"
    root = _need_dir(Path(options.root).expanduser(), "ObjectNet root", how)
    images = _need_dir(root / "images", "ObjectNet images folder", how)
    mappings = _need_dir(root / "mappings", "ObjectNet mappings folder", how)
    try:
        folder_to_label = json.loads((mappings / "folder_to_objectnet_label.json").read_text())
        to_imagenet = json.loads((mappings / "objectnet_to_imagenet_1k.json").read_text())
        imagenet_names = [
            line.strip() for line in (mappings / "imagenet_to_label_2012_v2").read_text().splitlines() if line.strip()
        ]
    except FileNotFoundError as exc:
        raise SSLBenchError(f"ObjectNet mapping file missing: {exc.filename}") from None
    folders = _subfolders(images)
    classes = [folder_to_label.get(f, f) for f in folders]
    imagenet_index = {name: i for i, name in enumerate(imagenet_names)}
    imagenet_classes = []
    for label in classes:
        names = [n.strip() for n in to_imagenet.get(label, "").split(";") if n.strip()]
        imagenet_classes.append([imagenet_index[n] for n in names if n in imagenet_index])
    files, labels = [], []
    for i, folder in enumerate(folders):
        for file in _image_files(images / folder):
            files.append(f"{folder}/{file}")
            labels.append(i)
    split = FileSplit(images, files, np.array(labels))
    metadata = {
        "imagenet_classes": imagenet_classes,
        "in_imagenet": [bool(c) for c in imagenet_classes],
        # Table 2 splits ACC into these two groups.
        "class_groups": {
            "in_imagenet": [i for i, c in enumerate(imagenet_classes) if c],
            "not_in_imagenet": [i for i, c in enumerate(imagenet_classes) if not c],
        },
    }
    return Dataset("objectnet", classes, {"test": split}, "ObjectNet 1.0", metadata)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


PositiveCount = Annotated[int, Field(ge=1)]


class FashionMNISTOptions(_Options):
    root: str = Field(DEBIAN_FASHION_MNIST, description="folder with the four IDX files (.gz or not)")
    limit: PositiveCount | dict[Literal["train", "test"], PositiveCount] | None = Field(
        None,
        description="use only the first N images of each split, or per split: {train: 5000, test: 1000}",
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise SSLBenchError(f"{path} is not an IDX file")
    dtypes: dict[int, Any] = {
        0x08: np.uint8,
        0x09: np.int8,
        0x0B: ">i2",
        0x0C: ">i4",
        0x0D: ">f4",
        0x0E: ">f8",
    }
    if data[2] not in dtypes:
        raise SSLBenchError(f"{path}: unknown IDX type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * np.dtype(dtypes[data[2]]).itemsize
    if len(data) - offset != expected:
        raise SSLBenchError(f"{path}: truncated IDX file ({len(data) - offset} of {expected} bytes)")
    return np.frombuffer(data, dtype=dtypes[data[2]], offset=offset).reshape(shape).copy()


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise SSLBenchError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root} "
        "(apt-get install dataset-fashion-mnist, or give root: with the four IDX files)"
    )


def load_fashion_mnist(options: FashionMNISTOptions) -> Dataset:
    root = Path(options.root).expanduser()
    splits: dict[str, Split] = {}
    names: tuple[tuple[Literal["train", "test"], str], ...] = (("train", "train"), ("test", "t10k"))
    for split, prefix in names:
        images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        limit = options.limit.get(split) if isinstance(options.limit, dict) else options.limit
        if limit:
            images, labels = images[:limit], labels[:limit]
        splits[split] = ArraySplit(images, labels, as_image=True)
    return Dataset("fashion_mnist", list(FASHION_MNIST_CLASSES), splits, f"Fashion-MNIST from {root}")


# --------------------------------------------------------------------------------------------------
# torchvision datasets (no download)


class TorchvisionOptions(_Options):
    root: str = Field(description="the folder torchvision's dataset class reads")


class _TorchvisionSplit(Split):
    def __init__(self, dataset: Any, labels: np.ndarray) -> None:
        self.dataset = dataset
        self._labels = labels.astype(np.int64)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index][0]


def _torchvision(name: str, how: str) -> Callable[[TorchvisionOptions], Dataset]:
    def load(options: TorchvisionOptions) -> Dataset:
        try:
            from torchvision import datasets
        except ImportError:
            raise SSLBenchError(f"dataset '{name}' needs torchvision") from None
        root = Path(options.root).expanduser()
        splits: dict[str, Split] = {}
        classes: list[str] = []
        for split in ("train", "test"):
            try:
                if name == "stl10":
                    ds = datasets.STL10(str(root), split=split, download=False)
                    labels = np.asarray(ds.labels)
                else:
                    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
                    ds = cls(str(root), train=split == "train", download=False)
                    labels = np.asarray(ds.targets)
            except RuntimeError as exc:
                raise SSLBenchError(f"{name} not found under {root} ({how}): {exc}") from None
            splits[split] = _TorchvisionSplit(ds, labels)
            classes = list(ds.classes)
        return Dataset(name, classes, splits, f"{name} from {root}")

    return load


@hookimpl
def sslbench_register_datasets(register: Callable[[DatasetEntry], None]) -> None:
    register(
        DatasetEntry(
            "imagefolder",
            load_image_folder,
            "ImageNet-style root/<split>/<class>/<image> folders (see `sslbench prepare-imagenet-val`)",
            ImageFolderOptions,
        )
    )
    register(
        DatasetEntry(
            "images",
            load_images,
            "images without class labels, root/<split>/**/<image>: clustered and given label-free scores",
            ImagesOptions,
            labeled=lambda options: False,
        )
    )
    register(
        DatasetEntry(
            "objectnet",
            load_objectnet,
            "ObjectNet 1.0 (split test), with its ImageNet class mapping",
            ObjectNetOptions,
        )
    )
    register(
        DatasetEntry(
            "fashion_mnist",
            load_fashion_mnist,
            "Fashion-MNIST IDX files (splits train, test)",
            FashionMNISTOptions,
        )
    )
    how = "fetch it once with torchvision's download=True on a machine with network, then copy the folder"
    for name in ("cifar10", "cifar100", "stl10"):
        register(
            DatasetEntry(
                name,
                _torchvision(name, how),
                f"{name} via torchvision (splits train, test)",
                TorchvisionOptions,
            )
        )
