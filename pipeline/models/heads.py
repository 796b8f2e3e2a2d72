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


def tower_blocks(visual: nn.Module) -> list[nn.Module]:
    """The image tower's blocks, input to output, each ending with what maps to the embedding.

    ViT: transformer blocks, then the final norm + projection. ResNet: stages 1-4, then attention pool.
    """
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):
        blocks = list(visual.transformer.resblocks)
        blocks.append(_ParamsOf(visual, ["ln_post", "proj"]))
        return blocks
    if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4, visual.attnpool]
    raise ValueError(f"train.triplet.unfreeze_blocks: cannot find the blocks of a {type(visual).__name__} image tower")


class _ParamsOf(nn.Module):
    """Groups loose attributes of a module (ln_post, proj) so they unfreeze together."""

    def __init__(self, owner: nn.Module, names: list[str]):
        super().__init__()
        self._tensors = [getattr(owner, n) for n in names if getattr(owner, n, None) is not None]

    def parameters(self, recurse: bool = True):
        for item in self._tensors:
            if isinstance(item, nn.Module):
                yield from item.parameters(recurse)
            else:
                yield item


def unfreeze_last_blocks(visual: nn.Module, n: int) -> list[nn.Parameter]:
    """Freeze the whole tower, then make the last n blocks trainable; returns their parameters."""
    for param in visual.parameters():
        param.requires_grad_(False)
    params = []
    for block in tower_blocks(visual)[-n:] if n > 0 else []:
        for param in block.parameters():
            param.requires_grad_(True)
            params.append(param)
    return params
