"""Next-token cross-entropy computed together with the output head, a chunk of positions at a time.

The plain way, `cross_entropy(hidden @ W.T, labels)`, writes the logits of every position (N x V
floats: 64 MB for 2,048 tokens of an 8,000-piece vocabulary), reads them back for the log-softmax,
writes that, and in backward reads and writes them twice more, plus a zero-filled N x V gradient,
all at memory speed.

Here the logits of `chunk` positions at a time are computed, reduced to their loss and turned into
their gradient (softmax - one-hot) while they are still in cache, and the gradients of the hidden
states and of W are accumulated in the forward pass; backward only scales them by the incoming
gradient. The loss is the same quantity (mean over labelled positions, fp32), to rounding.

It pays where the logits' memory passes dominate, not where the head's matrix products do (the
gradient of a wide head's weight is read and written once per chunk), hence `worthwhile`: fp32 on
CPU with a width of at most 256. Measurements: experiments/loss.md. Plain PyTorch, no Lightning:
`llama_zh.train.module.CausalLM` decides when to use it.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 16 << 20  # logits per chunk (512 positions at vocab 8,000): experiments/loss.md
MAX_WIDTH = 256  # see the module docstring


def chunk_rows(vocab_size: int, itemsize: int = 4) -> int:
    return max(16, CHUNK_BYTES // (vocab_size * itemsize))


def worthwhile(weight: torch.Tensor) -> bool:
    """Whether the chunked loss is the faster one for a head `weight` (V, C) here (experiments/loss.md):
    fp32 on CPU, no autocast, C <= MAX_WIDTH."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and weight.shape[1] <= MAX_WIDTH
    )


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk: int):
        # hidden (N, C), weight (V, C), labels (N,)
        N = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        ignored = labels == ignore_index
        any_ignored = bool(ignored.any())
        count = N - int(ignored.sum()) if any_ignored else N
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, N, chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = h @ weight.T  # (n, V)
            if any_ignored:
                keep = ~ignored[start : start + chunk]
                y = torch.where(keep, y, 0)
            target = logits.gather(1, y[:, None]).squeeze(1)  # (n,)
            # One pass each, in place: shift by the row max, exponentiate, sum; the exponentials
            # then become the softmax (the gradient) without a second exp.
            top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
            exp = logits.sub_(top).exp_()
            sums = exp.sum(dim=-1, keepdim=True)
            losses = sums.log().add_(top).squeeze(1) - target  # logsumexp - target logit
            total += (losses * keep).sum() if any_ignored else losses.sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad = exp.mul_(sums.reciprocal_())  # softmax
            grad.scatter_add_(1, y[:, None], torch.full_like(target[:, None], -1.0))  # - one-hot
            if any_ignored:
                grad.mul_(keep[:, None])
            if grad_hidden is not None:
                torch.mm(grad, weight, out=grad_hidden[start : start + chunk])
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h)
        scale = 1.0 / max(count, 1)
        ctx.scale = scale
        ctx.grads = (grad_hidden, grad_weight)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # used once: scaled in place below (a second backward through it is refused)
        factor = grad_output * ctx.scale
        return (
            grad_hidden.mul_(factor) if grad_hidden is not None else None,
            grad_weight.mul_(factor) if grad_weight is not None else None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, chunk: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of logits `hidden @ weight.T` against `labels` over the positions whose
    label is not `ignore_index` (0 if there are none), without materialising the logits.

    hidden (..., C), weight (V, C), labels (...). Gradients flow to hidden and weight."""
    chunk = chunk or chunk_rows(weight.shape[0], weight.element_size())
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), ignore_index, chunk
    )
