"""Autoregressive completion with attention.models.DecoderLM: recurrent where every mixer has a state.

Inputs are shifted right by a start token: x_0 = BOS, x_t = token_{t-1}; the logits at position t
predict token_t. A prompt of P known tokens is followed by T - P sampled ones.

Two paths, one result:
- recurrent (every mixer has init_state/step, e.g. `linear`): the prompt is fed one token at a time
  through the states, then each new token costs O(1) in the sequence length;
- full forward (any other method): the whole prefix is re-run for each new token, O(T) per token
  (O(T^2) for softmax), since the mixer interface has no key-value cache."""

from __future__ import annotations

import torch
from torch import nn

from attention.models import DecoderLM


def is_recurrent(model: DecoderLM) -> bool:
    return all(hasattr(b.mixer, "init_state") and hasattr(b.mixer, "step") for b in model.body.blocks)


class RecurrentDecoder:
    """Runs a DecoderLM one position at a time through its mixers' states."""

    def __init__(self, model: DecoderLM, batch: int, device: torch.device, dtype: torch.dtype = torch.float32):
        self.model = model
        self.states = [b.mixer.init_state(batch, device, dtype) for b in model.body.blocks]
        self.pos = 0

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token: (B,) the input at the next position -> logits (B, vocab) for the token after it."""
        m = self.model
        if self.pos >= m.max_len:
            raise ValueError(f"position {self.pos} exceeds the model's max_len {m.max_len}")
        x = m.tok(token) + m.pos.weight[self.pos]  # (B, dim)
        for i, block in enumerate(m.body.blocks):
            y, self.states[i] = block.mixer.step(block.norm1(x), self.states[i])
            x = x + y
            x = x + block.ff(block.norm2(x))
        self.pos += 1
        return m.head(m.body.norm(x))


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def complete(model: nn.Module, prompt: torch.Tensor, length: int, bos: int, temperature: float = 1.0,
             generator: torch.Generator | None = None, recurrent: bool | None = None) -> torch.Tensor:
    """prompt: (B, P) tokens -> (B, length) tokens whose first P are the prompt, the rest sampled
    (temperature 0: the most likely token)."""
    batch, p = prompt.shape
    recurrent = is_recurrent(model) if recurrent is None else recurrent
    start = torch.full((batch,), bos, dtype=torch.long, device=prompt.device)
    out = torch.cat([prompt, prompt.new_zeros(batch, length - p)], dim=1)
    if recurrent:
        decoder = RecurrentDecoder(model, batch, prompt.device)
        logits = decoder.step(start)
        for t in range(p):  # the prompt: x_{t+1} = token_t
            logits = decoder.step(prompt[:, t])
        for t in range(p, length):
            out[:, t] = _sample(logits, temperature, generator)
            if t + 1 < length:
                logits = decoder.step(out[:, t])
        return out
    inputs = torch.cat([start[:, None], out], dim=1)  # (B, 1 + length): BOS, then the tokens
    for t in range(p, length):
        logits = model(inputs[:, :t + 1])[:, -1]  # position t sees BOS and tokens 0..t-1
        out[:, t] = _sample(logits, temperature, generator)
        inputs[:, t + 1] = out[:, t]
    return out
