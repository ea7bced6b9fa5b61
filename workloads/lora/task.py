"""The EfficientAttention LoRA experiment on MNIST variants, with a ViT whose mixer is any method.

A base ViT is trained on plain images; it is then fine-tuned on a variant (quantized, rotated or
inverted images, workloads.common.images) in one of three modes:
- `full`: every parameter of the base trains;
- `lora`: the base is frozen, LoRA adapters of rank `lora.rank` on the Linear layers matching
  `lora.targets` train, with the modules in `lora.train_also` (the classifier head by default);
- `lora_scratch`: as `lora`, but from a randomly initialised, frozen base (no pre-training): how far
  adapters alone get. The variant is the training data here too (the peer trained these runs on plain
  MNIST whatever the variant).

The base: `model.base_checkpoint` (a state dict, or a training checkpoint such as the `image`
workload's run_dir/checkpoint/state.pt, of the same ViT), or else trained within the trial first for
`model.base_steps` steps on the plain images through the common loop, and cached under
cache_root()/lora-base keyed by everything that determines it (so a sweep over ranks, modes and
variants trains each base once per machine, and a resumed trial gets the same base back)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attention.lora import LoRAConfig, freeze_base, inject_lora
from workloads.common import checkpoint
from workloads.common.config import require
from workloads.common.images import CLASSES, SHAPES, ImageSplits, load_images
from workloads.common.report import Reporter
from workloads.common.text import cache_root
from workloads.common.train import TrainConfig, fit, pick_device, seed_everything
from workloads.image.model import ViT, ViTConfig
from workloads.image.task import ImageData, ImageTask, accuracy

MODES = ("full", "lora", "lora_scratch")


@dataclasses.dataclass(frozen=True)
class LoRAModel(ViTConfig):
    """The ViT's fields, and how the base is made: base_steps and base_lr of the pre-training phase on
    plain images, or base_checkpoint, a path to load it from instead ("" = pre-train in the trial)."""

    base_steps: int = 500
    base_lr: float = 2e-3
    base_checkpoint: str = ""

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.base_steps, int) and not isinstance(self.base_steps, bool)
                and self.base_steps >= 1, "model.base_steps", self.base_steps, "an integer >= 1")
        require(isinstance(self.base_lr, (int, float)) and 0 < self.base_lr < 1, "model.base_lr",
                self.base_lr, "a number in (0, 1)")
        require(isinstance(self.base_checkpoint, str), "model.base_checkpoint", self.base_checkpoint,
                "a path to a saved state dict, or '' to pre-train within the trial")

    def vit(self) -> ViTConfig:
        return ViTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ViTConfig)})


@dataclasses.dataclass(frozen=True)
class LoRASection:
    """The `lora` section: mode (full, lora, lora_scratch) and attention.lora.LoRAConfig's fields."""

    mode: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("*.mixer.*", "*.ff.*")  # every Linear of the attention and MLP blocks
    train_also: tuple[str, ...] = ("head",)

    def __post_init__(self):
        require(self.mode in MODES, "lora.mode", self.mode, ", ".join(MODES))
        adapter = self.adapter()  # validates rank, alpha, ... with lora.<field> in the message
        object.__setattr__(self, "targets", adapter.targets)
        object.__setattr__(self, "train_also", adapter.train_also)

    def adapter(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                          train_also=self.train_also)


class _KeepLastModel(Reporter):
    """Catches the model state of the last checkpoint the loop reports (the end of pre-training)."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] | None = None
        self.metrics: dict[str, float] = {}

    def report(self, metrics, step, checkpoint_dir=None, evaluation=False):
        self.metrics = metrics
        if checkpoint_dir:  # read now: the loop deletes the directory when report returns
            self.state = checkpoint.load(Path(checkpoint_dir) / "state.pt")["model"]


class LoRATask(ImageTask):
    def __init__(self, attn, model: LoRAModel, data: ImageData, lora: LoRASection, train: TrainConfig,
                 seed: int, validate_only: bool = False):
        super().__init__(attn, model, data, train.batch_size, seed)
        self.lora, self.train_cfg, self.validate_only = lora, train, validate_only
        self.start_metrics: dict[str, float] = {}
        self.adapted: list[str] = []

    @functools.cached_property
    def plain(self) -> ImageSplits:
        return load_images(self.data.dataset, "plain")

    def build_model(self) -> nn.Module:
        model = ViT(self.attn, self.model_cfg.vit(), SHAPES[self.data.dataset], CLASSES)
        if self.lora.mode != "lora_scratch" and not self.validate_only:
            model.load_state_dict(self.base_state())
            # Pre-training draws random numbers, a cached base none: reseed so that the adapters start
            # the same either way.
            seed_everything(self.seed)
        if self.lora.mode in ("lora", "lora_scratch"):
            self.adapted = inject_lora(model, self.lora.adapter())
            freeze_base(model, self.lora.train_also)
        if not self.validate_only:
            # Where fine-tuning starts (the adapters are zero, so the base's own accuracy): on the plain
            # images and on the variant. The gap shows the variant is applied and what there is to learn.
            device = pick_device()
            model.to(device).eval()
            _, acc_plain = accuracy(model, *self.eval_split(self.plain), device)
            loss_variant, acc_variant = accuracy(model, *self.eval_split(), device)
            self.start_metrics = {"start/acc_plain": acc_plain, "start/acc_variant": acc_variant,
                                  "start/loss_variant": loss_variant}
        return model

    def evaluate(self, model, device) -> dict[str, float]:
        return {**super().evaluate(model, device), **self.start_metrics,
                "lora/adapted_layers": float(len(self.adapted))}

    # --- the base model -------------------------------------------------------------------------------

    def base_state(self) -> dict[str, torch.Tensor]:
        if self.model_cfg.base_checkpoint:
            return self._load_checkpoint(Path(self.model_cfg.base_checkpoint))
        path = cache_root() / "lora-base" / f"{self.base_key()}.pt"
        if path.exists():
            return torch.load(path, map_location="cpu", weights_only=True)
        state = self.pretrain()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        torch.save(state, tmp)
        tmp.replace(path)  # atomic: trials pre-training the same base at once never read half a file
        return state

    def base_key(self) -> str:
        """Everything the pre-trained base depends on, hashed."""
        spec: dict[str, Any] = {
            "attn": self.attn.to_dict(), "model": dataclasses.asdict(self.model_cfg.vit()),
            "steps": self.model_cfg.base_steps, "lr": self.model_cfg.base_lr,
            "batch_size": self.batch_size, "precision": self.train_cfg.precision,
            "dataset": self.data.dataset, "sha256": self.plain.sha256, "seed": self.seed,
            "device": pick_device().type, "torch": torch.__version__}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def pretrain(self) -> dict[str, torch.Tensor]:
        """The base: the ViT trained on the plain images through the common loop."""
        m = self.model_cfg
        base_task = ImageTask(self.attn, m.vit(), dataclasses.replace(self.data, variant="plain"),
                              self.batch_size, self.seed)
        base_task.__dict__["images"] = self.plain  # the plain images, loaded once
        cfg = TrainConfig(steps=m.base_steps, batch_size=self.batch_size, lr=m.base_lr,
                          warmup=min(30, m.base_steps // 10), eval_every=m.base_steps, log_every=m.base_steps,
                          precision=self.train_cfg.precision)
        keep = _KeepLastModel()
        fit(base_task, cfg, keep, seed=self.seed, progress=False)
        return keep.state

    def _load_checkpoint(self, path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise FileNotFoundError(f"model.base_checkpoint: {str(path)!r} is not a file")
        state = checkpoint.load(path, "model.base_checkpoint")
        state = state.get("model", state)  # a training checkpoint (state.pt) or a bare state dict
        expected = ViT(self.attn, self.model_cfg.vit(), SHAPES[self.data.dataset], CLASSES).state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"model.base_checkpoint: {str(path)!r} does not fit this ViT: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}, other shapes {wrong[:5]}")
        return state
