"""The LLaMA transformer: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, KV cache.

Plain PyTorch only: nothing here knows of Lightning, DeepSpeed, Hugging Face or the hardware. This is
the architecture that trains; inference speed-ups (fused projections, other weight layouts, the CPU
small-batch kernel) are module swaps that llama_zh.infer applies to a loaded model, so no inference
experiment can change training numerics.
Rotary embeddings use the "rotate halves" layout (dim j pairs with j + head_dim/2), the layout of
Hugging Face checkpoints; converters permute q/k rows for the interleaved Meta/TencentPretrain
layout (docs/reference.md#formats). Shapes in comments: B batch, T new tokens, S keys, H heads, K kv heads,
D head size, C model width.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama_zh.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype: bf16 sums of squares lose too much. In fp32
        # the casts are skipped: no-ops, but each still an operator call on the decoding hot path.
        x32 = x if x.dtype == torch.float32 else x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x32 if x.dtype == torch.float32 else x32.to(x.dtype))


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict | None = None, seq_len: int | None = None, device=None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (D/2,) fp32, attention factor) of plain RoPE or of a `scaling` mapping
    (ModelConfig.rope_scaling), computed as transformers computes them, in the same operations and
    order, so that logits agree to float rounding (docs/reference.md#rope-scaling).

    `seq_len` (the positions the forward pass covers) matters to `dynamic` only: past the original
    context its base grows with the sequence, so its tables belong to one length."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = scaling["type"] if scaling else None
    if kind is None:
        return inv_freq, 1.0
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "dynamic":
        if seq_len is None or seq_len <= original:
            return inv_freq, 1.0
        # fp32 tensor arithmetic, as transformers does it with the length taken from the positions tensor
        base = theta * ((factor * torch.tensor(seq_len, device=device) / original) - (factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        return 1.0 / (base**exponents), 1.0
    if kind == "yarn":
        return _yarn_frequencies(head_dim, theta, scaling, exponents)
    return _llama3_frequencies(inv_freq, scaling), 1.0


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def _yarn_frequencies(
    head_dim: int, theta: float, scaling: dict, exponents: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """YaRN: dimensions that turn fewer than beta_slow times over the original context are interpolated
    (divided by factor), those turning more than beta_fast times kept, a linear ramp between; the
    attention factor (mscale) sharpens the softmax that the longer context flattens."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    attention = scaling["attention_factor"]
    if attention is None:
        mscale, mscale_all = scaling["mscale"], scaling["mscale_all_dim"]
        attention = (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else _yarn_mscale(factor)
        )

    def dimension(rotations: float) -> float:  # the dimension that turns `rotations` times over `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(scaling["beta_fast"]), dimension(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(exponents.device)
    keep = 1 - ramp  # 1: extrapolate (frequency kept), 0: interpolate
    periods = theta**exponents
    inv_freq = (1.0 / (factor * periods)) * (1 - keep) + (1.0 / periods) * keep
    return inv_freq, float(attention)


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than original/low_freq_factor are divided by factor, shorter than
    original/high_freq_factor kept, and those between blended smoothly."""
    factor, original = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    middle = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(middle, blended, scaled)


def rope_tables(
    length: int,
    head_dim: int,
    theta: float,
    device=None,
    dtype=torch.float32,
    scaling: dict | None = None,
    seq_len: int | None = None,
):
    """(cos, signed sin) of every position 0 .. length-1, each (length, D), computed in fp32 then cast;
    `scaling`, `seq_len`: see rope_frequencies (a YaRN attention factor multiplies both tables).

    Halves layout: dim j pairs with dim j + D/2, both at angle position x inv_freq[j]. The sin table
    carries the rotation's sign (-sin for the first half), so that apply_rope swaps halves without
    negating: (-a) x b and a x (-b) are the same float, so this is exact, and one operation fewer."""
    inv_freq, attention = rope_frequencies(head_dim, theta, scaling, seq_len, device)
    freqs = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq  # (length, D/2)
    cos, sin = torch.cat((freqs, freqs), dim=-1).cos(), freqs.sin()
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos.to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, N, D) with tables (T, 1, D) or (B, T, 1, D) of rope_tables: each pair (x1, x2) of dims
    (j, j + D/2) becomes (x1 cos - x2 sin, x2 cos + x1 sin)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x.narrow(-1, half, half), x.narrow(-1, 0, half)), dim=-1)  # (x2, x1)
    return x * cos + swapped * signed_sin


@dataclass
class KVCache:
    """Keys and values of every layer, allocated once for the longest sequence to be decoded.

    Prompts of different lengths share one cache left-padded: row b's first `left_pad[b]` slots hold
    padding. Its tokens then take positions from 0 as they would alone, and no real query attends to
    a padding slot (a padding query attends to itself only, so no softmax row is empty).

    What a forward asks of a cache (llama_zh.infer.engine's slot cache answers the same): `end(T)`,
    the positions filled once T more tokens are in; `positions(T)`, where the next T tokens sit by
    default; `mask(T)`, what they attend to; `update(layer, k, v)`, store their keys and values and
    give back every visible one; `advance(T)`, once every layer has stored them.
    """

    k: torch.Tensor  # (L, B, K, S_max, D)
    v: torch.Tensor  # (L, B, K, S_max, D)
    pos: int = 0  # tokens already written
    left_pad: torch.Tensor | None = None  # (B,) long; None: no padding

    def __post_init__(self) -> None:
        self.layer_k = [self.k[i] for i in range(self.k.shape[0])]  # views per layer, taken once
        self.layer_v = [self.v[i] for i in range(self.v.shape[0])]

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch: int,
        max_len: int,
        device=None,
        dtype=torch.float32,
        left_pad: torch.Tensor | None = None,
    ) -> KVCache:
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        if left_pad is not None:
            left_pad = torch.as_tensor(left_pad, dtype=torch.long, device=device)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            left_pad=left_pad,
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def end(self, T: int) -> int:
        return self.pos + T

    def positions(self, T: int) -> int | torch.Tensor:
        """The rotary positions of the next T tokens: an int p (p .. p+T-1 in every row), or (B, T)
        where rows are left-padded (each row counts from 0 at its first real token)."""
        if self.left_pad is None:
            return self.pos
        positions = torch.arange(self.pos, self.pos + T, device=self.k.device)
        return (positions[None, :] - self.left_pad[:, None]).clamp(min=0)

    def visible(self, T: int) -> torch.Tensor:
        """(B, 1, T, S) bool: which of the S = pos + T key slots each of the next T queries attends to."""
        key = torch.arange(self.pos + T, device=self.k.device)  # (S,)
        query = key[self.pos :, None]  # (T, 1)
        real = key[None, :] >= self.left_pad[:, None]  # (B, S)
        return ((key <= query) & real[:, None] | (key == query))[:, None]

    def mask(self, T: int) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for SDPA of the next T queries against the pos + T keys."""
        if self.left_pad is not None:
            return self.visible(T), False
        if self.pos == 0:
            return None, T > 1
        if T == 1:
            return None, False  # one new token sees every cached key
        # SDPA's is_causal aligns the mask top-left; new queries sit at the bottom-right.
        query_pos = torch.arange(self.pos, self.pos + T, device=self.k.device)
        return torch.arange(self.pos + T, device=self.k.device)[None, :] <= query_pos[:, None], False  # (T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, D) at the next T slots of `layer`; return its keys and values so far."""
        T = k.shape[2]
        cached_k, cached_v = self.layer_k[layer], self.layer_v[layer]  # (B, K, S_max, D)
        cached_k.narrow(2, self.pos, T).copy_(k)
        cached_v.narrow(2, self.pos, T).copy_(v)
        return cached_k.narrow(2, 0, self.pos + T), cached_v.narrow(2, 0, self.pos + T)  # (B, K, S, D)

    def advance(self, T: int) -> None:
        self.pos += T


def segment_runs(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(run index, position within the run), each (B, T), of segment ids (B, T): a run is a maximal
    stretch of equal ids, so an id that recurs after another starts a new example, and the mask
    and the positions cannot disagree about where an example begins."""
    T = segment_ids.shape[1]
    index = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    run = starts.long().cumsum(dim=1)
    first = torch.where(starts, index, 0).cummax(dim=1).values  # index where each token's run starts
    return run, index - first


def segment_mask(runs: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool for SDPA: query t sees key s <= t of its own run only (block-diagonal causal),
    so examples packed into one sequence do not attend to each other. Every query sees itself: no
    softmax row is empty, padding included (it is a run of its own)."""
    T = runs.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=runs.device).tril()
    return ((runs[:, :, None] == runs[:, None, :]) & causal)[:, None]


def is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear itself without bias: its product is x @ weight.T and nothing else, so a caller may
    compute it another way (fused, chunked, another kernel); quantized or adapted (LoRA) projections
    are other types and keep their own forward."""
    return type(module) is nn.Linear and module.bias is None


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache, layer: int, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """Attention of q (B, T, H, D) over k, v (B, T, K, D) and, with a cache, the keys before them
    (stored there first): (B, T, H x D), ready for the output projection."""
    B, T, H, D = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or K, T, D)
    if cache is not None:
        k, v = cache.update(layer, k, v)  # (B, K, S, D)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=k.shape[1] != H)
    return y.transpose(1, 2).reshape(B, T, H * D)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(
        self, x, cos, sin, cache: KVCache | None = None, mask: torch.Tensor | None = None, causal: bool = True
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = apply_rope(self.wq(x).view(B, T, H, D), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, K, D), cos, sin)
        v = self.wv(x).view(B, T, K, D)
        return self.wo(attend(q, k, v, cache, self.layer, mask, causal))


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

    def forward(
        self, x, cos, sin, cache: KVCache | None = None, mask: torch.Tensor | None = None, causal: bool = True
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask, causal)
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
        self.tie_weights()
        self._rope_tables: dict = {}  # (device, dtype, length or None) -> (cos, sin), see _rope
        # Recompute each block's activations in backward instead of keeping them (training only: a
        # forward with a cache or without autograd runs the blocks plainly). Not state: set by the trainer.
        self.checkpoint_blocks = False

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        *,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or (B, 1, vocab) of the last position with
        `last_only` (what decoding needs: the head's work for the others is skipped). With a cache,
        the tokens continue it. `return_hidden`: the final normalised states (B, T, C) instead of
        the logits, for a loss that applies the head itself (llama_zh.train.loss).

        `positions` (B, T): the rotary position of each token. None: 0 .. T-1, or with a cache where
        the cache says the next tokens sit (after its tokens; each left-padded row from 0). A caller
        that keeps its own positions (the serving engine: every row of a batch at its own length)
        gives them, and a cache that stores each row at its own position.

        Packed training sequences (no cache): `segment_ids` (B, T) marks which example each token
        belongs to (runs of equal ids); a token then attends only to the earlier tokens of its run,
        and its rotary position counts from 0 at the run's start unless `positions` gives them.
        Without either the attention is SDPA's plain causal one, unmasked."""
        B, T = input_ids.shape
        end = cache.end(T) if cache is not None else T
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if end > limit:
            raise ValueError(f"sequence of {end} tokens exceeds the limit of {limit}")
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids are for training on packed sequences, not with a KV cache")
        x = self.embed(input_ids)  # (B, T, C)
        mask, causal = None, T > 1
        if segment_ids is not None:
            runs, run_positions = segment_runs(segment_ids)
            mask, causal = segment_mask(runs), False
            positions = run_positions if positions is None else positions
        elif cache is not None:
            mask, causal = cache.mask(T)
            if positions is None:
                positions = cache.positions(T)
        cos, sin = self._rope(self._rope_length(end, positions), x.device, x.dtype)  # (S, D)
        if isinstance(positions, torch.Tensor):
            cos, sin = cos[positions, None], sin[positions, None]  # (B, T, 1, D)
        else:
            start = positions or 0
            cos, sin = cos[start : start + T, None], sin[start : start + T, None]  # (T, 1, D)
        checkpointed = self.checkpoint_blocks and cache is None and torch.is_grad_enabled()
        for block in self.layers:
            if checkpointed:  # non-reentrant: frozen inputs and ZeRO-3's gathering inside the block work
                x = checkpoint(block, x, cos, sin, None, mask, causal, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, mask, causal)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        if return_hidden:
            return self.norm(x)
        return self.head(self.norm(x))

    def tie_weights(self) -> None:
        """With config.tie_word_embeddings, make the head's weight the embedding's Parameter itself: one
        tensor, one gradient, one optimizer state. Moving a model to another device may give each
        module its own copy again, so loaders call this once the weights are in place."""
        if self.config.tie_word_embeddings and type(self.head) is nn.Linear and type(self.embed) is nn.Embedding:
            self.head.weight = self.embed.weight

    def _rope_length(self, length: int, positions: torch.Tensor | None) -> int:
        """The sequence length the rotary tables are for: `length` (cache start + new tokens), except
        that dynamic scaling, as transformers does, counts the largest position given plus one."""
        if self.config.rope_type == "dynamic" and isinstance(positions, torch.Tensor):
            return int(positions.max()) + 1
        return length

    def _rope(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables covering `length` positions, computed once per device and dtype (not state:
        they follow from the config). Dynamic scaling past the original context has tables of one
        length each: the latest is kept."""
        config = self.config
        dynamic = config.rope_type == "dynamic" and length > config.rope_scaling["original_max_position_embeddings"]
        key = (device, dtype, length if dynamic else None)
        tables = self._rope_tables.get(key)
        if tables is None or tables[0].shape[0] < length:
            with torch.inference_mode(False):  # normal tensors: a later training step may use them
                rows = length if dynamic else max(length, config.max_seq_len)
                tables = rope_tables(
                    rows,
                    config.head_dim,
                    config.rope_theta,
                    device,
                    dtype,
                    config.rope_scaling,
                    length if dynamic else None,
                )
            if dynamic:
                self._rope_tables = {k: v for k, v in self._rope_tables.items() if k[2] is None}
            self._rope_tables[key] = tables
        return tables

    @torch.no_grad()
    def init_weights(
        self, seed: int | None = None, std: float = 0.02, parameters: Iterable[tuple[str, torch.Tensor]] | None = None
    ) -> None:
        """Random init: N(0, std) for matrices, output projections scaled by depth (GPT-2), ones for norms.

        `parameters`: the (name, tensor) pairs to fill, in named_parameters() order (default: this
        model's). A partitioned (ZeRO-3) model passes each parameter gathered whole in turn, so that it
        draws the same numbers as a whole model."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters() if parameters is None else parameters:
            if p.ndim == 1:
                p.fill_(1.0)
                continue
            scale = residual_std if name.endswith(("wo.weight", "w_down.weight")) else std
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(scale).to(p.dtype))


def build_model(
    config: ModelConfig, device: str | torch.device = "cpu", dtype=torch.float32, seed: int | None = None
) -> Transformer:
    """A model on `device`; on "meta" it costs no memory (weights to be loaded later)."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype=dtype)
    if str(device) != "meta":
        model = model.to_empty(device=device)
        model.tie_weights()
        model.init_weights(seed)
    return model
