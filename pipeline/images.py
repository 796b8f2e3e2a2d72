"""Image decoding, the one way every stage and command reads pixels.

Kept apart from `pipeline.datasets` (which only `prepare` needs), so that a stage that merely
decodes images does not depend on the dataset parsers and split logic, and editing those does
not rerun it.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
from PIL import Image

from pipeline.errors import ArtifactError, DatasetError

if TYPE_CHECKING:
    import pandas as pd

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class TarMember:
    """An image inside an uncompressed tar shard (WebDataset), read by the byte range `prepare`
    recorded, so no stage extracts files or scans the tar. Picklable like a path, for DataLoader
    workers."""

    shard: str  # the tar file
    member: str  # the member's name in the tar: the sample's key and an extension, e.g. 000123.jpg
    offset: int  # where the member's data starts in the tar
    size: int  # bytes

    def __str__(self) -> str:
        return f"{self.shard}:{self.member}"  # what an error names: the shard, and the key in the member's name

    def read(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise EOFError(f"the shard ends {self.size - len(data)} bytes before the end of member {self.member} (truncated shard)")
        return data


@dataclass(frozen=True)
class StoredPixels:
    """An image that `prepare` decoded into the prepared folder's pixel store (`PIXEL_STORE`: all
    images of one size, in one uint8 array), read back by memory map with nothing to decode."""

    store: str  # the .npy file
    row: int
    path: str  # the image it was decoded from: what an error or a figure names

    def __str__(self) -> str:
        return self.path

    def array(self) -> np.ndarray:
        return pixel_store(self.store)[self.row]

    def array_store(self) -> np.ndarray:
        """The whole (n, height, width, 3) store this row belongs to, memory-mapped."""
        return pixel_store(self.store)


PIXEL_STORE = "pixels.npy"


@lru_cache(maxsize=4)
def pixel_store(path: str) -> np.ndarray:
    """(n, height, width, 3) uint8, memory-mapped: the pages are shared by every process that reads them."""
    try:
        store = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:  # truncated: "mmap length is greater than file size"
        if isinstance(err, FileNotFoundError):
            raise
        raise ArtifactError(f"{path}: not a readable pixel store ({err})", "rerun `dvc repro prepare`") from None
    if store.ndim != 4 or store.shape[-1] != 3 or store.dtype != np.uint8:
        raise ArtifactError(f"{path}: a {store.dtype} array of shape {store.shape}, not (n, height, width, 3) uint8 pixels", "rerun `dvc repro prepare`")
    return store


ImageRef = Union[str, Path, TarMember, StoredPixels]


def image_refs(images: pd.DataFrame, image_root: Path) -> list[ImageRef]:
    """Where each row's image is: its file under `image_root`, or, for a WebDataset row (a manifest
    with shard, member, offset and size), its byte range in the tar shard."""
    if not {"shard", "member", "offset", "size"} <= set(images.columns):
        return [image_root / p for p in images["path"]]
    return [
        TarMember(str(image_root / shard), member, int(offset), int(size))
        for shard, member, offset, size in zip(images["shard"], images["member"], images["offset"], images["size"])
    ]


def tar_member_at(path: Path) -> Optional[TarMember]:
    """`<shard>.tar/<member>` (the `path` of a WebDataset row, joined to its root) as a TarMember;
    None when no parent folder of `path` is a tar file. For callers that have only a path (the
    report's example figures, the gallery); the stages get TarMembers from `Prepared.image_paths`."""
    for shard in path.parents:
        if shard.suffix == ".tar" and shard.is_file():
            stat = shard.stat()
            name = path.relative_to(shard).as_posix()
            found = _tar_index(str(shard), stat.st_mtime_ns, stat.st_size).get(name)
            return None if found is None else TarMember(str(shard), name, *found)
    return None


@lru_cache(maxsize=8)
def _tar_index(shard: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size): one pass over the headers (mtime and size key the cache)."""
    try:
        with tarfile.open(shard, "r:") as tar:
            return {m.name: (m.offset_data, m.size) for m in tar if m.isreg()}
    except tarfile.TarError as err:
        raise DatasetError(f"{shard}: not a readable uncompressed tar file ({err})") from None


class _MemberBytes(io.BytesIO):
    """A tar member's bytes, whose repr (in PIL's "cannot identify image file ...") names the
    member instead of a memory address, so rejection records are the same on every run."""

    def __init__(self, member: TarMember):
        super().__init__(member.read())
        self.member = str(member)

    def __repr__(self) -> str:
        return repr(self.member)


def file_sha256(ref: Path | TarMember) -> str:
    """SHA-256 of the image's bytes (a file, or a tar member's byte range), as hex: byte-identical
    files are one content, whatever their names."""
    if isinstance(ref, TarMember):
        return hashlib.sha256(ref.read()).hexdigest()
    with open(ref, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def pixel_sha256(ref: ImageRef) -> str:
    """SHA-256 of the image as the model receives it (its RGB pixels and size), as hex: byte-identical
    files, and re-encodings of the same pixels (a PNG saved again, another container), are one
    content, whatever their names. Raises DatasetError naming the file when it cannot be decoded."""
    rgb = load_rgb(ref)
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def openable(ref: ImageRef):
    """What PIL opens: the file itself, or a tar member's bytes."""
    return _MemberBytes(ref) if isinstance(ref, TarMember) else ref


def check_image(path: Path | TarMember, max_pixels: Optional[int] = None, limit_name: str = "data.max_image_pixels") -> Optional[str]:
    """Return why the file (or tar member) is not a usable image, or None when it decodes completely.

    The size limit is checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing.
    """
    try:
        if (path.size if isinstance(path, TarMember) else path.stat().st_size) == 0:
            return "empty file (0 bytes)"
        with Image.open(openable(path)) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                return f"{width}x{height} = {width * height:,} pixels, over {limit_name} ({max_pixels:,})"
            img.load()  # decodes everything: a truncated file fails here, verify() would not notice
        return None
    except FileNotFoundError:
        return "file not found"
    except Image.DecompressionBombError as err:
        return f"over PIL's decompression-bomb limit ({err})"
    except Exception as err:  # PIL raises many types for corrupt data
        return f"not a readable image ({type(err).__name__}: {err})"



# Modes holding more than 8 bits a pixel: PIL's convert("RGB") clips them at 255 instead of scaling,
# so a mid-grey 16-bit image (32768) came out white.
HIGH_BIT_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for the model: grayscale, CMYK and palette converted; 16-bit images scaled to 8 bits
    (a 16-bit PNG opens as mode I holding 0-65535); transparency composited onto white."""
    if img.mode in HIGH_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)
        scaled = np.clip(np.rint(values * (255 / HIGH_BIT_MODES[img.mode])), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def pixel_count(ref: ImageRef) -> int:
    """Width x height, from the header (or the pixel store): nothing is decoded."""
    if isinstance(ref, StoredPixels):
        height, width = ref.array().shape[:2]
        return int(height * width)
    with Image.open(openable(ref)) as img:
        return img.width * img.height


def load_rgb(path: ImageRef) -> Image.Image:
    """Open an image (a file, a TarMember, a `<shard>.tar/<member>` path, or a row of the pixel
    store) as RGB, with an error that names the file (the shard and member) when it cannot be read."""
    if isinstance(path, StoredPixels):
        return Image.fromarray(np.asarray(path.array()))  # (h, w, 3) uint8: RGB
    try:
        with Image.open(openable(path)) as img:
            return to_rgb(img)
    except (FileNotFoundError, NotADirectoryError) as err:
        member = None if isinstance(path, TarMember) else tar_member_at(Path(path))
        if member is not None:
            return load_rgb(member)
        reason = "image file not found" if isinstance(err, FileNotFoundError) else f"not a readable image ({type(err).__name__}: {err})"
        raise DatasetError(f"{path}: {reason}") from None
    except Exception as err:  # PIL raises many types for corrupt data
        raise DatasetError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
