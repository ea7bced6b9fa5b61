"""A routed ViT: patches -> routed image attention + routed feed-forward blocks -> mean pool -> classes."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from attention.colt5.config import Colt5Config
from attention.colt5.feedforward import RoutedFeedForward
from attention.colt5.image import RoutedImageAttention


class RoutedViTBlock(nn.Module):
    def __init__(self, dim: int, cfg: Colt5Config, light_window: int, heavy_window: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = RoutedImageAttention(dim, cfg, light_window=light_window, heavy_window=heavy_window)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = RoutedFeedForward(cfg, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) channel last."""
        x = x + self.attn(self.attn_norm(x))
        tokens = rearrange(self.ff_norm(x), "b h w c -> b (h w) c")
        return x + rearrange(self.ff(tokens), "b (h w) c -> b h w c", h=x.shape[1])


class RoutedViT(nn.Module):
    """images (B, channels, H, W) -> logits (B, num_classes).

    cfg.num_routed_q / num_routed_kv count per heavy window (the whole patch grid when heavy_window is
    0), cfg.num_routed_ff per image; light_window / heavy_window are in patches."""

    def __init__(self, cfg: Colt5Config, *, image_size: int, patch_size: int, num_classes: int, dim: int,
                 depth: int, channels: int = 3, light_window: int = 4, heavy_window: int = 0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        grid = image_size // patch_size
        self.to_patches = nn.Conv2d(channels, dim, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(grid, grid, dim) * 0.02)
        self.blocks = nn.ModuleList(RoutedViTBlock(dim, cfg, light_window, heavy_window) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = rearrange(self.to_patches(images), "b c h w -> b h w c") + self.pos  # (B, grid, grid, dim)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x.mean(dim=(1, 2))))
