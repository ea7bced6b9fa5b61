"""Image classification: accuracy of a ViT with any attention method on MNIST, Fashion-MNIST or digits."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attention import MethodConfig
from workloads.common.config import require
from workloads.common.images import (
    CLASSES,
    DATASETS,
    SHAPES,
    VARIANTS,
    ImageSplits,
    accuracy_margin,
    load_images,
    majority_accuracy,
)
from workloads.contract import Floor
from workloads.image.model import ViT, ViTConfig, to_pixels

EVAL_CHUNK = 500  # test images per forward pass during evaluation


@dataclasses.dataclass(frozen=True)
class ImageData:
    """dataset: mnist, fashion_mnist or digits; variant: plain, quantized, rotated, inverted;
    eval_examples: the first N test images form the validation set (0 = the whole test split)."""

    dataset: str = "mnist"
    variant: str = "plain"
    eval_examples: int = 2000

    def __post_init__(self):
        require(self.dataset in DATASETS, "data.dataset", self.dataset, ", ".join(DATASETS))
        require(self.variant in VARIANTS, "data.variant", self.variant, ", ".join(VARIANTS))
        require(isinstance(self.eval_examples, int) and not isinstance(self.eval_examples, bool)
                and self.eval_examples >= 0, "data.eval_examples", self.eval_examples,
                "an integer >= 0 (0 = the whole test split)")


def check_bidirectional(attn: MethodConfig) -> None:
    require(not attn.causal, "attn.causal", attn.causal,
            "false (images are classified by a bidirectional encoder)")


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on uint8 images, in chunks."""
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), EVAL_CHUNK):
        x = to_pixels(images[start:start + EVAL_CHUNK], device)
        y = torch.from_numpy(labels[start:start + EVAL_CHUNK]).to(device)
        logits = model(x).float()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    return total_loss / len(labels), correct / len(labels)


class ImageTask:
    quality_metric = "val/acc"
    quality_mode = "max"

    def __init__(self, attn: MethodConfig, model: ViTConfig, data: ImageData, batch_size: int, seed: int):
        self.attn, self.model_cfg, self.data, self.batch_size, self.seed = attn, model, data, batch_size, seed
        model.check_image(SHAPES[data.dataset], data.dataset)
        attn.check_seq_len(model.tokens(SHAPES[data.dataset]))

    @functools.cached_property
    def images(self) -> ImageSplits:
        # Loaded on first use, so validating a sweep's configs touches no data.
        return load_images(self.data.dataset, self.data.variant)

    def build_model(self) -> nn.Module:
        return ViT(self.attn, self.model_cfg, SHAPES[self.data.dataset], CLASSES)

    def batch(self, step: int, rank: int, device):
        # A pure function of (seed, step, rank): resuming at step s draws the same images.
        rng = np.random.default_rng([self.seed, step, rank])
        idx = np.sort(rng.integers(0, len(self.images.train_labels), size=self.batch_size))
        return (to_pixels(self.images.train_images[idx], device),
                torch.from_numpy(self.images.train_labels[idx]).to(device))

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x).float(), y), len(y)

    def eval_split(self, splits: ImageSplits | None = None) -> tuple[np.ndarray, np.ndarray]:
        splits = splits or self.images
        n = self.data.eval_examples or len(splits.test_labels)
        return splits.test_images[:n], splits.test_labels[:n]

    def evaluate(self, model, device) -> dict[str, float]:
        loss, acc = accuracy(model, *self.eval_split(), device)
        return {"val/loss": loss, "val/acc": acc}

    def floors(self) -> list[Floor]:
        """Majority-class accuracy on the evaluation images (eval_split: the variant's, for lora; the
        labels are the same whatever the variant)."""
        _, labels = self.eval_split()
        acc = majority_accuracy(labels)
        return [Floor("majority_class", acc, accuracy_margin(acc, len(labels)), "accuracy",
                      "always predicting the most frequent class of the evaluation images")]
