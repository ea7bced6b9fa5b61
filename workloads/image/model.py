"""A Vision Transformer (Dosovitskiy et al. 2021) whose token mixer is any registered attention method.

Images (B, H, W) in [-1, 1] are cut into p x p patches, each linearly embedded into a token; a
bidirectional attention.models.Encoder mixes the tokens; a linear head classifies the [CLS] token (or
the mean of the tokens). With attn.method="colt5" the blocks are CoLT5's conditionally routed ones
(routed attention and routed feed-forward), i.e. CoLT5's routed ViT."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from einops import rearrange
from torch import nn

from attention import MethodConfig
from attention.models import Encoder
from workloads.common.config import require

POOLS = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The `model` section: width, blocks, patch side (must divide the image side), pooling."""

    dim: int = 64
    depth: int = 2
    patch_size: int = 4
    pool: str = "cls"
    ff_mult: int = 4
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("dim", "depth", "patch_size", "ff_mult"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"model.{name}", v,
                    "an integer >= 1")
        require(self.pool in POOLS, "model.pool", self.pool, ", ".join(POOLS))
        require(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "model.dropout",
                self.dropout, "a number in [0, 1)")

    def check_image(self, shape: tuple[int, int], dataset: str) -> None:
        h, w = shape
        require(h % self.patch_size == 0 and w % self.patch_size == 0, "model.patch_size", self.patch_size,
                f"a divisor of both sides of the {h}x{w} images of {dataset}")

    def tokens(self, shape: tuple[int, int]) -> int:
        return (shape[0] // self.patch_size) * (shape[1] // self.patch_size) + (self.pool == "cls")


def to_pixels(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W) in [0, 255] -> float (B, H, W) in [-1, 1] on `device`."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).float() / 127.5 - 1.0


class ViT(nn.Module):
    """(B, H, W) float images -> (B, classes) logits."""

    def __init__(self, attn: MethodConfig, cfg: ViTConfig, image_shape: tuple[int, int], classes: int):
        super().__init__()
        self.patch = cfg.patch_size
        self.pool = cfg.pool
        self.embed = nn.Linear(cfg.patch_size ** 2, cfg.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        self.encoder = Encoder(attn, cfg.dim, cfg.depth, cfg.tokens(image_shape), cfg.ff_mult, cfg.dropout)
        self.head = nn.Linear(cfg.dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = rearrange(images, "b (h p1) (w p2) -> b (h w) (p1 p2)", p1=self.patch, p2=self.patch)
        x = self.embed(patches)  # (B, N, dim)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, dim)
        x = self.encoder(x)
        return self.head(x[:, 0] if self.cls is not None else x.mean(dim=1))
