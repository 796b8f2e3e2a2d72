"""Training-time image transforms whose randomness is a function of (seed, epoch, sample).

torchvision's random transforms draw from torch's global generator, which each DataLoader worker
seeds on its own; the same run would then learn something else with another `runtime.num_workers`.
Drawing each sample's randomness from its own seed makes the workers a matter of speed only.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torchvision import transforms

from pipeline.distributed import World
from pipeline.images import ImageRef
from pipeline.params import RuntimeParams
from pipeline.pixels import DecodedImages, SampleTransform


def augmented(preprocess: Callable, augment: bool) -> Callable:
    """Horizontal flip and brightness/contrast jitter in front of the model's own preprocessing."""
    if not augment:
        return preprocess
    return transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ColorJitter(brightness=0.3, contrast=0.3), preprocess])


class PerSampleRandom:
    """Runs a function with torch's CPU generator seeded from (seed, epoch, index), then restores it.

    Set `epoch` before each epoch's DataLoader is made: workers get a copy of this object when they
    start, so persistent workers would keep the epoch they started with.
    """

    def __init__(self, seed: int):
        self.seed, self.epoch = seed, 0

    def __call__(self, index: int, function: Callable, *args):
        sample_seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, dtype=np.uint64)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return function(*args)

    def pixels(self, index: int, transform: SampleTransform, image, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        """`transform(image, rng)`, under this sample's seeded torch RNG only when a step needs it
        (forking torch's RNG state costs more than decoding a small PNG)."""
        if transform.needs_torch_rng:
            return self(index, transform, image, rng)
        return transform(image, rng)


def decode_once(refs: Sequence[ImageRef], runtime: RuntimeParams, world: World, split: str) -> DecodedImages:
    """A training split's images, decoded once for the whole run when they fit in
    `runtime.image_cache_mb` (each process holds its own copy); otherwise read at every access,
    and rank 0 says why."""
    decoded = DecodedImages(refs, runtime.image_cache_mb, runtime.num_workers, desc=f"decode {split}")
    if not decoded.cached and world.is_main:
        print(f"{split} images are decoded at every epoch: {decoded.reason}; runtime.num_workers spreads the decoding over processes")
    return decoded
