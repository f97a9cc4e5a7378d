"""llama.cpp runs our GGUF exports of RoPE-scaled and tied models as llama_zh does: the logits of a
sequence longer than the original context agree position by position. llama-cpp-python is not in the
test extra (a ~30 minute source build): without it these tests are reported as skipped, never passed."""

import numpy as np
import pytest
import torch
from tiny_checkpoints import make_checkpoint

from llama_zh.convert import convert

SCALINGS = {
    "linear": {"type": "linear", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


@pytest.mark.parametrize("kind", [*SCALINGS, "tied"])
def test_llama_cpp_logits_equal_llama_zh_past_the_original_context(tok, kind, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: llama.cpp check not run")
    overrides = {"tie_word_embeddings": True} if kind == "tied" else {"rope_scaling": SCALINGS[kind]}
    ckpt, model = make_checkpoint(
        tmp_path / "ckpt", tok, sharpen=1.0, rope_theta=500000.0 if kind == "llama3" else 10000.0, **overrides
    )
    out = convert(ckpt, "native", tmp_path / "model", "gguf", gguf_type="f32")
    ids = torch.randint(3, tok.vocab_size, (100,), generator=torch.Generator().manual_seed(0)).tolist()  # > 32
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    # type_k/type_v 0 = GGML_TYPE_F32: an f16 cache alone would leave gaps of ~1e-4, near what an
    # unscaled rotation gives at these sizes (2e-3 to 4e-3)
    llm = llama_cpp.Llama(
        str(out), n_ctx=128, n_batch=128, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0
    )
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    gap = np.abs(theirs - ours).max(axis=-1)  # per position
    scale = np.abs(ours).max()
    assert gap.max() < 1e-5 * max(scale, 1.0), (
        f"max logit gap {gap.max():.2e} (at position {gap.argmax()}), scale {scale:.2f}"
    )
