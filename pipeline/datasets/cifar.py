"""CIFAR-10 and CIFAR-100 from either official release, unpacked to PNGs under the prepared folder.

`data.root` may be the batches folder itself or its parent:

    cifar-10-batches-py/   data_batch_1..5, test_batch, batches.meta       (Python pickles)
    cifar-10-batches-bin/  data_batch_1..5.bin, test_batch.bin, batches.meta.txt
                           (records of 1 label byte + 3072 pixel bytes: R, G, B planes of 32x32)
    cifar-100-python/      train, test, meta                               (Python pickles)
    cifar-100-binary/      train.bin, test.bin, fine_label_names.txt
                           (records of 1 coarse label byte + 1 fine label byte + 3072 pixel bytes)

CIFAR-100 uses the 100 fine labels (`fine_labels`, named by `fine_label_names`); the 20 coarse
superclasses are not used. Class names have `_` written as a space (`aquarium_fish` -> `aquarium
fish`), which gives CLIP's CIFAR-100 class names (openai/CLIP data/prompts.md); the raw name stays
in `aliases`. Both variants prompt with CLIP's 18 CIFAR templates (`CIFAR_TEMPLATES`), the set
behind the published zero-shot figures (README: "What to expect").

The pickles are read with a restricted unpickler that only resolves the few numpy globals an
array needs, so a tampered batch cannot run code. The official test batch becomes `test`; a
seeded, per-class `data.val_fraction` of the training batches is held out as `val`.
"""

from __future__ import annotations

import codecs
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.datasets.archives import download_and_extract
from pipeline.datasets.base import (
    DatasetError,
    PreparedDataset,
    class_entry,
    resolve_root,
    stratified_splits,
)
from pipeline.params import DataParams, SplitRatios

N_PIXELS = 3 * 32 * 32
# CLIP's CIFAR-10/100 prompts (openai/CLIP data/prompts.md; CLIP_benchmark's
# en_zeroshot_classification_templates.json), as the published ViT-B/32 figures were made with.
CIFAR_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
]


@dataclass(frozen=True)
class Variant:
    """Where one CIFAR release keeps what, and how its records are laid out."""

    source: str  # the data.source name
    title: str
    n_classes: int
    py_dir: str
    py_train: tuple[str, ...]
    py_test: str
    py_meta: str
    labels_key: str  # in the Python batches
    names_key: str  # in the Python meta file
    bin_dir: str
    bin_train: tuple[str, ...]
    bin_test: str
    bin_names: str  # one class name per line
    label_bytes: int  # label bytes in front of each binary record; the label used is the last one
    # The Python version's archive, with the MD5 that torchvision's CIFAR10/CIFAR100 check too.
    url: str
    archive: str
    md5: str
    bin_archive: str

    @property
    def record_bytes(self) -> int:
        return self.label_bytes + N_PIXELS


CIFAR10 = Variant(
    source="cifar10",
    title="CIFAR-10",
    n_classes=10,
    py_dir="cifar-10-batches-py",
    py_train=tuple(f"data_batch_{i}" for i in range(1, 6)),
    py_test="test_batch",
    py_meta="batches.meta",
    labels_key="labels",
    names_key="label_names",
    bin_dir="cifar-10-batches-bin",
    bin_train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    bin_test="test_batch.bin",
    bin_names="batches.meta.txt",
    label_bytes=1,
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive="cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    bin_archive="cifar-10-binary.tar.gz",
)
CIFAR100 = Variant(
    source="cifar100",
    title="CIFAR-100",
    n_classes=100,
    py_dir="cifar-100-python",
    py_train=("train",),
    py_test="test",
    py_meta="meta",
    labels_key="fine_labels",
    names_key="fine_label_names",
    bin_dir="cifar-100-binary",
    bin_train=("train.bin",),
    bin_test="test.bin",
    bin_names="fine_label_names.txt",
    label_bytes=2,  # coarse, then fine
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive="cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    bin_archive="cifar-100-binary.tar.gz",
)
VARIANTS = {variant.source: variant for variant in (CIFAR10, CIFAR100)}

try:  # numpy >= 2 moved the module; pickles written by either name must load
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

# Everything a pickled numpy array needs; resolved from this table, never imported by name.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1").
    ("_codecs", "encode"): codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path):
        # encoding="bytes": the batches were pickled by Python 2, whose str becomes bytes here.
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self.path}: refusing to unpickle global {module}.{name} (a CIFAR batch holds only numpy "
                "arrays, lists and bytes; this file is not a genuine batch)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(f"{self.path}: refusing to unpickle a persistent reference")


def prepare(params: DataParams, out_dir: Path) -> PreparedDataset:
    variant = VARIANTS[params.source]
    root = resolve_root(params)
    found = _locate(root, variant)
    if found is None:
        if not params.download:
            raise DatasetError(_missing_message(root, variant, "data.download is false"))
        _download(root, variant)
        found = _locate(root, variant)
        if found is None:
            raise DatasetError(_missing_message(root, variant, "the downloaded archive did not unpack as expected"))
    folder, kind = found

    if kind == "py":
        names = _read_py_meta(folder / variant.py_meta, variant)
        train = [_read_py_batch(folder / name, variant) for name in variant.py_train]
        test = _read_py_batch(folder / variant.py_test, variant)
    else:
        names = _read_bin_meta(folder / variant.bin_names, variant)
        train = [_read_bin_batch(folder / name, variant) for name in variant.bin_train]
        test = _read_bin_batch(folder / variant.bin_test, variant)
    train_data = np.concatenate([data for data, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    test_data, test_labels = test

    # Hold out val from train per class; stratified_splits wants train/val/test ratios.
    holdout = SplitRatios(train=1.0 - params.val_fraction, val=params.val_fraction, test=0.0)
    train_splits = stratified_splits(train_labels, holdout, params.seed)

    # Prompt names: CLIP's CIFAR-100 names are the raw ones with "_" as a space (CIFAR-10's have none).
    display = [name.replace("_", " ") for name in names]
    image_folder = Path("images") / variant.source
    for split in ("train", "val", "test"):
        (out_dir / image_folder / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for prefix, data, labels, splits in (
        ("train", train_data, train_labels, train_splits),
        ("test", test_data, test_labels, np.full(len(test_labels), "test", dtype=object)),
    ):
        for i, (pixels, label, split) in enumerate(zip(data, labels, splits), start=1):
            image_id = f"{prefix}_{i:05d}"
            path = image_folder / split / f"{image_id}.png"
            _write_png(out_dir / path, pixels)
            rows.append(
                {
                    "image_id": image_id,
                    "path": path.as_posix(),
                    "split": split,
                    "label": int(label),
                    "class_name": display[label],
                }
            )
    return PreparedDataset(
        source=variant.source,
        images=pd.DataFrame(rows),
        classes=[class_entry(i, name, list(dict.fromkeys([name, raw]))) for i, (name, raw) in enumerate(zip(display, names))],
        templates=list(CIFAR_TEMPLATES),
        image_root=out_dir,
        notes=[f"read {folder} ({'python pickles' if kind == 'py' else 'binary'} version)"],
    )


def _locate(root: Path, variant: Variant = CIFAR10) -> Optional[tuple[Path, str]]:
    """(batches folder, "py" | "bin"), for root being that folder or its parent; the Python version first."""
    for folder in (root, root / variant.py_dir):
        if (folder / variant.py_train[0]).is_file():
            return folder, "py"
    for folder in (root, root / variant.bin_dir):
        if (folder / variant.bin_train[0]).is_file():
            return folder, "bin"
    return None


def _missing_message(root: Path, variant: Variant, why: str) -> str:
    return (
        f"{variant.title} not found under {root} ({why}). Download {variant.url} (md5 {variant.md5}) and extract "
        f"it into {root}, giving {root / variant.py_dir}/{variant.py_train[0]} ...; the binary version "
        f"({variant.bin_archive}, extracted to {root / variant.bin_dir}) works too"
    )


def _download(root: Path, variant: Variant) -> None:
    try:
        download_and_extract(variant.url, root, variant.archive, variant.md5, remove_archive=True)
    except DatasetError:
        raise  # an archive member that would escape root: say so, not "download failed"
    except Exception as err:  # no network, HTTP errors, checksum mismatch (RuntimeError)
        raise DatasetError(_missing_message(root, variant, f"downloading failed: {type(err).__name__}: {err}")) from None


def _unpickle(path: Path, variant: Variant = CIFAR10) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: batch file not found (is the {variant.title} folder complete?)")
    try:
        with path.open("rb") as file:
            obj = _BatchUnpickler(file, path).load()
    except DatasetError:
        raise
    except Exception as err:  # truncated or garbage data: UnpicklingError, EOFError, ValueError, ...
        raise DatasetError(f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(obj).__name__}")
    # Keys are bytes in the official (Python 2) files; accept str keys from re-pickled copies.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_py_batch(path: Path, variant: Variant = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path, variant)
    for key in ("data", variant.labels_key):
        if key not in batch:
            raise DatasetError(f"{path}: no {key!r} entry (found {sorted(map(str, batch))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != N_PIXELS:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DatasetError(f"{path}: 'data' must be an N x {N_PIXELS} uint8 array, got shape {shape} dtype {dtype}")
    try:
        labels = np.asarray(batch[variant.labels_key], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{path}: {variant.labels_key!r} must be a list of integers") from None
    return data, _check_labels(path, labels, len(data), variant)


def _read_bin_batch(path: Path, variant: Variant = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: batch file not found (is the {variant.title} folder complete?)")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % variant.record_bytes:
        raise DatasetError(f"{path}: size {raw.size} bytes is not a whole number of {variant.record_bytes}-byte records")
    records = raw.reshape(-1, variant.record_bytes)
    labels = records[:, variant.label_bytes - 1].astype(np.int64)  # CIFAR-100: the fine label, after the coarse one
    return records[:, variant.label_bytes :], _check_labels(path, labels, len(records), variant)


def _check_labels(path: Path, labels: np.ndarray, n: int, variant: Variant = CIFAR10) -> np.ndarray:
    if labels.shape != (n,):
        raise DatasetError(f"{path}: {labels.size} labels for {n} images")
    bad = np.flatnonzero((labels < 0) | (labels >= variant.n_classes))
    if bad.size:
        raise DatasetError(f"{path}: label {labels[bad[0]]} of image {bad[0]} is outside 0..{variant.n_classes - 1}")
    return labels


def _read_py_meta(path: Path, variant: Variant = CIFAR10) -> list[str]:
    meta = _unpickle(path, variant)
    names = meta.get(variant.names_key)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DatasetError(f"{path}: {variant.names_key!r} must be a list of strings")
    try:
        decoded = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: {variant.names_key!r} holds a name that is not UTF-8 ({err})") from None
    return _check_names(path, decoded, variant)


def _read_bin_meta(path: Path, variant: Variant = CIFAR10) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: class names file not found (is the {variant.title} folder complete?)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a text file of class names ({err})") from None
    # The official file ends with blank lines.
    return _check_names(path, [line.strip() for line in text.splitlines() if line.strip()], variant)


def _check_names(path: Path, names: list[str], variant: Variant = CIFAR10) -> list[str]:
    if len(names) != variant.n_classes:
        raise DatasetError(f"{path}: expected {variant.n_classes} class names, found {len(names)}")
    return names


def _write_png(path: Path, pixels: np.ndarray) -> None:
    # Channel planes (R, G, B of 32x32 each) -> height x width x channel.
    Image.fromarray(pixels.reshape(3, 32, 32).transpose(1, 2, 0)).save(path)
