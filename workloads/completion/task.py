"""Occluded image completion: an autoregressive pixel model completes digits whose lower half is hidden.

The model is a DecoderLM (any causal attention method) over pixel tokens (workloads.completion.pixels),
trained by next-pixel prediction on the training images. Evaluation: the teacher-forced loss on test
images (nats and bits per pixel), then, for `complete_examples` test images, the model samples the
hidden lower half given the upper half; a small classifier trained on the full training images reads
the completions. Reported: its accuracy on completions (`val/acc`), on the originals (`val/acc_clean`,
the ceiling) and on the occluded images, lower half black (`val/acc_occluded`, the floor), and the
completion time per image (`perf/completion_ms`), through recurrent decoding where the method has a
state (`gen/recurrent` = 1) and full forward passes otherwise."""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from attention import MethodConfig
from attention.models import DecoderLM
from workloads.common.config import require
from workloads.common.images import CLASSES, DATASETS, SHAPES, accuracy_margin, load_images, majority_accuracy
from workloads.common.train import pick_device
from workloads.completion.generate import complete, is_recurrent
from workloads.completion.pixels import cached_classifier, classify, to_tokens
from workloads.contract import Floor


@dataclasses.dataclass(frozen=True)
class CompletionData:
    """dataset: mnist, fashion_mnist or digits; downsample: average-pooling factor (must divide the image
    side); levels: grey levels per pixel (the vocabulary); eval_examples: test images for the
    teacher-forced loss; complete_examples: test images to complete; temperature: sampling temperature
    (0 = the most likely pixel); classifier_steps: training steps of the judging classifier."""

    dataset: str = "mnist"
    downsample: int = 2
    levels: int = 8
    eval_examples: int = 512
    complete_examples: int = 64
    temperature: float = 1.0
    classifier_steps: int = 1000

    def __post_init__(self):
        require(self.dataset in DATASETS, "data.dataset", self.dataset, ", ".join(DATASETS))
        for name in ("downsample", "eval_examples", "complete_examples", "classifier_steps"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"data.{name}", v,
                    "an integer >= 1")
        require(isinstance(self.levels, int) and 2 <= self.levels <= 256, "data.levels", self.levels,
                "an integer in [2, 256]")
        h, w = SHAPES[self.dataset]
        require(h % self.downsample == 0 and w % self.downsample == 0 and h // self.downsample >= 2,
                "data.downsample", self.downsample,
                f"a divisor of the {h}x{w} images of {self.dataset} leaving at least 2 rows")
        require(isinstance(self.temperature, (int, float)) and self.temperature >= 0, "data.temperature",
                self.temperature, "a number >= 0 (0 = the most likely pixel)")

    @property
    def grid(self) -> tuple[int, int]:
        h, w = SHAPES[self.dataset]
        return h // self.downsample, w // self.downsample


class CompletionTask:
    quality_metric = "val/acc"
    quality_mode = "max"

    def __init__(self, attn: MethodConfig, model_cfg, data: CompletionData, batch_size: int, seed: int):
        self.attn, self.model_cfg, self.data, self.batch_size, self.seed = attn, model_cfg, data, batch_size, seed
        h, w = data.grid
        self.seq_len = h * w
        self.prompt_len = (h // 2) * w  # the upper half: whole rows
        self.bos = data.levels  # the start token, after the grey levels
        self._classifiers: dict[torch.device, torch.nn.Module] = {}
        attn.check_seq_len(self.seq_len)

    @functools.cached_property
    def splits(self):
        # Loaded on first use, so validating a sweep's configs touches no data.
        images = load_images(self.data.dataset)
        tokens = {split: to_tokens(x, self.data.downsample, self.data.levels).reshape(len(x), -1)
                  for split, x in (("train", images.train_images), ("test", images.test_images))}
        return images, tokens

    def build_model(self) -> DecoderLM:
        m = self.model_cfg
        return DecoderLM(self.attn, self.data.levels + 1, m.dim, m.depth, self.seq_len, m.ff_mult, m.dropout)

    def _shifted(self, tokens: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.from_numpy(tokens).to(device)  # (B, T)
        x = torch.cat([torch.full_like(y[:, :1], self.bos), y[:, :-1]], dim=1)  # BOS, then y shifted right
        return x, y

    def batch(self, step: int, rank: int, device):
        # A pure function of (seed, step, rank): resuming at step s draws the same images.
        images, tokens = self.splits
        rng = np.random.default_rng([self.seed, step, rank])
        idx = np.sort(rng.integers(0, len(images.train_labels), size=self.batch_size))
        return self._shifted(tokens["train"][idx], device)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x).float()
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), y.numel()

    def classifier(self, device: torch.device):
        if device not in self._classifiers:
            self._classifiers[device] = self._train_classifier(device)
        return self._classifiers[device]

    def _train_classifier(self, device: torch.device):
        images, tokens = self.splits
        return cached_classifier(tokens["train"], images.train_labels, CLASSES, self.data.levels,
                                 self.data.classifier_steps, device,
                                 {"dataset": images.name, "sha256": images.sha256,
                                  "downsample": self.data.downsample})

    @torch.no_grad()
    def evaluate(self, model, device) -> dict[str, float]:
        images, tokens = self.splits
        test = tokens["test"]
        total, count = 0.0, 0
        for start in range(0, min(self.data.eval_examples, len(test)), self.batch_size):
            stop = min(start + self.batch_size, self.data.eval_examples)
            x, y = self._shifted(test[start:stop], device)
            total += F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        metrics = {"val/loss": total / count, "val/bpd": total / count / math.log(2)}
        return {**metrics, **self._completion_metrics(model, device)}

    def _completion_metrics(self, model, device) -> dict[str, float]:
        images, tokens = self.splits
        n = min(self.data.complete_examples, len(images.test_labels))
        truth = torch.from_numpy(tokens["test"][:n]).to(device)
        labels = torch.from_numpy(images.test_labels[:n]).to(device)
        generator = torch.Generator(device).manual_seed(self.seed)  # the same draws at every evaluation
        recurrent = is_recurrent(model)
        prompt = truth[:, :self.prompt_len]
        # In float32: recurrent states are kept in float32, and both paths are timed alike.
        with torch.autocast(device.type, enabled=False):
            # untimed warm-up on one image: first calls pay for kernel selection and allocation
            complete(model, prompt[:1], self.prompt_len + 2, self.bos, self.data.temperature,
                     torch.Generator(device).manual_seed(0), recurrent)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            done = complete(model, prompt, self.seq_len, self.bos, self.data.temperature, generator, recurrent)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
        occluded = truth.clone()
        occluded[:, self.prompt_len:] = 0  # the hidden half, black
        classifier = self.classifier(device)
        hidden = self.seq_len - self.prompt_len
        return {
            "val/acc": (classify(classifier, done) == labels).float().mean().item(),
            "val/acc_clean": (classify(classifier, truth) == labels).float().mean().item(),
            "val/acc_occluded": (classify(classifier, occluded) == labels).float().mean().item(),
            "val/pixel_match": (done[:, self.prompt_len:] == truth[:, self.prompt_len:]).float().mean().item(),
            "perf/completion_ms": 1000 * seconds / n,
            "perf/gen_tokens_per_s": n * hidden / seconds,
            "gen/recurrent": float(recurrent),
        }

    @torch.no_grad()
    def floors(self) -> list[Floor]:
        """What the judging classifier scores on trivial completions of the same `complete_examples` test
        images val/acc reads, strictest first: the hidden half filled with the training images' mean
        pixels (a model that ignores its prompt; the strictest at the default sizes, 0.48 against 0.42
        black on MNIST), left black (= val/acc_occluded), and majority-class accuracy on those images.
        Uses the same cached classifier as evaluate (trained once per machine and device: seconds on a GPU,
        ~20 s on two CPU cores at the default MNIST sizes, reused by every trial on that machine)."""
        images, tokens = self.splits
        n = min(self.data.complete_examples, len(images.test_labels))
        device = pick_device()
        truth = torch.from_numpy(tokens["test"][:n]).to(device)
        labels = torch.from_numpy(images.test_labels[:n]).to(device)
        classifier = self.classifier(device)
        mean = torch.from_numpy(np.rint(tokens["train"].mean(0)).astype(np.int64)).to(device)
        mean_fill, blank = truth.clone(), truth.clone()
        mean_fill[:, self.prompt_len:] = mean[self.prompt_len:]
        blank[:, self.prompt_len:] = 0

        def floor(name: str, acc: float, why: str) -> Floor:
            return Floor(name, acc, accuracy_margin(acc, n), "accuracy", why)

        with torch.autocast(device.type, enabled=False):
            accs = {x: (classify(classifier, filled) == labels).float().mean().item()
                    for x, filled in (("mean", mean_fill), ("blank", blank))}
        floors = [floor("mean_fill", accs["mean"], "the hidden half filled with the training images' mean"),
                  floor("blank_fill", accs["blank"], "the hidden half left black"),
                  floor("majority_class", majority_accuracy(images.test_labels[:n]),
                        "always predicting the most frequent class of the completed images")]
        return sorted(floors, key=lambda f: -(f.value + f.margin))  # stable: ties keep this order
