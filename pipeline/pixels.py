"""How images become model input, fast: decode once, geometry per sample, normalise per batch.

open_clip's transforms do everything per image: PIL resize/crop, then ToTensor and Normalize on
one small float tensor at a time. Here the same steps are split in two:

- `SampleTransform` (per sample, in the Dataset, maybe in a DataLoader worker): the PIL steps,
  then the pixels as a uint8 (3, H, W) tensor. A RandomResizedCrop draws its box from the
  sample's own NumPy generator, so no torch RNG state is forked per sample; other random steps
  (flip, colour jitter) keep torch's RNG, seeded per sample (`PerSampleRandom`).
- `Normalise` (per batch, on the device): uint8 -> float / 255 -> (x - mean) / std, the same float
  operations as ToTensor + Normalize, so an evaluation batch is bit-identical to stacking
  open_clip's `preprocess` outputs. uint8 batches are a quarter of the bytes to move to a GPU.

`DecodedImages` keeps a split's decoded images in memory when they fit in a bound
(`runtime.image_cache_mb`), so training decodes each image once, not once per epoch. Larger
datasets (ImageNet's 1.28M training images are ~200 GB decoded) read from disk at each access,
spread over DataLoader workers (`runtime.num_workers`). Cached or not, every sample goes through
the same transform: the cache changes speed, never results.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF
from tqdm import tqdm  # not tqdm.auto: see pipeline.models.encode

from pipeline.images import ImageRef, load_rgb, pixel_count

# open_clip's PIL-to-tensor steps; with no Normalize after them the split is not possible.
_TO_TENSOR = (transforms.ToTensor,)
try:  # open_clip's variant that passes tensors through
    from open_clip.transform import MaybeConvertMode, MaybeToTensor

    _TO_TENSOR += (MaybeToTensor,)
    _CONVERT_MODE: tuple = (MaybeConvertMode,)
except ImportError:  # pragma: no cover - older open_clip
    _CONVERT_MODE = ()
# Steps known to draw nothing from torch's RNG (a RandomResizedCrop draws from NumPy here). Any
# other step may (flip, colour jitter, blur...), so it runs under the sample's seeded torch RNG.
_DETERMINISTIC = (transforms.Resize, transforms.CenterCrop, transforms.RandomResizedCrop, transforms.Normalize) + _TO_TENSOR + _CONVERT_MODE


class Normalise:
    """A batch of uint8 images (B, 3, H, W) as the model's float input; a float batch (from a
    transform that could not be split) passes through unchanged."""

    def __init__(self, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            return batch
        # ToTensor: .to(float32).div(255); Normalize: .sub_(mean).div_(std). Same ops, same bits.
        # Channels-last (NHWC) memory, the layout of conv towers' weights (`create_model`): the
        # values and their logical order are the same, a step 10% faster.
        x = batch.to(torch.float32, memory_format=torch.channels_last).div(255)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


class SampleTransform:
    """The per-sample part of an open_clip/torchvision transform: PIL image -> uint8 (3, H, W).

    `rng` (a NumPy Generator made from the sample's seed) drives a RandomResizedCrop; any step
    not known to be deterministic sets `needs_torch_rng`: the caller seeds torch's RNG around it.
    """

    def __init__(self, steps: list[Callable], to_uint8: bool):
        self.steps, self.to_uint8 = steps, to_uint8
        self.needs_torch_rng = not all(isinstance(s, _DETERMINISTIC) for s in steps)

    def __call__(self, image: Image.Image, rng: Optional[np.random.Generator] = None):
        for step in self.steps:
            if isinstance(step, transforms.RandomResizedCrop):
                if rng is None:
                    raise ValueError("a RandomResizedCrop needs the sample's generator")
                top, left, height, width = resized_crop_box(rng, image.height, image.width, step.scale, step.ratio)
                image = TF.resized_crop(image, top, left, height, width, step.size, step.interpolation, antialias=step.antialias)
            else:
                image = step(image)
        return TF.pil_to_tensor(image) if self.to_uint8 else image


def keeps_size(transform: SampleTransform, height: int, width: int) -> bool:
    """True when `transform` returns an image of (height, width) as uint8 pixels unchanged: a
    Resize and a CenterCrop to the size it already has (the evaluation preprocess of a model whose
    input size the images already have). Anything else may change pixels."""
    if not transform.to_uint8 or transform.needs_torch_rng:
        return False
    for step in transform.steps:
        if isinstance(step, transforms.Resize):
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            # One number resizes the shorter side to it; two are (height, width).
            if (size != [min(height, width)]) if len(size) == 1 else (size != [height, width]):
                return False
        elif isinstance(step, transforms.CenterCrop):
            if list(step.size) != [height, width]:
                return False
        else:
            return False
    return True


def split_transform(transform: Callable) -> tuple[SampleTransform, Normalise]:
    """(per-sample part, per-batch part) of `transform` such that stacking `transform(image)`
    equals `normalise(stack(sample(image)))` (for a random crop: with the crop drawn alike).

    Splits a Compose of PIL steps, then (Maybe)ToTensor, then Normalize. Anything else is kept
    whole per sample (float output) with a pass-through Normalise: correct, only slower.
    """
    steps = list(transform.transforms) if isinstance(transform, transforms.Compose) else [transform]
    # Nested Composes (an augmentation in front of the model's preprocess) are flattened.
    while any(isinstance(s, transforms.Compose) for s in steps):
        steps = [t for s in steps for t in (s.transforms if isinstance(s, transforms.Compose) else [s])]
    cut = next((i for i, s in enumerate(steps) if isinstance(s, _TO_TENSOR)), None)
    tail = steps[cut + 1 :] if cut is not None else None
    if cut is None or len(tail) != 1 or not isinstance(tail[0], transforms.Normalize):
        return SampleTransform(steps, to_uint8=False), Normalise(None, None)
    pil_steps = [s for s in steps[:cut] if not isinstance(s, _CONVERT_MODE)]  # load_rgb already gives RGB
    return SampleTransform(pil_steps, to_uint8=True), Normalise(tail[0].mean, tail[0].std)


def resized_crop_box(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: torchvision's RandomResizedCrop.get_params,
    drawn from a NumPy generator instead of torch's global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback to a central crop of the closest allowed aspect ratio, as torchvision does.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Decode(Dataset):
    def __init__(self, refs: Sequence[ImageRef]):
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Image.Image:
        return load_rgb(self.refs[index])


def _as_list(batch):
    return batch


class DecodedImages(Sequence):
    """Images by row, decoded once and kept when the whole set fits in `max_mb` (RGB, 3 bytes a
    pixel); otherwise each access decodes from disk. `cached` says which; `reason` says why not."""

    def __init__(self, refs: Sequence[ImageRef], max_mb: float, num_workers: int = 0, desc: str = "decode"):
        self.refs = list(refs)
        self.images: Optional[list[Image.Image]] = None
        self.reason = ""
        estimate = self.estimated_mb(self.refs)
        if estimate > max_mb:
            self.reason = f"{len(self.refs)} images need ~{estimate:,.0f} MB decoded, over runtime.image_cache_mb ({max_mb:g})"
            return
        loader = DataLoader(_Decode(self.refs), batch_size=64, num_workers=num_workers, collate_fn=_as_list)
        images, total = [], 0
        for batch in tqdm(loader, desc=desc, leave=False, disable=None):
            images.extend(batch)
            total += sum(3 * im.width * im.height for im in batch)
            if total > max_mb * 2**20:  # the estimate was low: stop holding them
                self.reason = f"decoded images passed runtime.image_cache_mb ({max_mb:g}) after {len(images)} of {len(self.refs)}"
                return
        self.images = images

    @staticmethod
    def estimated_mb(refs: Sequence[ImageRef], probe: int = 32) -> float:
        """Decoded size from the headers of up to `probe` evenly spaced images (nothing decoded)."""
        if not refs:
            return 0.0
        picks = np.unique(np.linspace(0, len(refs) - 1, min(probe, len(refs))).astype(int))
        pixels = []
        for i in picks:
            try:
                pixels.append(pixel_count(refs[i]))
            except Exception:  # a bad file fails with its name when it is read for real
                continue
        return 3 * float(np.mean(pixels or [0])) * len(refs) / 2**20

    @property
    def cached(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Image.Image:
        return self.images[index] if self.images is not None else load_rgb(self.refs[index])
