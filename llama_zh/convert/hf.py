"""Hugging Face `LlamaForCausalLM` directories: read (safetensors or .bin, sharded or not) and write.

HF uses the same RoPE layout as the native model, so tensors copy unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from llama_zh.checkpoint import (
    DEFAULT_SHARD_BYTES, WeightStream, _AtomicDir, _safetensors_files, check_specs, safetensors_stream,
    stream_bytes, write_safetensors_shards,
)
from llama_zh.config import ConfigError, ModelConfig
from llama_zh.convert.hf_tokenizer import SpecialPieces, bpe_tokenizer_files, build_hf_tokenizer
from llama_zh.convert.keys import KeyMap
from llama_zh.tensor_io import CheckpointError, torch_load_weights
from llama_zh.tokenizer import find_tokenizer, tokenizer_kind
from llama_zh.vocab import load_model_proto

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

# LLaMA's special pieces, for an export without a tokenizer to read them from.
LLAMA_SPECIAL = SpecialPieces({"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None},
                              {"bos": 1, "eos": 2, "unk": 0, "pad": None})


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
    tok = Path(tokenizer) if tokenizer else find_tokenizer(path)
    stream = WeightStream(config, specs, tensors, tok if tok is not None and tok.is_file() else None, source=str(path))
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


def hf_config(config: ModelConfig, dtype: str, special: SpecialPieces | None = None) -> dict:
    """config.json; the special ids are the tokenizer's (LLaMA's bos 1, eos 2, no pad without one)."""
    ids = (special or LLAMA_SPECIAL).ids
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
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def write(stream: WeightStream, path: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
          chat_template: str | None = None) -> Path:
    check_specs(stream)
    dtype = str(next(iter(stream.specs.values()))[0]).removeprefix("torch.")
    files = metadata_files(stream, dtype, chat_template)  # a tokenizer that cannot be exported is refused before any weight is written
    target = _AtomicDir(path, overwrite, stream_bytes(stream.specs))
    with target:
        write_safetensors_shards(target.tmp, stream.specs, stream.tensors(), max_shard_bytes,
                                 rename=KEYS.to_outside, metadata={"format": "pt"})
        for name, data in files.items():
            (target.tmp / name).write_bytes(data)
        return target.commit()


def metadata_files(stream: WeightStream, dtype: str, chat_template: str | None = None) -> dict[str, bytes]:
    """Every file of the export but the weights: configs, and with a tokenizer its four files."""
    files, special, stop_ids = {}, None, []
    if stream.tokenizer is not None and tokenizer_kind(stream.tokenizer) == "bpe":
        bpe_files, special, stop_ids = bpe_tokenizer_files(stream.tokenizer, stream.config, chat_template)
        files |= bpe_files
    elif stream.tokenizer is not None:
        proto = load_model_proto(stream.tokenizer)
        if len(proto.pieces) > stream.config.vocab_size:
            raise CheckpointError(f"{stream.tokenizer}: {len(proto.pieces)} pieces, more than the model's vocab_size "
                                  f"{stream.config.vocab_size} (ids past it have no embedding row)")
        special = SpecialPieces.from_proto(proto, stream.tokenizer)
        files |= tokenizer_files(stream.tokenizer, stream.config, special, chat_template)
    ids = (special or LLAMA_SPECIAL).ids
    # A chat model ends its turn with eot (Llama-3's <|eot_id|>): generation stops at either.
    eos = stop_ids if len(stop_ids) > 1 else ids["eos"]
    generation = {"bos_token_id": ids["bos"], "eos_token_id": eos, "do_sample": False}
    if ids["pad"] is not None:
        generation["pad_token_id"] = ids["pad"]
    files["config.json"] = _json(hf_config(stream.config, dtype, special))
    files["generation_config.json"] = _json(generation)
    return files


def tokenizer_files(model: Path, config: ModelConfig, special: SpecialPieces,
                    chat_template: str | None = None) -> dict[str, bytes]:
    """tokenizer.model as it is, the tokenizer.json that reproduces it, and the files naming its special pieces.

    tokenizer_class PreTrainedTokenizerFast: transformers (4 and 5) then runs tokenizer.json as
    written. Under LlamaTokenizer, transformers 5 keeps only its vocabulary and merges and rebuilds
    the Metaspace pipeline that drops a `▁` from text starting with a space. `legacy` and
    `add_prefix_space`, the Llama classes' switches for that pipeline, are not written.
    """
    add_bos = special.ids["bos"] is not None
    named = {f"{kind}_token": special.pieces[kind] for kind in ("bos", "eos", "unk", "pad")}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # bos/eos spelled out: an empty bos/eos here is a known breakage of a public TP->HF script.
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_seq_len,
    }
    if chat_template:
        # where transformers' `apply_chat_template` reads it
        tokenizer_config["chat_template"] = chat_template
    return {
        "tokenizer.model": Path(model).read_bytes(),
        "tokenizer.json": build_hf_tokenizer(model, add_bos=add_bos).to_str(pretty=True).encode("utf-8"),
        "tokenizer_config.json": _json(tokenizer_config),
        "special_tokens_map.json": _json({k: v for k, v in named.items() if v is not None}),
    }


def _json(value: dict) -> bytes:
    return json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8")
