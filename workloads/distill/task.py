"""Distillation of a softmax teacher into a student with another attention (SEA by default), on the
character LM: the student starts from the teacher's weights (every tensor whose shape matches: embeddings,
q/k/v/out projections, feed-forwards, norms) and trains with
    task cross-entropy + out_weight * mean over layers MSE(student mixer output, teacher mixer output)
plus, inside each SEA mixer, the estimation losses against the teacher's attention of that layer
(0.1 KL + MSE in the compressed width, injected by the mixer). Reported: the student's val/bpc and the
teacher's val/teacher_bpc on the same windows.

Modes: 'distill' (the above), 'finetune' (teacher init, task loss only), 'scratch' (no teacher: the
non-distilled baseline). Without a checkpoint the teacher is trained first, inside the trial."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from attention import make_config
from attention.config import ConfigError
from workloads.common import checkpoint
from workloads.common.config import require
from workloads.common.report import ForwardingReporter, Reporter
from workloads.common.text import VOCAB
from workloads.common.train import TrainConfig, fit
from workloads.contract import Floor
from workloads.lm.task import LMData, LMModel, LMTask

MODES = ("distill", "finetune", "scratch")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """mode: 'distill', 'finetune' or 'scratch' (see the module doc). teacher_checkpoint: a `state.pt`
    written by the training loop (or its directory), e.g. orchestrator.teacher.find_best_teacher's;
    empty = train a softmax teacher first for teacher_steps at teacher_lr. teacher_heads: the teacher's
    attention heads (0 = the student's attn.heads). out_weight: weight of the mixer-output MSE.
    images: save the estimated mask and sparse attention map of one sample with each checkpoint."""

    mode: str = "distill"
    teacher_checkpoint: str = ""
    teacher_heads: int = 0
    teacher_steps: int = 400
    teacher_lr: float = 2e-3
    out_weight: float = 1.0
    images: bool = True

    def __post_init__(self):
        require(self.mode in MODES, "distill.mode", self.mode, ", ".join(MODES))
        require(isinstance(self.teacher_checkpoint, str), "distill.teacher_checkpoint", self.teacher_checkpoint,
                "a path (string)")
        for name, low in (("teacher_heads", 0), ("teacher_steps", 1)):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"distill.{name}", v,
                    f"an integer >= {low}")
        require(isinstance(self.teacher_lr, (int, float)) and 0 < self.teacher_lr < 1, "distill.teacher_lr",
                self.teacher_lr, "a number in (0, 1)")
        require(isinstance(self.out_weight, (int, float)) and self.out_weight >= 0, "distill.out_weight",
                self.out_weight, "a number >= 0")
        require(isinstance(self.images, bool), "distill.images", self.images, "true or false")


def checkpoint_file(path: str) -> Path:
    file = Path(path)
    file = file / "state.pt" if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"distill.teacher_checkpoint: {path!r} is not a state.pt file or a directory holding one")
    return file


def load_state(path: str) -> dict[str, torch.Tensor]:
    state = checkpoint.load(checkpoint_file(path), "distill.teacher_checkpoint")
    return state["model"] if "model" in state else state


def teacher_shapes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Model sizes of a DecoderLM state dict: dim, depth, ff_mult, max_len, inner (heads x dim_head)."""
    try:
        vocab, dim = state["tok.weight"].shape
        depth = 1 + max(int(m.group(1)) for m in map(re.compile(r"body\.blocks\.(\d+)\.").match, state) if m)
        return {"vocab": vocab, "dim": dim, "depth": depth, "max_len": state["pos.weight"].shape[0],
                "ff_mult": state["body.blocks.0.ff.net.0.weight"].shape[0] // dim,
                "inner": state["body.blocks.0.mixer.qkv.to_q.weight"].shape[0]}
    except (KeyError, ValueError) as e:
        raise ConfigError(f"distill.teacher_checkpoint: not a softmax DecoderLM checkpoint ({e})") from e


def copy_matching(student: nn.Module, teacher_state: dict[str, torch.Tensor]) -> list[str]:
    """Copy every teacher tensor whose name and shape match (positions: the rows both have)."""
    own = student.state_dict()
    copied = []
    for name, value in teacher_state.items():
        if name not in own:
            continue
        if own[name].shape == value.shape:
            own[name].copy_(value)
        elif name == "pos.weight" and own[name].shape[1:] == value.shape[1:]:
            rows = min(len(value), len(own[name]))
            own[name][:rows].copy_(value[:rows])
        else:
            continue
        copied.append(name)
    return copied


class _KeepLastCheckpoint(Reporter):
    """Receives the teacher's training reports and keeps its last checkpoint."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="attnlab-teacher-")
        self.metrics: dict[str, float] = {}

    def report(self, metrics, step, checkpoint_dir=None, evaluation=False):
        self.metrics = metrics
        if checkpoint_dir:
            shutil.copy(Path(checkpoint_dir) / "state.pt", Path(self.dir) / "state.pt")


class _Capture:
    """Forward hooks on every block's mixer: its output, and for softmax mixers the q, k of its qkv."""

    def __init__(self, model: nn.Module):
        self.outputs: list[torch.Tensor] = []
        self.qk: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.model = model

    @contextlib.contextmanager
    def __call__(self):
        handles = []
        for block in self.model.body.blocks:
            handles.append(block.mixer.register_forward_hook(lambda m, a, out: self.outputs.append(out)))
            if hasattr(block.mixer, "qkv"):
                handles.append(block.mixer.qkv.register_forward_hook(lambda m, a, out: self.qk.append(out[:2])))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class DistillTask:
    quality_metric = "val/bpc"
    quality_mode = "min"

    def __init__(self, student: LMTask, distill: DistillConfig, train: TrainConfig, seed: int,
                 teacher_state: dict[str, torch.Tensor] | None = None):
        self.student, self.cfg, self.train, self.seed = student, distill, train, seed
        self._teacher_state = teacher_state
        self._teacher: nn.Module | None = None
        self._teacher_metrics: dict[str, float] | None = None
        self.maps: dict[str, Any] | None = None  # the last evaluation's sample maps (numpy)

    @property
    def corpus(self):
        return self.student.corpus

    @property
    def resolved_sections(self) -> dict[str, dict]:
        """The student's attn and model sections as it really runs (a teacher's sizes replace the given)."""
        return {"attn": self.student.attn.to_dict(), "model": dataclasses.asdict(self.student.model_cfg)}

    def floors(self) -> list[Floor]:
        """The student's: the character LM's bigram and unigram entropy of the validation text (bpc)."""
        return self.student.floors()

    def teacher_task(self) -> LMTask:
        heads = self.cfg.teacher_heads or self.student.attn.heads
        attn = make_config("softmax", heads=heads, dim_head=self.student.attn.dim_head)
        return LMTask(attn, self.student.model_cfg, self.student.data, self.train.batch_size, self.seed,
                      corpus=self.student.corpus)

    def _train_teacher(self) -> dict[str, torch.Tensor]:
        keeper = _KeepLastCheckpoint()
        steps = self.cfg.teacher_steps
        cfg = dataclasses.replace(self.train, steps=steps, lr=self.cfg.teacher_lr, warmup=min(self.train.warmup, steps),
                                  eval_every=steps, log_every=steps)
        fit(self.teacher_task(), cfg, keeper, seed=self.seed, progress=False)
        state = load_state(keeper.dir)
        shutil.rmtree(keeper.dir, ignore_errors=True)
        return state

    def teacher(self, device: torch.device) -> nn.Module:
        if self._teacher is None:
            state = self._teacher_state if self._teacher_state is not None else self._train_teacher()
            model = self.teacher_task().build_model()
            with torch.no_grad():
                missing = sorted(set(model.state_dict()) - set(copy_matching(model, state)))
            if missing:
                raise ConfigError(f"distill.teacher_checkpoint: the teacher's {', '.join(missing[:4])} do not match "
                                  "a softmax DecoderLM of its sizes (set distill.teacher_heads?)")
            self._teacher = model.eval().requires_grad_(False)
        return self._teacher.to(device)

    def build_model(self) -> nn.Module:
        student = self.student.build_model()
        if self.cfg.mode != "scratch" and student.tok.weight.device.type != "meta":
            teacher = self.teacher(torch.device("cpu"))
            with torch.no_grad():
                copy_matching(student, teacher.state_dict())
        return student

    def batch(self, step: int, rank: int, device):
        return self.student.batch(step, rank, device)

    def loss(self, model, batch):
        if self.cfg.mode != "distill":
            return self.student.loss(model, batch)
        x, y = batch
        teacher = self.teacher(x.device)
        with torch.no_grad(), _Capture(teacher)() as taught:
            teacher(x)
        student = _unwrap(model)
        for block, (q, k) in zip(student.body.blocks, taught.qk):
            if hasattr(block.mixer, "distill_target") and q.shape[2] == getattr(block.mixer, "heads", -1):
                block.mixer.distill_target = (q, k)
        with _Capture(student)() as learnt:
            logits = model(x)
        task = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1))
        out_mse = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(learnt.outputs, taught.outputs)])
        return task + self.cfg.out_weight * out_mse.mean(), y.numel()

    def evaluate(self, model, device) -> dict[str, float]:
        metrics = self.student.evaluate(model, device)
        if self.cfg.mode != "scratch":
            if self._teacher_metrics is None:
                self._teacher_metrics = self.student.evaluate(self.teacher(device), device)
            metrics["val/teacher_bpc"] = self._teacher_metrics["val/bpc"]
            metrics["val/teacher_loss"] = self._teacher_metrics["val/loss"]
        if self.cfg.images:
            self.maps = self._sample_maps(model, device)
        return metrics

    @torch.no_grad()
    def _sample_maps(self, model, device) -> dict[str, Any] | None:
        """Layer 0, head 0, the first validation window: estimate, mask and attention maps."""
        mixer = model.body.blocks[0].mixer
        if not hasattr(mixer, "capture"):
            return None
        from attention.sea.mask import mask_to_dense

        t = self.student.data.seq_len
        x = torch.from_numpy(self.corpus.val[:t].astype("int64"))[None].to(device)
        mixer.capture = True
        try:
            model(x)
        finally:
            mixer.capture = False
        got, mixer.captured = mixer.captured, None
        q, k = got["q"][0, :, 0].float(), got["k"][0, :, 0].float()  # (T, D)
        allowed = mask_to_dense(got["mask"], got["geometry"], mixer.heads)[0, 0]  # (T, S)
        scores = (q @ k.T) / q.shape[-1] ** 0.5
        maps = {"estimate": got["est"][0, :, 0].float().cpu().numpy(), "mask": allowed.cpu().numpy(),
                "sparse": torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), -1).nan_to_num(0)
                .cpu().numpy()}  # float32: numpy has no bf16
        if self.cfg.mode != "scratch":
            teacher = self.teacher(device)
            with _Capture(teacher)() as taught:
                teacher(x)
            tq, tk = taught.qk[0][0][0, :, 0].float(), taught.qk[0][1][0, :, 0].float()
            causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            dense = (tq @ tk.T / tq.shape[-1] ** 0.5).masked_fill(~causal, float("-inf"))
            maps["teacher"] = torch.softmax(dense.float(), -1).cpu().numpy()
        return maps


def build_student_task(attn, model: LMModel, data: LMData, batch_size: int, seed: int,
                       teacher_state: dict[str, torch.Tensor] | None, distill: DistillConfig) -> LMTask:
    """The student's LMTask; with a teacher checkpoint its sizes are the teacher's (so weights copy)."""
    if teacher_state is not None:
        shapes = teacher_shapes(teacher_state)
        heads = distill.teacher_heads or attn.heads
        if shapes["inner"] % heads:
            raise ConfigError(f"distill.teacher_heads: {heads} heads do not divide the teacher's width "
                              f"{shapes['inner']}; set distill.teacher_heads")
        if data.seq_len > shapes["max_len"]:
            raise ConfigError(f"data.seq_len: got {data.seq_len}, the teacher was built for at most "
                              f"{shapes['max_len']} tokens")
        model = dataclasses.replace(model, dim=shapes["dim"], depth=shapes["depth"], ff_mult=shapes["ff_mult"])
        if attn.heads != heads or (attn.dim_head or shapes["dim"] // heads) != shapes["inner"] // heads:
            attn = dataclasses.replace(attn, heads=heads, dim_head=shapes["inner"] // heads)
    return LMTask(attn, model, data, batch_size, seed)


@functools.cache
def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_maps(maps: dict[str, Any], directory: str | Path) -> list[Path]:
    """PNG images of the sample maps: sea_estimated_mask.png (compressed estimate, expanded mask) and
    sea_sparse_attention.png (the student's sparse attention, the teacher's dense attention)."""
    plt = _matplotlib()
    directory = Path(directory)
    written = []
    panels = {"sea_estimated_mask.png": [("estimated attention, compressed", "cell", maps["estimate"]),
                                         ("selected keys", "key", maps["mask"])],
              "sea_sparse_attention.png": [("student: sparse attention", "key", maps["sparse"])]
              + ([("teacher: dense softmax attention", "key", maps["teacher"])] if "teacher" in maps else [])}
    for name, images in panels.items():
        fig, axes = plt.subplots(1, len(images), figsize=(4.5 * len(images), 4), squeeze=False)
        for ax, (title, xlabel, image) in zip(axes[0], images):
            shown = ax.imshow(image, aspect="auto", interpolation="nearest", cmap="viridis")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("query")
            fig.colorbar(shown, ax=ax)
        fig.suptitle("layer 0, head 0, first validation window", fontsize=9)
        fig.tight_layout()
        fig.savefig(directory / name, dpi=100)
        plt.close(fig)
        written.append(directory / name)
    return written


class ImageReporter(ForwardingReporter):
    """Before a checkpoint is handed on, the task's last sample maps are saved into it as PNG images, so
    they travel with the checkpoint (MLflow: best_checkpoint/*.png)."""

    def __init__(self, inner: Reporter, task: DistillTask):
        super().__init__(inner)
        self.task = task

    def report(self, metrics, step, checkpoint_dir=None, evaluation=False):
        if checkpoint_dir and self.task.maps is not None and self.rank == 0:
            save_maps(self.task.maps, checkpoint_dir)
        self.inner.report(metrics, step, checkpoint_dir, evaluation)
