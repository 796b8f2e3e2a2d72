"""Image decoding, the one way every stage and command reads pixels.

Kept apart from `pipeline.datasets` (which only `prepare` needs), so that a stage that merely
decodes images does not depend on the dataset parsers and split logic, and editing those does
not rerun it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from PIL import Image

from pipeline.errors import DatasetError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def check_image(path: Path, max_pixels: Optional[int] = None) -> Optional[str]:
    """Return why the file is not a usable image, or None when it decodes completely.

    The size limit is checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing.
    """
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                return f"{width}x{height} = {width * height:,} pixels, over data.max_image_pixels ({max_pixels:,})"
            img.load()  # decodes everything: a truncated file fails here, verify() would not notice
        return None
    except FileNotFoundError:
        return "file not found"
    except Image.DecompressionBombError as err:
        return f"over PIL's decompression-bomb limit ({err})"
    except Exception as err:  # PIL raises many types for corrupt data
        return f"not a readable image ({type(err).__name__}: {err})"



def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for the model: grayscale, CMYK and palette converted; transparency composited onto white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB, with an error that names the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except Exception as err:  # PIL raises many types for corrupt data
        raise DatasetError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
