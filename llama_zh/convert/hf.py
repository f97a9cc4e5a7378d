"""Hugging Face `LlamaForCausalLM` directories: read (safetensors or .bin, sharded or not) and write.

HF uses the same RoPE layout as the native model, so tensors copy unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llama_zh.checkpoint import (
    DEFAULT_SHARD_BYTES, WeightStream, _AtomicDir, _safetensors_files, check_specs, safetensors_stream,
    stream_bytes, write_safetensors_shards,
)
from llama_zh.config import ConfigError, ModelConfig
from llama_zh.convert.keys import KeyMap
from llama_zh.tensor_io import CheckpointError, torch_load_weights

KEYS = KeyMap(
    {
        "embed.weight": "model.embed_tokens.weight",
        "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
        "layers.{i}.attn.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "layers.{i}.attn.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
        "layers.{i}.attn.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
        "layers.{i}.attn.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
        "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "layers.{i}.ffn.w_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
        "layers.{i}.ffn.w_up.weight": "model.layers.{i}.mlp.up_proj.weight",
        "layers.{i}.ffn.w_down.weight": "model.layers.{i}.mlp.down_proj.weight",
        "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight",
    },
    # Older checkpoints carry a non-parameter rotary buffer.
    ignore=(r"rotary_emb\.inv_freq$",),
)


def config_from_hf(config_file: Path) -> ModelConfig:
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not a readable JSON config ({e})") from e
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ConfigError(f"{config_file}: model_type {hf.get('model_type')!r} is not a LLaMA model (expected model_type 'llama')")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if hf.get(flag):
            raise ConfigError(f"{config_file}: {flag}=true is not a LLaMA architecture this converter supports")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{config_file}: hidden_act {hf['hidden_act']!r}, LLaMA uses 'silu'")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"{config_file}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    try:
        config = ModelConfig(
            name=hf.get("_name_or_path") or config_file.parent.name,
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            max_seq_len=hf.get("max_position_embeddings", 2048),
        )
    except KeyError as e:
        raise ConfigError(f"{config_file}: missing field {e.args[0]}") from e
    if hf.get("head_dim") not in (None, config.head_dim):
        raise ConfigError(f"{config_file}: head_dim {hf['head_dim']} differs from hidden_size/num_attention_heads = {config.head_dim}")
    return config


def read(path: Path, tokenizer: Path | None = None) -> WeightStream:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    config = config_from_hf(config_file)
    files = _safetensors_files(path, "model")
    if files:
        specs, tensors = safetensors_stream(files, KEYS.renamer(str(path)))
    else:
        specs, tensors = _bin_stream(path)
    tok = Path(tokenizer) if tokenizer else path / "tokenizer.model"
    stream = WeightStream(config, specs, tensors, tok if tok.is_file() else None, source=str(path))
    check_specs(stream)
    return stream


def _bin_stream(path: Path):
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or their index json")
    rename = KEYS.renamer(str(path))
    specs, owners = {}, []
    for f in files:
        state = torch_load_weights(f)  # memory-mapped: shapes without reading the data
        names = {}
        for key, t in state.items():
            name = rename(key)
            if name is not None:
                specs[name] = (t.dtype, tuple(t.shape))
                names[key] = name
        owners.append((f, names))
        del state

    def tensors():
        for f, names in owners:
            state = torch_load_weights(f)
            for key, name in names.items():
                yield name, state[key].clone()  # a private copy: the map is released with `state`
            del state

    return specs, tensors


def hf_config(config: ModelConfig, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters, older releases rope_theta: write both.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def write(stream: WeightStream, path: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> Path:
    check_specs(stream)
    dtype = str(next(iter(stream.specs.values()))[0]).removeprefix("torch.")
    target = _AtomicDir(path, overwrite, stream_bytes(stream.specs))
    with target:
        write_safetensors_shards(target.tmp, stream.specs, stream.tensors(), max_shard_bytes,
                                 rename=KEYS.to_outside, metadata={"format": "pt"})
        (target.tmp / "config.json").write_text(json.dumps(hf_config(stream.config, dtype), indent=2))
        generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
        (target.tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if stream.tokenizer is not None:
            shutil.copyfile(stream.tokenizer, target.tmp / "tokenizer.model")
            _write_tokenizer_config(target.tmp, stream.config)
        return target.commit()


def _write_tokenizer_config(directory: Path, config: ModelConfig) -> None:
    # bos/eos spelled out: an empty bos/eos here is a known breakage of a public TP->HF script.
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_seq_len,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
