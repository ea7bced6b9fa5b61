"""Generate text from a trained character LM.

    python -m workloads.lm.sample --run-dir runs/lm-linear --prompt "The market " --tokens 200

A run dir is what `python -m workloads.lm --run-dir D` writes (config.json + checkpoint/state.pt); a
sweep trial's MLflow artifacts (config.json + best_checkpoint/state.pt) work the same with
--config and --checkpoint. Recurrent methods (linear, homm) decode from their state, O(1) a token."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workloads.common.checkpoint import UnsafeCheckpoint, load
from workloads.lm import build_task


def load_model(config: dict, checkpoint: Path):
    task, _ = build_task(config, validate_only=True)
    model = task.build_model()
    state = load(checkpoint, "--checkpoint")
    model.load_state_dict(state["model"])
    return model.eval()


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m workloads.lm.sample")
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--config", type=Path)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config_path = args.config or (args.run_dir / "config.json" if args.run_dir else None)
    ckpt = args.checkpoint or (args.run_dir / "checkpoint" / "state.pt" if args.run_dir else None)
    if config_path is None or ckpt is None:
        p.error("give --run-dir, or --config and --checkpoint")
    try:
        model = load_model(json.loads(config_path.read_text()), ckpt)
    except UnsafeCheckpoint as e:
        raise SystemExit(f"error: {e}") from None
    prompt = torch.tensor([list(args.prompt.encode("utf-8"))], dtype=torch.long)
    budget = model.max_len - prompt.shape[1] if model.recurrent else args.tokens
    t0 = time.perf_counter()
    out = model.generate(prompt, min(args.tokens, budget), temperature=args.temperature,
                         generator=torch.Generator().manual_seed(args.seed))
    seconds = time.perf_counter() - t0
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    print(text)
    mode = "recurrent state" if model.recurrent else "full forward per token"
    print(f"\n[{out.shape[1] - prompt.shape[1]} tokens in {seconds:.2f} s, {mode}]")
    return text


if __name__ == "__main__":
    main()
