"""The LightningModule: next-token loss, AdamW with decay on matrices only, warmup + cosine, and the
validation loss over the whole split. Throughput and the data mixture's shares are measured by
callbacks (llama_zh.train.callbacks)."""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from llama_zh.data.datasets import IGNORE_INDEX
from llama_zh.errors import LlamaZhError
from llama_zh.model import Transformer, is_plain_linear
from llama_zh.train.loss import linear_cross_entropy, worthwhile

# Batch fields of packed SFT sequences (llama_zh.data.datasets.PackedSFTDataset), passed on to the
# model so that packed examples neither attend to each other nor share positions.
PACKING_KEYS = ("positions", "segment_ids")


# How the next-token loss is computed: auto, the chunked loss where it is the faster one here
# (llama_zh.train.loss.worthwhile), else plain; plain, the logits then cross-entropy; chunked, the head
# applied inside the loss a chunk of positions at a time (the logits never all in memory).
LOSS_KINDS = ("auto", "plain", "chunked")

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
# bitsandbytes keeps the state of tensors smaller than this in 32 bits (its default, passed explicitly
# so that the memory plan counts the same tensors).
MIN_8BIT_SIZE = 4096


@dataclass
class OptimConfig:
    """The `optim=` slice; the defaults are llama_zh/conf/optim/adamw.yaml's (a test checks that they agree)."""

    name: str = "adamw"  # adamw (torch) | adamw8bit | paged_adamw8bit (bitsandbytes, 8-bit moments)
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise LlamaZhError(f"optim.name={self.name!r}; expected one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise LlamaZhError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise LlamaZhError("optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1]")
        self.betas = tuple(self.betas)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine to `min_ratio` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions (B, T, V) x (B, T), in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The RNG seed of one micro-batch: randomness (dropout) is a function of the position in
    training alone, so a resumed run draws what the uninterrupted one would have."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}/{rank}".encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0] >> 1


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of keeping them: the model wraps each
    block call in torch.utils.checkpoint (non-reentrant), the blocks and their parameter names untouched."""
    model.checkpoint_blocks = True


def check_loss(kind: str, zero3: bool, precision: str = "32-true") -> str:
    """Refuse a `loss=` the run cannot use, before anything is built."""
    if kind not in LOSS_KINDS:
        raise LlamaZhError(f"loss={kind!r}; expected one of {', '.join(LOSS_KINDS)}")
    if kind == "chunked" and zero3:
        raise LlamaZhError(
            "loss=chunked multiplies by the head's whole weight, which ZeRO-3 partitions (it is whole only "
            "inside the head's own forward); use loss=auto or plain with strategy=zero3*"
        )
    if kind == "chunked" and str(precision) not in ("32", "32-true"):
        raise LlamaZhError(
            f"loss=chunked computes in fp32 and trainer.precision={precision} is not; use loss=auto or plain"
        )
    return kind


class CausalLM(pl.LightningModule):
    """Trains a `Transformer` given whole, or built by `model` (a callable) inside `configure_model`:
    under ZeRO-3 that runs in deepspeed.zero.Init, so the weights are partitioned as they are created."""

    def __init__(
        self,
        model: Transformer | Callable[[], Transformer],
        optim: OptimConfig,
        total_steps: int,
        seed: int = 0,
        cpu_adam: bool = False,
        loss_kind: str = "auto",
    ):
        super().__init__()
        self.loss_kind = check_loss(loss_kind, zero3=False)  # one of LOSS_KINDS
        if isinstance(model, nn.Module):
            self.model, self._build = model, None
        else:
            self.model, self._build = None, model
        self.optim, self.total_steps, self.seed = optim, total_steps, seed
        self.cpu_adam = cpu_adam  # DeepSpeedCPUAdam: required by DeepSpeed's optimizer offload
        self.tokens_seen = 0
        self._last_step = -1

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self._build()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    # ------------------------------------------------------------------------------------ training

    def on_train_start(self) -> None:
        self._last_step = self.trainer.global_step  # a resumed run starts mid-way

    def on_train_batch_start(self, batch, batch_idx) -> None:
        accumulation = self.trainer.accumulate_grad_batches
        torch.manual_seed(step_seed(self.seed, self.trainer.global_step, batch_idx % accumulation, self.global_rank))

    def loss(self, batch) -> torch.Tensor:
        """Mean next-token cross-entropy of the batch, computed as `loss_kind` says (LOSS_KINDS)."""
        head = self.model.head
        packing = {key: batch[key] for key in PACKING_KEYS if key in batch}
        if self._chunked(head):
            hidden = self.model(batch["input_ids"], return_hidden=True, **packing)
            return linear_cross_entropy(hidden, head.weight, batch["labels"], IGNORE_INDEX)
        return causal_lm_loss(self.model(batch["input_ids"], **packing), batch["labels"])

    def _chunked(self, head: nn.Module) -> bool:
        if self.loss_kind == "plain":
            return False
        # A ZeRO-3 partition is whole only inside head's forward; an adapted or quantized head has its own.
        possible = is_plain_linear(head) and not hasattr(head.weight, "ds_id")
        if self.loss_kind == "chunked":
            if not possible:
                raise LlamaZhError(
                    f"loss=chunked needs the output head as a plain nn.Linear, not {type(head).__name__} "
                    "(adapted by LoRA, quantized, or partitioned); use loss=auto or plain"
                )
            device = head.weight.device.type
            if head.weight.dtype != torch.float32 or torch.is_autocast_enabled(device):
                raise LlamaZhError("loss=chunked computes in fp32, without autocast; use loss=auto or plain")
            return True
        return possible and worthwhile(head.weight)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        # Averaged over processes (each holds a different slice of the global batch).
        distributed = self.trainer.world_size > 1
        self.log("train/loss", loss, prog_bar=True, sync_dist=distributed)
        self.log("train/ppl", torch.exp(loss.detach()), sync_dist=distributed)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        # Counters move here, not in on_train_batch_end: callbacks (the training-state saver among
        # them) see that hook before the module does, and the state must include this batch.
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/tokens", float(self.tokens_seen))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Before clipping; DeepSpeed keeps its gradients to itself and reports the norm after its step.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.trainer.global_step == self._last_step:
            return  # mid-accumulation: the optimizer has not stepped yet
        self._last_step = self.trainer.global_step
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        if engine is not None and engine.get_global_grad_norm() is not None:
            self.log("train/grad_norm", float(engine.get_global_grad_norm()))

    # ---------------------------------------------------------------------------------- validation

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_tokens = 0.0, 0

    def validation_step(self, batch, batch_idx):
        loss = self.loss(batch)
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        self._val_sum += float(loss) * n
        self._val_tokens += n
        return loss

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole split (batches differ in labelled tokens under SFT).
        totals = torch.tensor([self._val_sum, float(self._val_tokens)], dtype=torch.float64, device=self.device)
        totals = self.all_gather(totals).reshape(-1, 2).sum(0) if self.trainer.world_size > 1 else totals
        loss = totals[0] / totals[1].clamp(min=1)
        self.log("val/loss", loss.float(), prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss).float())

    # ------------------------------------------------------------------------------- checkpointing

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Shared with the callbacks' counters (MixtureShares keeps its own there).
        checkpoint.setdefault("llama_zh_counters", {})["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        counters = checkpoint.get("llama_zh_counters")
        if counters:
            self.tokens_seen = counters["tokens_seen"]

    # ---------------------------------------------------------------------------------- optimizer

    def configure_optimizers(self):
        # Weight decay on matrices only: decaying norm gains pulls them toward zero for no benefit.
        params = [p for p in self.model.parameters() if p.requires_grad]

        # ZeRO-3 parameters are flattened placeholders: their true rank is in ds_shape.
        def ndim(p: torch.Tensor) -> int:
            return len(getattr(p, "ds_shape", p.shape))

        decay = [p for p in params if ndim(p) >= 2]
        no_decay = [p for p in params if ndim(p) < 2]
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if self.cpu_adam:
            if self.optim.name != "adamw":
                raise LlamaZhError(
                    f"optim={self.optim.name}: DeepSpeed's optimizer offload steps with its own CPU "
                    "Adam (32-bit state); use optim=adamw with an offload strategy"
                )
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                groups, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps, adamw_mode=True
            )
        elif self.optim.name != "adamw":
            optimizer = eight_bit_adamw(self.optim, groups)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.optim.warmup_steps, self.total_steps, self.optim.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def eight_bit_adamw(optim: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit blockwise-quantized moments (2 bytes of state a parameter instead
    of 8); `paged_adamw8bit` also pages that state to CPU memory under GPU memory pressure, which
    needs CUDA (refused on CPU by `check_optimizer` before the run starts)."""
    from llama_zh.quant import import_bitsandbytes

    bnb = import_bitsandbytes(f"optim={optim.name}")
    cls = bnb.optim.PagedAdamW8bit if optim.name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, min_8bit_size=MIN_8BIT_SIZE)


def check_optimizer(optim: OptimConfig, on_gpu: bool, deepspeed: bool) -> None:
    """Refuse an optimizer the run cannot use, before anything is built."""
    if optim.name == "paged_adamw8bit" and not on_gpu:
        raise LlamaZhError(
            "optim=paged_adamw8bit pages its state between GPU and CPU memory and needs a CUDA "
            "device; on CPU use optim=adamw8bit (the same 8-bit state, unpaged)"
        )
    if optim.name != "adamw" and deepspeed:
        # ZeRO steps the optimizer on flattened partitions of the parameters (and its offload on its own
        # CPU Adam); bitsandbytes' per-tensor 8-bit state is untested there.
        raise LlamaZhError(
            f"optim={optim.name} is not supported with DeepSpeed strategies (ZeRO partitions the "
            "optimizer state itself); use optim=adamw with strategy=zero*, or strategy=auto/ddp "
            f"with optim={optim.name}"
        )
