"""Pieces metric learning adds to an open_clip image tower: a projection head, and the tower's
blocks in depth order so the last N can be unfrozen."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """A linear map from the tower's embedding to the metric space (normalised by the caller)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


def tower_blocks(visual: nn.Module) -> tuple[list[nn.Module], list[nn.Module | nn.Parameter]]:
    """The tower's blocks, input to output (ViT: transformer blocks; ResNet: the four stages), and
    what follows the last block on the way to the embedding (final norm + projection, or attention pool)."""
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        tail = [item for item in (getattr(visual, "ln_post", None), getattr(visual, "proj", None)) if item is not None]
        return list(visual.transformer.resblocks), tail
    if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4], [visual.attnpool]
    raise ValueError(f"cannot find the blocks of a {type(visual).__name__} image tower")


def _parameters(item: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    return list(item.parameters()) if isinstance(item, nn.Module) else [item]


def unfreeze_last_blocks(visual: nn.Module, n: int) -> tuple[list[nn.Parameter], list[nn.Module]]:
    """Freeze the tower, then make its last n blocks trainable, with what follows them.

    Returns the trainable parameters and the modules to put in train mode.
    """
    for param in visual.parameters():
        param.requires_grad_(False)
    if n <= 0:
        return [], []
    blocks, tail = tower_blocks(visual)
    if n > len(blocks):
        raise ValueError(f"train.triplet.unfreeze_blocks: {n} > the tower's {len(blocks)} blocks")
    modules = blocks[-n:] + [item for item in tail if isinstance(item, nn.Module)]
    params = [p for item in blocks[-n:] + tail for p in _parameters(item)]
    for param in params:
        param.requires_grad_(True)
    return params, modules
