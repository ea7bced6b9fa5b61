"""Multi-query associative recall (Arora et al. 2023, "Zoology: Measuring and Improving Recall in
Efficient Language Models"), generated from a seed.

A sequence opens with N key-value pairs `k1 v1 k2 v2 ... kN vN` (keys from the lower half of the
vocabulary, values from the upper half, keys distinct); then each key appears once more, in a random
order, at positions drawn from a power law over the rest of the sequence (near the pairs more often),
and the model must emit its value at the next position. Every other position holds a random token.
Loss and accuracy count only those N query positions: the recall the paper measures."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from attention import MethodConfig
from attention.models import DecoderLM
from workloads.common.config import require
from workloads.common.images import accuracy_margin
from workloads.contract import Floor

IGNORE = -100  # label of positions that are not queries (F.cross_entropy's ignore_index)


def _positive_int(section: str, obj, name: str) -> None:
    v = getattr(obj, name)
    require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{section}.{name}", v,
            "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class MQARData:
    """seq_len: tokens per sequence; num_kv_pairs: N pairs to remember; vocab_size: tokens in all;
    power_a: exponent of the query-gap power law (Zoology's 0.01); eval_examples: held-out sequences."""

    seq_len: int = 64
    num_kv_pairs: int = 8
    vocab_size: int = 128
    power_a: float = 0.01
    eval_examples: int = 1024

    def __post_init__(self):
        for name in ("seq_len", "num_kv_pairs", "vocab_size", "eval_examples"):
            _positive_int("data", self, name)
        n = self.num_kv_pairs
        # 2N tokens of pairs, then N query slots at even offsets of the remaining seq_len - 2N tokens.
        require(self.seq_len >= 4 * n, "data.seq_len", self.seq_len,
                f">= 4 * data.num_kv_pairs = {4 * n} (the pairs and room for one query per key)")
        require(self.vocab_size // 2 - 1 >= n, "data.vocab_size", self.vocab_size,
                f">= {2 * n + 2} (the lower half, less token 0, must hold {n} distinct keys)")
        require(isinstance(self.power_a, (int, float)) and 0 < self.power_a <= 1, "data.power_a",
                self.power_a, "a number in (0, 1]")


def mqar_batch(cfg: MQARData, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels), both (batch, seq_len) int64; labels are IGNORE except at the N query positions,
    where they hold the value the model must predict from the key it has just read."""
    n, t, v = cfg.num_kv_pairs, cfg.seq_len, cfg.vocab_size
    half = v // 2
    # N distinct keys from 1..half-1 and N values from half..v-1 per row: the first N of a random order.
    keys = 1 + np.argsort(rng.random((batch, half - 1)), axis=1)[:, :n]
    values = half + np.argsort(rng.random((batch, v - half)), axis=1)[:, :n]
    context = 2 * n
    slots = (t - context) // 2
    # Query gaps without replacement, weighted by the power law p(g) ~ g^(a-1): the Gumbel top-k trick
    # draws exactly what sampling one by one without replacement would.
    log_p = (cfg.power_a - 1) * np.log(np.arange(1, slots + 1))
    gumbel = -np.log(-np.log(rng.random((batch, slots)).clip(1e-12, 1 - 1e-12)))
    gaps = np.argsort(-(log_p + gumbel), axis=1)[:, :n]
    inputs = rng.integers(0, v, size=(batch, t))  # noise everywhere, then the pairs and the queries
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    rows = np.arange(batch)[:, None]
    query_pos = context + 2 * gaps  # (batch, N), each < t - 1 so that its answer position exists
    inputs[rows, query_pos] = keys
    labels = np.full((batch, t), IGNORE, dtype=np.int64)
    labels[rows, query_pos] = values  # predicted at the query position: the next token is its value
    return inputs.astype(np.int64), labels


class MQARTask:
    quality_metric = "val/acc"
    quality_mode = "max"

    def __init__(self, attn: MethodConfig, model_cfg, data: MQARData, batch_size: int, seed: int):
        self.attn, self.model_cfg, self.data, self.batch_size, self.seed = attn, model_cfg, data, batch_size, seed
        attn.check_seq_len(data.seq_len)

    def build_model(self) -> DecoderLM:
        m = self.model_cfg
        return DecoderLM(self.attn, self.data.vocab_size, m.dim, m.depth, self.data.seq_len, m.ff_mult,
                         m.dropout)

    def batch(self, step: int, rank: int, device):
        # A pure function of (seed, step, rank); stream 0 is training, stream 1 the held-out set.
        x, y = mqar_batch(self.data, self.batch_size, np.random.default_rng([self.seed, 0, step, rank]))
        return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x).float()
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE), int((y != IGNORE).sum())

    @torch.no_grad()
    def evaluate(self, model, device) -> dict[str, float]:
        total, correct, count, seq_correct, seqs = 0.0, 0, 0, 0, 0
        remaining, chunk = self.data.eval_examples, 0
        while remaining > 0:
            size = min(self.batch_size, remaining)
            x, y = mqar_batch(self.data, size, np.random.default_rng([self.seed, 1, chunk]))
            x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            logits = model(x).float()
            is_query = y != IGNORE
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                     reduction="sum").item()
            hit = (logits.argmax(-1) == y) & is_query
            correct += hit.sum().item()
            count += is_query.sum().item()
            seq_correct += (hit.sum(1) == is_query.sum(1)).sum().item()
            seqs += size
            remaining -= size
            chunk += 1
        return {"val/loss": total / count, "val/acc": correct / count, "val/acc_seq": seq_correct / seqs}

    def floors(self) -> list[Floor]:
        """Chance recall, exact for the generator (mqar_batch), in val/acc's units (accuracy over the N
        query positions of eval_examples sequences). Primary: 1/N, a model that has learned the format (the
        answer is one of the N values shown in the pairs) but not which value its key was paired with:
        keys and values are paired at random and the answer never appears in the input. The model whose
        note is in DEFAULTS (16 pairs) "sat at 0.08", just above this 1/16. Second: uniform guessing over
        the value tokens (the upper half of the vocabulary), a model that learned only where to answer."""
        d = self.data
        queries = d.eval_examples * d.num_kv_pairs
        in_context = 1 / d.num_kv_pairs
        any_value = 1 / (d.vocab_size - d.vocab_size // 2)
        return [Floor("recall_chance", in_context, accuracy_margin(in_context, queries), "accuracy",
                      "guessing one of the N values shown in the context, without recalling its key"),
                Floor("value_chance", any_value, accuracy_margin(any_value, queries), "accuracy",
                      "guessing uniformly among the vocabulary's value tokens")]
