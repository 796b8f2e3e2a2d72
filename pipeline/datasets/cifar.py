"""CIFAR-10 from either official release, unpacked to PNGs under the prepared folder.

`data.root` may be the batches folder itself or its parent:

    cifar-10-batches-py/   data_batch_1..5, test_batch, batches.meta      (Python pickles)
    cifar-10-batches-bin/  data_batch_1..5.bin, test_batch.bin, batches.meta.txt
                           (records of 1 label byte + 3072 pixel bytes: R, G, B planes of 32x32)

The pickles are read with a restricted unpickler that only resolves the few numpy globals an
array needs, so a tampered batch cannot run code. The official test batch becomes `test`; a
seeded, per-class `data.val_fraction` of the training batches is held out as `val`.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.datasets.archives import download_and_extract
from pipeline.datasets.base import (
    DEFAULT_TEMPLATES,
    DatasetError,
    PreparedDataset,
    class_entry,
    resolve_root,
    stratified_splits,
)
from pipeline.params import DataParams, SplitRatios

PY_DIR = "cifar-10-batches-py"
BIN_DIR = "cifar-10-batches-bin"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
N_CLASSES = 10
N_PIXELS = 3 * 32 * 32
RECORD_BYTES = 1 + N_PIXELS

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
    root = resolve_root(params)
    found = _locate(root)
    if found is None:
        if not params.download:
            raise DatasetError(_missing_message(root, "data.download is false"))
        _download(root)
        found = _locate(root)
        if found is None:
            raise DatasetError(_missing_message(root, "the downloaded archive did not unpack as expected"))
    folder, kind = found

    if kind == "py":
        names = _read_py_meta(folder / "batches.meta")
        train = [_read_py_batch(folder / name) for name in TRAIN_BATCHES]
        test = _read_py_batch(folder / TEST_BATCH)
    else:
        names = _read_bin_meta(folder / "batches.meta.txt")
        train = [_read_bin_batch(folder / f"{name}.bin") for name in TRAIN_BATCHES]
        test = _read_bin_batch(folder / f"{TEST_BATCH}.bin")
    train_data = np.concatenate([data for data, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    test_data, test_labels = test

    # Hold out val from train per class; stratified_splits wants train/val/test ratios.
    holdout = SplitRatios(train=1.0 - params.val_fraction, val=params.val_fraction, test=0.0)
    train_splits = stratified_splits(train_labels, holdout, params.seed)

    for split in ("train", "val", "test"):
        (out_dir / "images" / "cifar10" / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for prefix, data, labels, splits in (
        ("train", train_data, train_labels, train_splits),
        ("test", test_data, test_labels, np.full(len(test_labels), "test", dtype=object)),
    ):
        for i, (pixels, label, split) in enumerate(zip(data, labels, splits), start=1):
            image_id = f"{prefix}_{i:05d}"
            path = Path("images") / "cifar10" / split / f"{image_id}.png"
            _write_png(out_dir / path, pixels)
            rows.append(
                {
                    "image_id": image_id,
                    "path": path.as_posix(),
                    "split": split,
                    "label": int(label),
                    "class_name": names[label],
                }
            )
    return PreparedDataset(
        source="cifar10",
        images=pd.DataFrame(rows),
        classes=[class_entry(i, name) for i, name in enumerate(names)],
        templates=list(DEFAULT_TEMPLATES),
        image_root=out_dir,
        notes=[f"read {folder} ({'python pickles' if kind == 'py' else 'binary'} version)"],
    )


def _locate(root: Path) -> Optional[tuple[Path, str]]:
    """(batches folder, "py" | "bin"), for root being that folder or its parent; the Python version first."""
    for folder in (root, root / PY_DIR):
        if (folder / TRAIN_BATCHES[0]).is_file():
            return folder, "py"
    for folder in (root, root / BIN_DIR):
        if (folder / f"{TRAIN_BATCHES[0]}.bin").is_file():
            return folder, "bin"
    return None


def _missing_message(root: Path, why: str) -> str:
    from torchvision.datasets import CIFAR10

    return (
        f"CIFAR-10 not found under {root} ({why}). Download {CIFAR10.url} (md5 {CIFAR10.tgz_md5}) and extract it "
        f"into {root}, giving {root / PY_DIR}/data_batch_1 ...; the binary version (cifar-10-binary.tar.gz, "
        f"extracted to {root / BIN_DIR}) works too"
    )


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR10

    try:
        download_and_extract(CIFAR10.url, root, CIFAR10.filename, CIFAR10.tgz_md5, remove_archive=True)
    except DatasetError:
        raise  # an archive member that would escape root: say so, not "download failed"
    except Exception as err:  # no network, HTTP errors, checksum mismatch (RuntimeError)
        raise DatasetError(_missing_message(root, f"downloading failed: {type(err).__name__}: {err}")) from None


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: batch file not found (is the CIFAR-10 folder complete?)")
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


def _read_py_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise DatasetError(f"{path}: no {key!r} entry (found {sorted(map(str, batch))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != N_PIXELS:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DatasetError(f"{path}: 'data' must be an N x {N_PIXELS} uint8 array, got shape {shape} dtype {dtype}")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{path}: 'labels' must be a list of integers") from None
    return data, _check_labels(path, labels, len(data))


def _read_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: batch file not found (is the CIFAR-10 folder complete?)")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise DatasetError(f"{path}: size {raw.size} bytes is not a whole number of {RECORD_BYTES}-byte records")
    records = raw.reshape(-1, RECORD_BYTES)
    return records[:, 1:], _check_labels(path, records[:, 0].astype(np.int64), len(records))


def _check_labels(path: Path, labels: np.ndarray, n: int) -> np.ndarray:
    if labels.shape != (n,):
        raise DatasetError(f"{path}: {labels.size} labels for {n} images")
    bad = np.flatnonzero((labels < 0) | (labels >= N_CLASSES))
    if bad.size:
        raise DatasetError(f"{path}: label {labels[bad[0]]} of image {bad[0]} is outside 0..{N_CLASSES - 1}")
    return labels


def _read_py_meta(path: Path) -> list[str]:
    meta = _unpickle(path)
    names = meta.get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DatasetError(f"{path}: 'label_names' must be a list of strings")
    return _check_names(path, [n.decode("utf-8") if isinstance(n, bytes) else n for n in names])


def _read_bin_meta(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: class names file not found (is the CIFAR-10 folder complete?)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not a text file of class names ({err})") from None
    # The official file ends with blank lines.
    return _check_names(path, [line.strip() for line in text.splitlines() if line.strip()])


def _check_names(path: Path, names: list[str]) -> list[str]:
    if len(names) != N_CLASSES:
        raise DatasetError(f"{path}: expected {N_CLASSES} class names, found {len(names)}")
    return names


def _write_png(path: Path, pixels: np.ndarray) -> None:
    # Channel planes (R, G, B of 32x32 each) -> height x width x channel.
    Image.fromarray(pixels.reshape(3, 32, 32).transpose(1, 2, 0)).save(path)
