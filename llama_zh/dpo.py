"""Preference tuning: DPO, SimPO and ORPO losses on summed response log-probabilities, and the module.

The losses are pure functions of per-example log-probabilities (summed over a response's tokens;
llama_zh.data.preference decides which tokens), so that they can be checked by hand:

- DPO:   -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); reward = beta * (pi - ref).
- SimPO: -log sigmoid(beta * pi_c / |c| - beta * pi_r / |r| - gamma), no reference; reward =
         beta * pi / |y| (the length-averaged log-probability).
- ORPO:  -pi_c / |c| + lambda * -log sigmoid(odds_c - odds_r), no reference, where
         odds = log(p / (1 - p)) of the length-averaged probability p = exp(pi / |y|); reward = odds.

pi is log pi(y|x) summed over the response, ref the same under the reference policy, |y| the
number of response tokens. Losses are averaged over the pairs of a batch.

The reference policy of DPO is the starting checkpoint, never a second copy of the model:
- LoRA with only the adapters training (or a prefix, finetune=prefix): the same model with them switched off
  (`finetune.adapters_disabled`), computed alongside each step;
- otherwise (full, freeze, LoRA with modules_to_save): every pair's reference log-probs are computed
  once before the first step, with the starting weights, and kept in memory (2 numbers a pair) and
  in the training state, so that a resumed run uses the same ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama_zh.data.datasets import IGNORE_INDEX
from llama_zh.errors import LlamaZhError
from llama_zh.train.finetune import LoRALinear, adapters_disabled
from llama_zh.train.module import CausalLM

log = logging.getLogger(__name__)

LOSSES = ("dpo", "simpo", "orpo")
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0}


# ------------------------------------------------------------------------------------------ losses


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of the labelled tokens, their count) per row of (B, T, V) x (B, T), fp32."""
    mask = labels != IGNORE_INDEX
    logp = logits.float().log_softmax(-1).gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp, 0.0).sum(-1), mask.sum(-1)


def dpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) of DPO."""
    chosen_rewards, rejected_rewards = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def simpo_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) of SimPO: length-averaged, a target margin gamma."""
    chosen_rewards, rejected_rewards = beta * chosen / chosen_len, beta * rejected / rejected_len
    return -F.logsigmoid(chosen_rewards - rejected_rewards - gamma), chosen_rewards, rejected_rewards


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) from log p < 0, without the cancellation of 1 - exp(log p) near p = 1."""
    mean_logp = mean_logp.clamp(max=-1e-7)  # p = 1 exactly: the odds are infinite
    log1m = torch.where(mean_logp > -0.6931, torch.log(-torch.expm1(mean_logp)), torch.log1p(-torch.exp(mean_logp)))
    return mean_logp - log1m


def orpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, chosen_len: torch.Tensor, rejected_len: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) of ORPO: the chosen response's mean token NLL
    plus lambda times the log odds-ratio term; the rewards are the log odds."""
    chosen_odds, rejected_odds = _log_odds(chosen / chosen_len), _log_odds(rejected / rejected_len)
    return -chosen / chosen_len - lam * F.logsigmoid(chosen_odds - rejected_odds), chosen_odds, rejected_odds


@dataclass
class PreferenceObjective:
    """`stage.loss` and its coefficients; `beta` None: the loss's usual value (DEFAULT_BETA)."""

    loss: str = "dpo"
    beta: float | None = None
    gamma: float = 0.5
    lam: float = 0.1

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise LlamaZhError(f"stage.loss={self.loss!r}; expected one of {', '.join(LOSSES)}")
        if self.beta is None:
            self.beta = DEFAULT_BETA.get(self.loss, 0.0)
        for name, value in (("beta", self.beta), ("lambda", self.lam)):
            if not isinstance(value, (int, float)) or (value <= 0 and not (name == "beta" and self.loss == "orpo")):
                raise LlamaZhError(f"stage.{name}={value!r}: expected a number > 0")
        if not isinstance(self.gamma, (int, float)) or self.gamma < 0:
            raise LlamaZhError(f"stage.gamma={self.gamma!r}: expected a number >= 0")

    @property
    def needs_reference(self) -> bool:
        return self.loss == "dpo"

    def __call__(self, chosen, rejected, chosen_len, rejected_len, ref_chosen=None, ref_rejected=None):
        if self.loss == "dpo":
            return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        if self.loss == "simpo":
            return simpo_loss(chosen, rejected, chosen_len, rejected_len, self.beta, self.gamma)
        return orpo_loss(chosen, rejected, chosen_len, rejected_len, self.lam)


# ------------------------------------------------------------------------------------------ module


def adapters_only(model: torch.nn.Module) -> bool:
    """Whether LoRA adapters or a prefix are all that trains: then switching them off gives the starting model."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    adapter = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)}
    prefix = getattr(model, "prefix", None)
    adapter |= {id(p) for p in prefix.parameters()} if prefix is not None else set()
    return bool(adapter) and trainable <= adapter


class PreferenceLM(CausalLM):
    """CausalLM trained on a preference objective. A batch (llama_zh.data.preference) holds 2B rows,
    the chosen responses then the rejected ones, and each pair's `index`; everything else (optimizer,
    schedule, checkpoints) is CausalLM's, and throughput is measured by the same callbacks."""

    def __init__(self, *args, objective: PreferenceObjective, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.reference_mode: str | None = None  # "adapters_off" | "stored" | None (no reference needed)
        self.reference: torch.Tensor | None = None  # (pairs, 2) summed log-probs of chosen, rejected
        self.reference_fingerprint = ""

    # --------------------------------------------------------------------------------- reference

    def on_fit_start(self) -> None:
        if not self.objective.needs_reference:
            return
        if adapters_only(self.model):
            self.reference_mode = "adapters_off"
            log.info("DPO reference: the model with its LoRA adapters or prefix switched off")
            return
        self.reference_mode = "stored"
        data = self.trainer.datamodule
        if self.reference is None:  # else restored with the training state, the weights no longer the starting ones
            self.reference = self._compute_reference(data)
            self.reference_fingerprint = data.fingerprint

    def on_train_start(self) -> None:
        super().on_train_start()
        # Here, after every kind of restore: a resumed run must score the pairs its reference is of.
        data = self.trainer.datamodule
        if self.reference_mode == "stored" and self.reference_fingerprint != data.fingerprint:
            raise LlamaZhError(
                "the training state's DPO reference log-probs are of other preference data than "
                f"{data.file} (or other template / seq_len); resume with the same data, or resume=null"
            )

    @torch.no_grad()
    def _compute_reference(self, data) -> torch.Tensor:
        """Every pair's log-probs under the current (starting) weights. Each process computes all of
        them: under ZeRO-3 every forward is collective, and the set is small beside training."""
        loader = data.reference_dataloader()
        out = torch.zeros(len(data.all), 2, dtype=torch.float32)
        start, last = time.monotonic(), time.monotonic()
        log.info(
            "DPO reference: log-probs of %d pairs under the starting weights (once, before training)", len(data.all)
        )
        with self.trainer.precision_plugin.forward_context():
            for i, batch in enumerate(loader):
                sums, _ = self._logps(batch)
                out[batch["index"]] = sums.view(2, -1).T.float().cpu()
                if time.monotonic() - last > 30:
                    last = time.monotonic()
                    log.info("DPO reference: %d/%d batches (%.0f s)", i + 1, len(loader), last - start)
        return out

    def _logps(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
        return sequence_logps(self.model(ids), labels)

    def _reference_logps(self, batch) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if self.reference_mode == "adapters_off":
            with torch.no_grad(), adapters_disabled(self.model):
                sums, _ = self._logps(batch)
            return sums.view(2, -1).unbind(0)
        if self.reference_mode == "stored":
            ref = self.reference[batch["index"].cpu()].to(self.device)
            return ref[:, 0], ref[:, 1]
        return None, None

    # ---------------------------------------------------------------------------------- steps

    def preference_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss per pair, chosen rewards, rejected rewards, policy log-probs (2, B))."""
        sums, counts = self._logps(batch)
        chosen, rejected = sums.view(2, -1).unbind(0)
        chosen_len, rejected_len = counts.view(2, -1).unbind(0)
        ref_chosen, ref_rejected = self._reference_logps(batch)
        losses, chosen_rewards, rejected_rewards = self.objective(
            chosen, rejected, chosen_len, rejected_len, ref_chosen, ref_rejected
        )
        return losses, chosen_rewards, rejected_rewards, sums.view(2, -1)

    def training_step(self, batch, batch_idx):
        losses, chosen, rejected, logps = self.preference_step(batch)
        loss = losses.mean()
        distributed = self.trainer.world_size > 1
        self.log("train/loss", loss, prog_bar=True, sync_dist=distributed)
        chosen, rejected = chosen.detach(), rejected.detach()
        for name, value in (
            ("chosen", chosen.mean()),
            ("rejected", rejected.mean()),
            ("margin", (chosen - rejected).mean()),
            ("accuracy", (chosen > rejected).float().mean()),
        ):
            self.log(f"rewards/{name}", value, sync_dist=distributed)
        self.log("logps/chosen", logps[0].detach().mean(), sync_dist=distributed)
        self.log("logps/rejected", logps[1].detach().mean(), sync_dist=distributed)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.tokens_seen += batch["input_ids"].numel() * self.trainer.world_size
        self.log("train/tokens", float(self.tokens_seen))
        return loss

    def on_validation_epoch_start(self) -> None:
        # loss, chosen reward, rejected reward, correct, pairs: summed over the split
        self._val_totals = torch.zeros(5, dtype=torch.float64)

    def validation_step(self, batch, batch_idx):
        losses, chosen, rejected, _ = self.preference_step(batch)
        sums = [losses.sum(), chosen.sum(), rejected.sum(), (chosen > rejected).sum(), torch.tensor(len(losses))]
        self._val_totals += torch.tensor([float(x) for x in sums], dtype=torch.float64)
        return losses.mean()

    def on_validation_epoch_end(self) -> None:
        totals = self._val_totals.to(self.device)
        totals = self.all_gather(totals).reshape(-1, 5).sum(0) if self.trainer.world_size > 1 else totals
        loss, chosen, rejected, correct = (totals[:4] / totals[4].clamp(min=1)).float().unbind(0)
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/rewards/chosen", chosen, sync_dist=False)
        self.log("val/rewards/rejected", rejected, sync_dist=False)
        self.log("val/rewards/margin", chosen - rejected, sync_dist=False)
        self.log("val/rewards/accuracy", correct, prog_bar=True, sync_dist=False)

    # ---------------------------------------------------------------------------- checkpointing

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.reference is not None:
            checkpoint["llama_zh_dpo_reference"] = {
                "logps": self.reference.clone(),
                "fingerprint": self.reference_fingerprint,
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Before on_fit_start for Lightning's own strategies (the weights restored here are no longer
        # the starting ones); after it under DeepSpeed, where it replaces an identical computation.
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("llama_zh_dpo_reference")
        if stored:
            self.reference, self.reference_fingerprint = stored["logps"].clone(), stored["fingerprint"]
