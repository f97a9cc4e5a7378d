"""Inference speed-ups as module swaps, applied once to a loaded model (`apply`), as quantization
swaps bitsandbytes modules in.

- `FusedAttention`: q, k and v in one matrix product, q and k rotated in one pass.
- `FusedFeedForward`: gate and up in one matrix product, the SwiGLU product in place.
- the remaining plain projections (wo, w_down) and the head become the backend's linear.

Backends (the product each swapped module computes with):
- `torch`: F.linear; on CPU the wide weights (out >= WIDE x in: the head, gate/up) are stored
  column-major, which MKL's one-row product reads faster with the same results.
- `kernel`: llama_zh.kernels.linear, the CPU kernels for the few rows of a decoding step (row-major
  weights, copied once into 2 MiB pages; F.linear wherever the kernel does not apply, e.g. a long
  prefill or with autograd).

The layout is chosen here and never changes afterwards: generation reads the weights as they were
laid out at load. The fused weight is one matrix whose row blocks are the original projections'
parameters (views, same memory), kept as a buffer outside the state dict, so the state dict, the
parameter count and the memory stay those of the plain model. Swaps are for inference: the fused
products run without autograd only (with it, the separate ones, so that gradients reach the
parameters); apply them last, after any move or cast (`.to()` gives the views and the fused buffer
separate copies: still the same values, but an in-place change of one no longer reaches the other).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama_zh import kernels
from llama_zh.model import Attention, FeedForward, Transformer, apply_rope, attend, is_plain_linear

BACKENDS = ("torch", "kernel")
WIDE = 4  # out_features / in_features from which a weight is read faster column-major (see column_major)


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same (out, in) matrix stored in-major: x @ W.T then reads W as rows of W.T, contiguous.

    For matrices at least WIDE times wider than deep the product with 1 row runs faster this way, with
    bit-identical results; for squarer ones it is a wash or slower (experiments/inference.md, the
    column-major layout)."""
    return weight.T.contiguous().T


def _layout(weight: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "torch" and weight.device.type == "cpu" and weight.shape[0] >= WIDE * weight.shape[1]:
        return column_major(weight)
    if backend == "kernel" and weight.device.type == "cpu" and weight.numel() >= kernels.MIN_WEIGHT:
        return kernels.huge_page_copy(weight)  # streamed every step: 2 MiB pages read faster
    return weight.contiguous()


class KernelLinear(nn.Linear):
    """nn.Linear without bias whose product goes through llama_zh.kernels.linear (F.linear where the
    kernel does not apply). Same parameter, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight)


class FusedLinear(nn.Module):
    """x @ weight.T of a weight that is not a parameter of its own (the row blocks are the original
    projections' parameters): a buffer left out of the state dict."""

    def __init__(self, weight: torch.Tensor, backend: str):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "kernel":
            return kernels.linear(x, self.weight)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"out={self.weight.shape[0]}, in={self.weight.shape[1]}, backend={self.backend}"


def _linear(module: nn.Module, backend: str) -> nn.Module:
    """The backend's version of a plain linear (same parameter values); anything else unchanged."""
    if not is_plain_linear(module) or module.weight.device.type == "meta":
        return module
    weight = _layout(module.weight.detach(), backend)
    if backend == "torch" and weight.stride() == module.weight.stride():
        return module  # F.linear on the same layout: nothing to swap
    new = (KernelLinear if backend == "kernel" else nn.Linear)(
        module.in_features, module.out_features, bias=False, device="meta"
    )
    new.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    return new


def _fuse(linears: list[nn.Linear], backend: str) -> FusedLinear | None:
    """One product for several plain linears of one input: their weights become row blocks (views)
    of one matrix; None if they cannot share one (quantized, adapted, other device or dtype)."""
    if not all(is_plain_linear(m) for m in linears):
        return None
    weights = [m.weight for m in linears]
    if len({(w.device, w.dtype, w.shape[1]) for w in weights}) != 1 or weights[0].device.type == "meta":
        return None
    fused = _layout(torch.cat([w.detach() for w in weights]), backend)
    row = 0
    for m, w in zip(linears, weights, strict=False):
        m.weight = nn.Parameter(fused[row : row + w.shape[0]], requires_grad=w.requires_grad)
        row += w.shape[0]
    return FusedLinear(fused, backend)


class FusedAttention(nn.Module):
    """model.Attention with q/k/v as one product (`wqkv`); wq/wk/wv stay as the state dict's views."""

    def __init__(self, attn: Attention, wqkv: FusedLinear, backend: str):
        super().__init__()
        self.layer = attn.layer
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.wq, self.wk, self.wv = attn.wq, attn.wk, attn.wv
        self.wqkv = wqkv
        self.wo = _linear(attn.wo, backend)

    def forward(self, x, cos, sin, cache=None, mask: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        if torch.is_grad_enabled():  # the fused weight is no parameter: gradients need the separate products
            q = apply_rope(self.wq(x).view(B, T, H, D), cos, sin)
            k = apply_rope(self.wk(x).view(B, T, K, D), cos, sin)
            v = self.wv(x).view(B, T, K, D)
        else:
            qkv = self.wqkv(x).view(B, T, H + 2 * K, D)
            qk = apply_rope(qkv.narrow(2, 0, H + K), cos, sin)  # q and k heads rotated in one pass
            q, k, v = qk.narrow(2, 0, H), qk.narrow(2, H, K), qkv.narrow(2, H + K, K)
        return self.wo(attend(q, k, v, cache, self.layer, mask, causal))


class FusedFeedForward(nn.Module):
    """model.FeedForward with gate/up as one product (`w_gate_up`); w_gate/w_up stay as views."""

    def __init__(self, ffn: FeedForward, w_gate_up: FusedLinear, backend: str):
        super().__init__()
        self.w_gate, self.w_up = ffn.w_gate, ffn.w_up
        self.w_gate_up = w_gate_up
        self.w_down = _linear(ffn.w_down, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # as FusedAttention: gradients reach the parameters
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        gate, up = self.w_gate_up(x).chunk(2, dim=-1)
        return self.w_down(F.silu(gate, inplace=True).mul_(up))  # no autograd: in place is safe


@torch.no_grad()
def apply(model: Transformer, backend: str) -> dict[str, int]:
    """Swap `model`'s modules for `backend`'s (in place); returns how many of each kind were swapped.
    Blocks with a quantized or adapted projection keep their own modules there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    counts = {"attention": 0, "feed_forward": 0, "linear": 0}
    for block in model.layers:
        attn, ffn = block.attn, block.ffn
        if type(attn) is Attention and (wqkv := _fuse([attn.wq, attn.wk, attn.wv], backend)) is not None:
            block.attn = FusedAttention(attn, wqkv, backend)
            counts["attention"] += 1
            counts["linear"] += block.attn.wo is not attn.wo
        if type(ffn) is FeedForward and (gate_up := _fuse([ffn.w_gate, ffn.w_up], backend)) is not None:
            block.ffn = FusedFeedForward(ffn, gate_up, backend)
            counts["feed_forward"] += 1
            counts["linear"] += block.ffn.w_down is not ffn.w_down
    tied = model.head.weight is model.embed.weight
    head = _linear(model.head, backend)
    counts["linear"] += head is not model.head
    model.head = head
    if tied and model.embed.weight is not head.weight:
        # One matrix still: the embedding gathers its few rows per step from the head's layout
        # rather than keeping a second vocab x dim copy.
        model.embed.weight = head.weight
    return counts
