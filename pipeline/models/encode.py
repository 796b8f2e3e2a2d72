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

from pipeline.images import load_rgb
from pipeline.models import LoadedModel


class ImageFiles(Dataset):
    """Image files through a transform; a bad file is an error that names it."""

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


def image_loader(paths: Sequence, transform: Callable, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        ImageFiles(paths, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def image_features(loaded: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    """Unnormalised image embeddings: the tower's output, through the head when there is one."""
    features = loaded.model.encode_image(images)
    return features if loaded.image_head is None else loaded.image_head(features)


@torch.inference_mode()
def encode_image_batches(loaded: LoadedModel, batches, desc: str = "images") -> np.ndarray:
    """Encode an iterable of image tensors (B, 3, H, W)."""
    device = loaded.device
    out = []
    for batch in tqdm(batches, desc=desc, leave=False, disable=None):
        with autocast(device):
            features = image_features(loaded, batch.to(device, non_blocking=True))
        out.append(F.normalize(features.float(), dim=-1).cpu())
    if not out:
        return np.zeros((0, loaded.embed_dim), dtype=np.float32)
    return torch.cat(out).numpy()


def encode_images(loaded: LoadedModel, paths: Sequence, batch_size: int = 256, num_workers: int = 0) -> np.ndarray:
    return encode_image_batches(loaded, image_loader(paths, loaded.preprocess, batch_size, num_workers))


@torch.inference_mode()
def encode_texts(loaded: LoadedModel, texts: Sequence[str], batch_size: int = 256, desc: str = "texts") -> np.ndarray:
    model, device = loaded.model, loaded.device
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, disable=None):
        tokens = loaded.tokenizer(list(texts[start : start + batch_size])).to(device)
        with autocast(device):
            features = model.encode_text(tokens)
        out.append(F.normalize(features.float(), dim=-1).cpu())
    if not out:
        return np.zeros((0, loaded.embed_dim), dtype=np.float32)
    return torch.cat(out).numpy()


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
