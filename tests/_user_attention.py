"""Transformer blocks a user writes with their own attention (heads split by view/reshape), for tracing tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(tokens: int, device: torch.device) -> torch.Tensor:
    """True above the diagonal: the future positions a token may not attend to (a leaf of the fx graph)."""
    return torch.ones(tokens, tokens, dtype=torch.bool, device=device).triu(1)


torch.fx.wrap("causal_mask")


class Attention(nn.Module):
    """Multi-head self-attention in the common hand-written styles.

    `style`: "separate" (q/k/v Linears, q @ k^T, causal mask, softmax, @ v), "fused" (one qkv Linear cut by
    view + permute + unbind), "chunk" (fused qkv cut by chunk, then view), "sdpa" (F.scaled_dot_product_attention),
    "einsum" (scores and values by torch.einsum).
    """

    def __init__(self, width: int, heads: int, style: str = "separate") -> None:
        super().__init__()
        self.heads, self.head_dim, self.style = heads, width // heads, style
        if style in ("fused", "chunk"):
            self.qkv = nn.Linear(width, 3 * width)
        else:
            self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.drop = nn.Dropout(0.0)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        if self.style == "fused":
            qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        elif self.style == "chunk":
            parts = self.qkv(x).chunk(3, dim=-1)
            q, k, v = self.split(parts[0]), self.split(parts[1]), self.split(parts[2])
        else:
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.style == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.style == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(self.head_dim)
            y = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)
        else:
            scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim))
            scores = scores.masked_fill(causal_mask(t, scores.device), float("-inf"))
            y = self.drop(F.softmax(scores, dim=-1)) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: residual stream, LayerNorm, attention, GELU MLP."""

    def __init__(self, width: int, heads: int, style: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, style)
        self.fc, self.proj = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Inputs (batch, tokens, features) -> embedding Linear, blocks, final norm, per-token head."""

    def __init__(self, features: int = 6, width: int = 32, heads: int = 4, layers: int = 2, style: str = "separate",
                 classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.blocks = nn.ModuleList(Block(width, heads, style) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def tiny_transformer(style: str = "separate") -> TinyTransformer:
    """The factory a recipe names as `tests._user_attention:tiny_transformer`."""
    return TinyTransformer(style=style)
