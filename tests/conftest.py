import os

# Never touch the network from tests: no hub, no W&B server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    """The tokenizer.json of a byte-level BPE in Llama-3's layout trained on the sample corpus
    (tests/bpe_fixture.py)."""
    from bpe_fixture import make_bpe

    return make_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture
def small_weights_too(monkeypatch):
    """The CPU kernel for the small weights of tests (in use it starts at kernels.MIN_WEIGHT elements)."""
    from llama_zh import kernels

    monkeypatch.setattr(kernels, "MIN_WEIGHT", 0)


@pytest.fixture
def threads():
    """torch.set_num_threads, with the thread count restored after the test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The sentencepiece tokenizer of tests/tiny_checkpoints.py (real Chinese reviews), one per test module."""
    from tiny_checkpoints import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tok, tmp_path_factory):
    """(directory, model): a random tiny native checkpoint with `tok`, one per test module; the model is
    the one saved, for comparing what a loader or server makes of the directory."""
    from tiny_checkpoints import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), tok)
