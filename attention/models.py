"""Transformer models that take any registered mixer, so every workload swaps methods by name, and
CoLT5's routed ViT (routed image attention and the routed feed-forward in every block)."""

from __future__ import annotations

import dataclasses

import torch
from einops import rearrange
from torch import nn

from attention.colt5.config import Colt5Config
from attention.colt5.feedforward import RoutedFeedForward
from attention.colt5.image import RoutedImageAttention
from attention.config import MethodConfig
from attention.registry import build, build_feedforward


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x, mask=None):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + mixer(norm x), then x + ff(norm x). The method may bring its own ff."""

    def __init__(self, attn: MethodConfig, dim: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = build(attn, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = build_feedforward(attn, dim) or FeedForward(dim, ff_mult, dropout)

    def forward(self, x, mask=None, context=None, context_mask=None):
        kwargs = {} if context is None else {"context": context, "context_mask": context_mask}
        x = x + self.mixer(self.norm1(x), mask=mask, **kwargs)
        return x + self.ff(self.norm2(x), mask=mask)

    def step(self, x_t: torch.Tensor, state):
        """One token (B, dim) of causal decoding through the mixer's recurrent state."""
        y, state = self.mixer.step(self.norm1(x_t), state)
        x_t = x_t + y
        return x_t + self.ff(self.norm2(x_t)[:, None])[:, 0], state


class Transformer(nn.Module):
    def __init__(self, attn: MethodConfig, dim: int, depth: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(attn, dim, ff_mult, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, mask=None):
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x)


class DecoderLM(nn.Module):
    """Decoder-only language model: tokens (B, T) -> logits (B, T, vocab). The mixer is made causal."""

    def __init__(self, attn: MethodConfig, vocab: int, dim: int, depth: int, max_len: int,
                 ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        attn = dataclasses.replace(attn, causal=True)
        attn.check_seq_len(max_len)
        self.max_len = max_len
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.body = Transformer(attn, dim, depth, ff_mult, dropout)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds the model's max_len {self.max_len}")
        x = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device))
        return self.head(self.body(x))

    @property
    def recurrent(self) -> bool:
        """True when every mixer carries a state, so decoding costs O(1) per token in the length."""
        return all(hasattr(b.mixer, "step") and hasattr(b.mixer, "init_state") for b in self.body.blocks)

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> list:
        return [b.mixer.init_state(batch, device=device, dtype=dtype) for b in self.body.blocks]

    def step(self, token: torch.Tensor, position: int, states: list) -> tuple[torch.Tensor, list]:
        """Logits (B, vocab) for the next token after `token` (B,) at `position`, and the new states."""
        x = self.tok(token) + self.pos.weight[position]
        new_states = []
        for block, state in zip(self.body.blocks, states):
            x, state = block.step(x, state)
            new_states.append(state)
        return self.head(self.body.norm(x)), new_states

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None, use_state: bool | None = None) -> torch.Tensor:
        """Continue `prompt` (B, P) by `new_tokens` sampled tokens (temperature 0: greedy).

        Recurrent methods decode token by token from their state (O(1) per token); the others (or
        use_state=False) run the model over the last max_len tokens for every new token."""
        recurrent = self.recurrent if use_state is None else use_state
        if recurrent and not self.recurrent:
            raise ValueError("use_state=True: this model's mixers have no recurrent state")
        if prompt.shape[1] + new_tokens > self.max_len and recurrent:
            raise ValueError(f"prompt + new tokens = {prompt.shape[1] + new_tokens} exceeds max_len {self.max_len} "
                             "(position embeddings are learned up to max_len)")
        out = prompt
        if recurrent:
            states = self.init_state(prompt.shape[0], device=prompt.device, dtype=self.tok.weight.dtype)
            for pos in range(prompt.shape[1]):
                logits, states = self.step(prompt[:, pos], pos, states)
        for i in range(new_tokens):
            if not recurrent:
                logits = self(out[:, -self.max_len:])[:, -1]
            token = _sample(logits, temperature, generator)
            out = torch.cat([out, token[:, None]], dim=1)
            if recurrent and i + 1 < new_tokens:
                logits, states = self.step(token, out.shape[1] - 1, states)
        return out


class Encoder(nn.Module):
    """Bidirectional encoder over embedded inputs (B, T, dim) with a key padding mask."""

    def __init__(self, attn: MethodConfig, dim: int, depth: int, max_len: int, ff_mult: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        attn.check_seq_len(max_len)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.body = Transformer(attn, dim, depth, ff_mult, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x + self.pos[: x.shape[1]], mask=mask)


def _sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# --- CoLT5's routed ViT: routed image attention and the routed feed-forward in every block --------

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
