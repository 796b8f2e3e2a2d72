"""Batched feature extraction: images, texts and class-prompt ensembles.

Everything runs under `torch.inference_mode()` with AMP on CUDA and returns L2-normalised float32
NumPy arrays, so dot products are cosine similarities.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # not tqdm.auto, whose asyncio class calls iter() twice: DataLoader workers would start twice

from pipeline.images import StoredPixels, load_rgb
from pipeline.pixels import keeps_size
from pipeline.models import LoadedModel


class ImageFiles(Dataset):
    """Image files through a per-sample transform (`pipeline.pixels.SampleTransform`: uint8
    pixels, normalised later per batch); a bad file is an error that names it."""

    def __init__(self, paths: Sequence[str | Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_rgb(self.paths[index]))


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU where it would only slow things down."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StoreBatches:
    """Batches sliced straight from the prepared pixel store: (B, H, W, 3) rows viewed as
    (B, 3, H, W), which is channels-last memory already. The same uint8 values as decoding each row
    through PIL and the (identity) geometry, without the per-image work."""

    def __init__(self, store: np.ndarray, rows: np.ndarray, batch_size: int):
        self.store, self.rows, self.batch_size = store, rows, batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.rows), self.batch_size):
            rows = self.rows[start : start + self.batch_size]
            # One slice when the rows are consecutive (a split is stored in table order), else a gather.
            consecutive = (np.diff(rows) == 1).all()
            block = self.store[rows[0] : rows[-1] + 1] if consecutive else self.store[rows]
            # A slice of the read-only memory map is copied (torch wants writable memory); a gather already is one.
            yield torch.from_numpy(block if block.flags.writeable else block.copy()).permute(0, 3, 1, 2)


def store_batches(loaded: LoadedModel, paths: Sequence, batch_size: int) -> StoreBatches | None:
    """`StoreBatches` when every image is a row of one pixel store at the model's input size (the
    evaluation geometry then leaves it as it is); None otherwise."""
    if not paths or not all(isinstance(p, StoredPixels) for p in paths) or len({p.store for p in paths}) != 1:
        return None
    store = paths[0].array_store()
    if not keeps_size(loaded.eval_pixels[0], store.shape[1], store.shape[2]):
        return None
    return StoreBatches(store, np.array([p.row for p in paths], dtype=np.int64), batch_size)


def image_loader(loaded: LoadedModel, paths: Sequence, batch_size: int, num_workers: int = 0) -> DataLoader | StoreBatches:
    """Batches of the model's evaluation input as uint8 pixels; `encode_image_batches` (or
    `loaded.eval_pixels[1]`) normalises them. Rows of the prepared pixel store that need no resizing
    are sliced from it; everything else goes through a DataLoader."""
    stored = store_batches(loaded, paths, batch_size)
    if stored is not None:
        return stored
    return DataLoader(
        ImageFiles(paths, loaded.eval_pixels[0]),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


class PreprocessedImages:
    """The batches of `image_loader`, preprocessed once and kept (uint8) when they fit in `max_mb`:
    for inputs encoded again and again (validation every epoch, the probe at every depth).
    Otherwise each pass reads the files again."""

    def __init__(self, loaded: LoadedModel, paths: Sequence, batch_size: int, num_workers: int = 0, max_mb: float = 0.0):
        self.loader = image_loader(loaded, paths, batch_size, num_workers)
        self.batch_size = batch_size
        self.pixels: torch.Tensor | None = None
        side = loaded.image_size
        if 3 * side * side * len(paths) <= max_mb * 2**20:
            batches = list(self.loader)
            self.pixels = torch.cat(batches) if batches else torch.zeros((0, 3, side, side), dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.pixels is None:
            yield from self.loader
        else:
            yield from self.pixels.split(self.batch_size)


def image_features(loaded: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    """Unnormalised image embeddings: the tower's output, through the head when there is one."""
    features = loaded.model.encode_image(images)
    return features if loaded.image_head is None else loaded.image_head(features)


@torch.inference_mode()
def encode_image_batches(loaded: LoadedModel, batches, desc: str = "images") -> np.ndarray:
    """Encode an iterable of image batches (B, 3, H, W): uint8 pixels from `image_loader`
    (normalised here, on the device), or model input that is already float."""
    device = loaded.device
    out = []
    normalise = loaded.eval_pixels[1]
    for batch in tqdm(batches, desc=desc, leave=False, disable=None):
        with autocast(device):
            features = image_features(loaded, normalise(batch.to(device, non_blocking=True)))
        out.append(F.normalize(features.float(), dim=-1).cpu())
    if not out:
        return np.zeros((0, loaded.embed_dim), dtype=np.float32)
    return torch.cat(out).numpy()


def encode_images(loaded: LoadedModel, paths: Sequence, batch_size: int = 256, num_workers: int = 0) -> np.ndarray:
    return encode_image_batches(loaded, image_loader(loaded, paths, batch_size, num_workers))


def _text_batches(loaded: LoadedModel, token_batches, total: int, desc: str) -> np.ndarray:
    out = []
    for tokens in tqdm(token_batches, total=total, desc=desc, leave=False, disable=None):
        with autocast(loaded.device):
            features = loaded.model.encode_text(tokens.to(loaded.device))
        out.append(F.normalize(features.float(), dim=-1).cpu())
    if not out:
        return np.zeros((0, loaded.embed_dim), dtype=np.float32)
    return torch.cat(out).numpy()


@torch.inference_mode()
def encode_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 256, desc: str = "texts") -> np.ndarray:
    """Normalised text embeddings, tokenised batch by batch (a caption table of millions is never
    held as tokens all at once)."""
    starts = range(0, len(texts), batch_size)
    token_batches = (loaded.tokenizer(list(texts[start : start + batch_size])) for start in starts)
    return _text_batches(loaded, token_batches, len(starts), desc)


@torch.inference_mode()
def encode_tokens(loaded: LoadedModel, tokens: torch.Tensor, batch_size: int = 256, desc: str = "texts") -> np.ndarray:
    """`encode_texts` of texts tokenised once beforehand (rows of `tokens`): for texts encoded
    again and again, as a validation split's captions are after every epoch (tokenising them took
    a third of the validation's time)."""
    batches = tokens.split(batch_size)
    return _text_batches(loaded, batches, len(batches), desc)


def encode_class_prompts(loaded: LoadedModel, class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """One embedding per class: the normalised mean of its prompts over all templates.

    All class x template prompts go through the text tower in one batched pass, once.
    """
    if not class_names:
        return np.zeros((0, loaded.embed_dim), dtype=np.float32)
    prompts = [template.format(name) for name in class_names for template in templates]
    features = encode_texts(loaded, prompts, desc="class prompts").reshape(len(class_names), len(templates), -1)
    mean = features.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)
