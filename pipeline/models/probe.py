"""Image towers cut at a given depth: the encoder really stops there.

A probe point is `pixels` (the flattened image, no model), a block depth k (after transformer
block k of a ViT, or after stage k of a ResNet), or `final` (the model's embedding). The tower's
own blocks are run up to k and no further. (open_clip's `forward_intermediates(stop_early=True)`
is not used: in open_clip 3.3 it still runs every block.)
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models import LoadedModel
from pipeline.models.encode import image_features
from pipeline.models.heads import tower_blocks


def _is_vit(visual: nn.Module) -> bool:
    return hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks")


def tower_depth(visual: nn.Module) -> int:
    """Number of probe-able blocks: transformer blocks (ViT) or residual stages (ResNet)."""
    try:
        return len(tower_blocks(visual)[0])
    except ValueError as err:
        raise ValueError(f"probe: {err}") from None


def resolve_points(points: list, depth: int) -> list:
    """Turn `half` / `penultimate` into block numbers and check every depth is 1..depth-1."""
    named = {"half": max(1, depth // 2), "penultimate": depth - 1}
    resolved = []
    for point in points:
        point = named.get(point, point)
        if point in ("pixels", "final"):
            resolved.append(point)
        elif isinstance(point, int) and 1 <= point <= depth:
            resolved.append(point)
        else:
            raise ValueError(f"probe.points: {point!r} is not pixels, final, half, penultimate or a block 1..{depth}")
    return list(dict.fromkeys(resolved))  # in order, once each


def point_name(point) -> str:
    return point if isinstance(point, str) else f"block{point}"


class TruncatedTower(nn.Module):
    """Runs the image tower's stem and its first `depth` blocks, then pools to one vector per image."""

    def __init__(self, visual: nn.Module, depth: int, pooling: str = "cls"):
        super().__init__()
        self.visual, self.depth, self.pooling = visual, depth, pooling

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        if _is_vit(visual):
            x = visual._embeds(images)
            batch_first = getattr(visual.transformer, "batch_first", True)
            if not batch_first:
                x = x.transpose(0, 1)
            for block in visual.transformer.resblocks[: self.depth]:
                x = block(x)
            if not batch_first:
                x = x.transpose(0, 1)
            return x[:, 0] if self.pooling == "cls" else x[:, 1:].mean(dim=1)
        x = visual.stem(images)
        for stage in [visual.layer1, visual.layer2, visual.layer3, visual.layer4][: self.depth]:
            x = stage(x)
        return x.mean(dim=(2, 3))  # global average pool


def probe_encoder(loaded: LoadedModel, point, pooling: str = "cls"):
    """A function images -> features for one probe point (no normalisation)."""
    if point == "pixels":
        return lambda images: images.flatten(start_dim=1)
    if point == "final":
        return lambda images: image_features(loaded, images)
    tower = TruncatedTower(loaded.model.visual, point, pooling)
    return tower
