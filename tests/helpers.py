"""Helpers shared by test files: the entry point in a subprocess, random transformers models.

Plain functions rather than conftest fixtures because module-scoped fixtures and other helper modules
(tiny_checkpoints.py) call them too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cli_env(data_dir: Path | str | None = None, env_extra: dict | None = None, env: dict | None = None) -> dict:
    """The environment of an entry-point run: `env` (default: this process's) offline and unbuffered, with
    built data under `data_dir` (LLAMA_ZH_DATA) where given, then `env_extra`."""
    out = dict(os.environ if env is None else env, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if data_dir is not None:
        out["LLAMA_ZH_DATA"] = str(data_dir)
    out.update(env_extra or {})
    return out


def cli_command(*overrides: str, run_dir: Path | str | None = None) -> list[str]:
    """`python -m llama_zh OVERRIDES [hydra.run.dir=RUN_DIR]` with this interpreter."""
    args = [sys.executable, "-m", "llama_zh", *overrides]
    if run_dir is not None:
        args.append(f"hydra.run.dir={run_dir}")
    return args


def llama_zh(
    *overrides: str,
    run_dir: Path | str | None = None,
    data_dir: Path | str | None = None,
    env_extra: dict | None = None,
    env: dict | None = None,
    check: bool = True,
    stdin: str | None = None,
    timeout: float = 900,
    cwd: Path | str = REPO,
) -> subprocess.CompletedProcess:
    """`python -m llama_zh` in a subprocess (from the repository root unless `cwd`, so that the package
    under test is the one imported). With `check`, a non-zero exit fails the test with the command and the
    end of its stderr; without, the caller asserts on the returned process."""
    args = cli_command(*overrides, run_dir=run_dir)
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=cli_env(data_dir, env_extra, env),
        timeout=timeout,
        cwd=cwd,
        input=stdin,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def random_hf_llama(
    path: Path,
    *,
    rope_parameters: dict | None = None,
    max_positions: int = 256,
    tied: bool = False,
    vocab_size: int = 300,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    eps: float = 1e-5,
    seed: int = 0,
    random_norms: bool = True,
    safe_serialization: bool = True,
    max_shard_size: str | None = None,
) -> tuple:
    """A seeded random transformers LlamaForCausalLM (by default 64 wide, 2 layers, 4 heads over 2 KV heads,
    rope theta 10000) saved to `path` (safetensors or .bin, sharded at `max_shard_size`); returns (model,
    path). The norm weights are drawn from [0.5, 1.5] rather than left at 1 (`random_norms`), so that a
    dropped or misplaced norm changes the logits a parity test compares."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        rms_norm_eps=eps,
        max_position_embeddings=max_positions,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if random_norms:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.uniform_(0.5, 1.5)
    options = {"safe_serialization": safe_serialization}
    if max_shard_size:
        options["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **options)
    return model, path


def to_meta_interleaved(w, n_heads):
    """HF's q/k row order back to Meta's: per head, (2, head_dim/2) rows to (head_dim/2, 2)
    (docs/reference.md#formats)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, in_dim).permute(0, 2, 1, 3).reshape(out_dim, in_dim)


def meta_state_dict(hf_model) -> dict:
    """A transformers Llama's weights under Meta's keys, q/k rows interleaved."""
    cfg, sd = hf_model.config, hf_model.state_dict()
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    full = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        full |= {
            f"layers.{i}.attention.wq.weight": to_meta_interleaved(sd[p + "self_attn.q_proj.weight"], heads),
            f"layers.{i}.attention.wk.weight": to_meta_interleaved(sd[p + "self_attn.k_proj.weight"], kv),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }
    return full


def write_meta_llama3(directory, hf_model, params_extra, drop_output=False):
    """A Meta Llama-3 style release (one shard, interleaved q/k rows) from a transformers model."""
    cfg = hf_model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    full = meta_state_dict(hf_model)
    if drop_output:
        del full["output.weight"]
    directory.mkdir(parents=True)
    torch.save({k: v.clone() for k, v in full.items()}, directory / "consolidated.00.pth")
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": heads,
        "n_kv_heads": kv,
        "vocab_size": cfg.vocab_size,
        "multiple_of": 32,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": 500000.0,
        **params_extra,
    }
    (directory / "params.json").write_text(json.dumps(params))
