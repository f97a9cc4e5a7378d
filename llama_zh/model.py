"""The LLaMA transformer: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache.

Plain PyTorch only: nothing here knows of Lightning, DeepSpeed, Hugging Face or the hardware.
Rotary embeddings use the "rotate halves" layout (dim j pairs with j + head_dim/2), the layout of
Hugging Face checkpoints; converters permute q/k rows for the interleaved Meta/TencentPretrain
layout (ANCHORS §1). Shapes in comments: B batch, T new tokens, S keys, H heads, K kv heads,
D head size, C model width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama_zh.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype: bf16 sums of squares lose too much.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for `positions` (T,) or per row (B, T): each (T, D) or (B, 1, T, D), computed in fp32 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (T, D/2) or (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (..., T, D): halves layout
    if angles.ndim == 3:
        angles = angles[:, None]  # (B, 1, T, D): broadcast over heads
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); rotate dim j with dim j + D/2."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Keys and values of every layer, allocated once for the longest sequence to be decoded.

    Prompts of different lengths share one cache left-padded: row b's first `left_pad[b]` slots hold
    padding. Its tokens then take positions from 0 as they would alone, and no real query attends to
    a padding slot (a padding query attends to itself only, so no softmax row is empty).
    """

    k: torch.Tensor  # (L, B, K, S_max, D)
    v: torch.Tensor  # (L, B, K, S_max, D)
    pos: int = 0  # tokens already written
    left_pad: torch.Tensor | None = None  # (B,) long; None: no padding

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32,
                 left_pad: torch.Tensor | None = None) -> "KVCache":
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        if left_pad is not None:
            left_pad = torch.as_tensor(left_pad, dtype=torch.long, device=device)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   left_pad=left_pad)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def visible(self, T: int) -> torch.Tensor:
        """(B, 1, T, S) bool: which of the S = pos + T key slots each of the next T queries attends to."""
        key = torch.arange(self.pos + T, device=self.k.device)  # (S,)
        query = key[self.pos:, None]  # (T, 1)
        real = key[None, :] >= self.left_pad[:, None]  # (B, S)
        return ((key <= query) & real[:, None] | (key == query))[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, visible: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        mask, causal = None, T > 1
        if cache is not None:
            start = cache.pos
            cache.k[self.layer, :, :, start : start + T] = k
            cache.v[self.layer, :, :, start : start + T] = v
            k = cache.k[self.layer, :, :, : start + T]  # (B, K, S, D)
            v = cache.v[self.layer, :, :, : start + T]
            if start > 0 and T > 1:
                # SDPA's is_causal aligns the mask top-left; new queries sit at the bottom-right.
                query_pos = torch.arange(start, start + T, device=x.device)
                mask = torch.arange(start + T, device=x.device)[None, :] <= query_pos[:, None]  # (T, S)
                causal = False
            elif start > 0:
                causal = False  # one new token sees every cached key
            if visible is not None:  # left-padded rows (KVCache.visible)
                mask, causal = visible, False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w_up = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x, cos, sin, cache: KVCache | None, visible: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, visible)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("model.vocab_size is unset: resolve it from the tokenizer before building")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). With a cache, the tokens continue it."""
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if start + T > (cache.max_len if cache is not None else self.config.max_seq_len):
            limit = cache.max_len if cache is not None else self.config.max_seq_len
            raise ValueError(f"sequence of {start + T} tokens exceeds the limit of {limit}")
        x = self.embed(input_ids)  # (B, T, C)
        positions = torch.arange(start, start + T, device=input_ids.device)
        visible = None
        if cache is not None and cache.left_pad is not None:
            positions = (positions[None, :] - cache.left_pad[:, None]).clamp(min=0)  # (B, T): each row from 0
            visible = cache.visible(T)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, cache, visible)
        if cache is not None:
            cache.pos += T
        return self.head(self.norm(x))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, std: float = 0.02) -> None:
        """Random init: N(0, std) for matrices, output projections scaled by depth (GPT-2), ones for norms."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
                continue
            scale = residual_std if name.endswith(("wo.weight", "w_down.weight")) else std
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(scale).to(p.dtype))


def build_model(config: ModelConfig, device: str | torch.device = "cpu", dtype=torch.float32, seed: int | None = None) -> Transformer:
    """A model on `device`; on "meta" it costs no memory (weights to be loaded later)."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype)
    if str(device) != "meta":
        model = model.to_empty(device=device)
        model.init_weights(seed)
    return model
