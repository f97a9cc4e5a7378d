"""stage=dpo: preference-tune a checkpoint (DPO, SimPO or ORPO) on chosen / rejected response pairs."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from llama_zh.convert import read_any
from llama_zh.data.chat_template import ChatTemplate, template_record
from llama_zh.data.preference import PreferenceData, build_review_preferences
from llama_zh.dpo import PreferenceLM, PreferenceObjective
from llama_zh.stages import plain, train_settings
from llama_zh.train.build import ModelSource, check_seq_len, checkpoint_tokenizer
from llama_zh.train.fit import TrainJob, fit, prepare_batch

log = logging.getLogger(__name__)


def run(cfg: DictConfig):
    settings = train_settings(cfg)
    pl.seed_everything(settings.seed, workers=True)
    stage = cfg.stage
    # `lambda` is a Python keyword: the objective calls it `lam`.
    objective = PreferenceObjective(loss=str(stage.loss), beta=stage.beta, gamma=stage.gamma, lam=stage["lambda"])
    # Each pair is two sequences in one forward pass: the batch plan (memory, tokens per step) counts sequences.
    plan = prepare_batch(settings, 2 * stage.batch_size, stage.seq_len)
    stream = read_any(stage.checkpoint)
    tokenizer = checkpoint_tokenizer(stream, "stage.checkpoint")
    check_seq_len(stage.seq_len, stream.config, "stage.seq_len")
    data_file = Path(stage.data) if stage.data else build_review_preferences(Path(cfg.paths.data_dir))
    template = ChatTemplate.from_config(plain(cfg.template))
    log.info(
        "preference data: %s, chat template %s, loss %s (beta %s, gamma %s, lambda %s)",
        data_file,
        template.name,
        objective.loss,
        objective.beta,
        objective.gamma,
        objective.lam,
    )
    data = PreferenceData(
        data_file,
        template,
        tokenizer,
        stage.seq_len,
        stage.batch_size,
        stage.val_fraction,
        settings.seed,
        max_records=stage.max_records,
    )
    data.setup("fit")  # bad records are refused before the model is built
    job = TrainJob(
        "dpo",
        ModelSource(stream.config, stream, settings.seed),
        tokenizer,
        data,
        plan,
        extra={"data": str(data_file), "loss": objective.loss, **template_record(template)},
        make_module=functools.partial(PreferenceLM, objective=objective),
    )
    return fit(settings, job)  # last val/loss (a sweeper's objective), .checkpoint: the final native checkpoint
