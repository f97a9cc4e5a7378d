"""A native checkpoint records its tokenizer's sha256 and refuses another tokenizer of the same size;
pretraining from a checkpoint takes its shape and says it loaded the weights."""

import logging
import re

import pytest
import yaml
from tiny_checkpoints import make_checkpoint, train_tokenizer

from llama_zh.checkpoint import CONFIG_FILE, read_native
from llama_zh.config import ConfigError
from llama_zh.convert import convert, load_checkpoint
from llama_zh.tensor_io import CheckpointError
from llama_zh.tokenizer import file_sha256
from llama_zh.vocab import extend_tokenizer, resize_checkpoint


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Two unrelated tokenizers of the same size (trained on different amounts of review text)."""
    d = tmp_path_factory.mktemp("tok")
    a, b = train_tokenizer(d / "a", 2000, reviews=1500), train_tokenizer(d / "b", 2000, reviews=1000)
    assert a.vocab_size == b.vocab_size and a.sha256() != b.sha256()
    return a, b


@pytest.fixture()
def checkpoint(tmp_path, tokenizers):
    return make_checkpoint(tmp_path / "ckpt", tokenizers[0])[0]


def recorded(path):
    return yaml.safe_load((path / CONFIG_FILE).read_text())["tokenizer_sha256"]


def test_the_tokenizer_hash_is_recorded(checkpoint, tokenizers):
    assert recorded(checkpoint) == tokenizers[0].sha256() == file_sha256(checkpoint / "tokenizer.model")
    model, tok = load_checkpoint(checkpoint)
    assert tok.sha256() == tokenizers[0].sha256()


def test_a_swapped_tokenizer_is_refused(checkpoint, tokenizers):
    (checkpoint / "tokenizer.model").write_bytes(tokenizers[1].path.read_bytes())
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(checkpoint)
    message = str(e.value)
    assert str(checkpoint) in message and "\n" not in message
    assert tokenizers[0].sha256() in message and tokenizers[1].sha256() in message


def test_a_checkpoint_without_the_hash_still_loads(checkpoint, tokenizers, caplog):
    meta = yaml.safe_load((checkpoint / CONFIG_FILE).read_text())
    del meta["tokenizer_sha256"]
    (checkpoint / CONFIG_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))
    with caplog.at_level(logging.DEBUG, logger="llama_zh.checkpoint"):
        stream = read_native(checkpoint)
    assert stream.tokenizer_sha256 is None and "tokenizer not checked" in caplog.text
    load_checkpoint(checkpoint)


def test_converting_a_checkpoint_with_another_tokenizer_is_refused(checkpoint, tokenizers, tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(f"stage.tokenizer {tokenizers[1].path} has sha256")):
        convert(checkpoint, "native", tmp_path / "out", "native", tokenizer=tokenizers[1].path)
    assert not (tmp_path / "out").exists()
    # The same tokenizer is fine, and the copy records the hash again.
    out = convert(checkpoint, "native", tmp_path / "out", "native", tokenizer=tokenizers[0].path)
    assert recorded(out) == tokenizers[0].sha256()


def test_a_resized_checkpoint_records_the_new_tokenizer(checkpoint, tokenizers, tmp_path):
    extended = tmp_path / "extended.model"
    extend_tokenizer(tokenizers[0].path, tokenizers[1].path, extended)
    out = resize_checkpoint(checkpoint, extended, tmp_path / "resized")
    assert recorded(out) == file_sha256(extended) != tokenizers[0].sha256()
    load_checkpoint(out)


# ------------------------------------------------------------------------------- stage.init_from


def pretrain_cfg(init_from, **model):
    from omegaconf import OmegaConf

    shape = (
        dict(
            name="tiny",
            vocab_size=None,
            dim=128,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=352,
            norm_eps=1e-6,
            rope_theta=10000.0,
            max_seq_len=512,
        )
        | model
    )
    return OmegaConf.create({"stage": {"init_from": str(init_from)}, "model": shape})


def test_init_from_refuses_a_chosen_model_of_another_shape(checkpoint):
    from llama_zh.stages.pretrain import check_init_shape

    stream = read_native(checkpoint)  # dim 64, n_layers 2, ffn_dim 128, max_seq_len 128
    with pytest.raises(ConfigError) as e:
        check_init_shape(pretrain_cfg(checkpoint), stream, ["model=tiny"])
    message = str(e.value)
    assert message.startswith("model=tiny differs from the checkpoint of stage.init_from=")
    for field in (
        "dim 128 (checkpoint 64)",
        "n_layers 4 (checkpoint 2)",
        "ffn_dim 352 (checkpoint 128)",
        "max_seq_len 512 (checkpoint 128)",
    ):
        assert field in message
    assert "n_heads" not in message and "vocab_size" not in message  # equal, and null (from the tokenizer)


def test_init_from_accepts_a_chosen_model_of_the_same_shape(checkpoint):
    from llama_zh.stages.pretrain import check_init_shape

    stream = read_native(checkpoint)
    same = pretrain_cfg(checkpoint, **{k: v for k, v in stream.config.to_dict().items() if k != "name"})
    check_init_shape(same, stream, ["model.dim=64"])


def test_init_from_with_the_default_model_says_it_takes_the_checkpoints_shape(checkpoint, caplog):
    from llama_zh.stages.pretrain import check_init_shape

    with caplog.at_level(logging.INFO, logger="llama_zh.stages.pretrain"):
        check_init_shape(pretrain_cfg(checkpoint), read_native(checkpoint), [])
    assert "the model's shape is the checkpoint's (vocab_size=2000, dim=64, n_layers=2" in caplog.text
    assert "not model=tiny" in caplog.text


def test_building_from_a_checkpoint_logs_the_loaded_weights(checkpoint, caplog):
    from llama_zh.train.build import ModelSource, model_builder
    from llama_zh.train.finetune import FinetuneConfig

    stream = read_native(checkpoint)
    with caplog.at_level(logging.INFO, logger="llama_zh.train.build"):
        model = model_builder(ModelSource(stream.config, stream), FinetuneConfig(), zero3=False, checkpointing=False)()
    n = sum(p.numel() for p in model.parameters())
    assert n == stream.config.n_params
    assert f"loaded weights from {checkpoint} ({n} params)" in caplog.text
