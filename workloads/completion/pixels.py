"""Images as pixel-token sequences, and the small classifier that judges completed images.

An image (H, W) uint8 is average-pooled by `downsample`, quantized to `levels` grey levels and read in
raster order: a sequence of (H / downsample) * (W / downsample) tokens in [0, levels)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn

from workloads.common.text import cache_root


def to_tokens(images: np.ndarray, downsample: int, levels: int) -> np.ndarray:
    """uint8 (N, H, W) -> int64 (N, H/d, W/d) grey-level tokens in [0, levels)."""
    pooled = reduce(images.astype(np.float32), "n (h d1) (w d2) -> n h w", "mean", d1=downsample, d2=downsample)
    return np.minimum(pooled * levels / 256.0, levels - 1).astype(np.int64)


def tokens_to_unit(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """Tokens -> intensities in [-1, 1] (each level's centre), the classifier's input."""
    return (tokens.float() + 0.5) * (2.0 / levels) - 1.0


class PixelClassifier(nn.Module):
    """A two-layer perceptron over token images (B, h, w) -> (B, classes) logits."""

    def __init__(self, pixels: int, classes: int, levels: int, hidden: int = 256):
        super().__init__()
        self.levels = levels
        self.net = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens_to_unit(tokens, self.levels).flatten(1))


def train_classifier(tokens: np.ndarray, labels: np.ndarray, classes: int, levels: int, steps: int,
                     device: torch.device, batch_size: int = 128, seed: int = 0) -> PixelClassifier:
    """Trained on the training images' tokens with a fixed seed of its own, so that every trial, whatever
    its seed or method, is judged by the same classifier."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # its own initialisation, the trial's RNG left untouched
        torch.manual_seed(seed)
        model = PixelClassifier(int(np.prod(tokens.shape[1:])), classes, levels).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # It may be trained lazily inside an evaluation: under no_grad, and under autocast, whose cache of
    # low-precision weight copies lives as long as the autocast region and would go stale after the
    # first optimizer step (the classifier then never learns).
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        _fit_classifier(model, optimizer, tokens, labels, steps, device, batch_size, generator)
    return model.eval()


def _fit_classifier(model, optimizer, tokens, labels, steps, device, batch_size, generator) -> None:
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=generator).numpy()
        x = torch.from_numpy(tokens[idx]).to(device)
        y = torch.from_numpy(labels[idx]).to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def cached_classifier(tokens: np.ndarray, labels: np.ndarray, classes: int, levels: int, steps: int,
                      device: torch.device, key_parts: dict) -> PixelClassifier:
    """train_classifier, cached under cache_root()/completion-classifier by everything it depends on."""
    spec = {**key_parts, "levels": levels, "steps": steps, "shape": list(tokens.shape[1:]),
            "device": device.type, "torch": torch.__version__}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_root() / "completion-classifier" / f"{key}.pt"
    model = PixelClassifier(int(np.prod(tokens.shape[1:])), classes, levels)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.to(device).eval()
    model = train_classifier(tokens, labels, classes, levels, steps, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    Path(tmp).replace(path)  # atomic: concurrent trials never read half a file
    return model


@torch.no_grad()
def classify(model: PixelClassifier, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens).argmax(-1)
