"""Hugging Face `LlamaForCausalLM` directories: read (safetensors or .bin, sharded or not) and write.

HF uses the same RoPE layout as the native model, so tensors copy unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from llama_zh.checkpoint import DEFAULT_SHARD_BYTES, WeightStream, check_specs
from llama_zh.config import ROPE_SCALING, ConfigError, ModelConfig, check_rope_scaling
from llama_zh.convert.format import Format, WriteOptions
from llama_zh.convert.hf_tokenizer import SpecialPieces, bpe_tokenizer_files, build_hf_tokenizer
from llama_zh.convert.keys import KeyMap
from llama_zh.dtypes import dtype_name
from llama_zh.tensor_io import (
    CheckpointDir,
    CheckpointError,
    safetensors_files,
    safetensors_stream,
    stream_bytes,
    torch_load_weights,
    write_safetensors_shards,
)
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
LLAMA_SPECIAL = SpecialPieces(
    {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": None}, {"bos": 1, "eos": 2, "unk": 0, "pad": None}
)


def config_from_hf(config_file: Path) -> ModelConfig:
    try:
        hf = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not a readable JSON config ({e})") from e
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ConfigError(
            f"{config_file}: model_type {hf.get('model_type')!r} is not a LLaMA model (expected model_type 'llama')"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"{config_file}: {flag}=true is not a LLaMA architecture this converter supports")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{config_file}: hidden_act {hf['hidden_act']!r}, LLaMA uses 'silu'")
    try:
        theta, scaling, max_seq_len = rope_from_hf(hf, config_file)
        config = ModelConfig(
            name=hf.get("_name_or_path") or config_file.parent.name,
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            ffn_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_seq_len=max_seq_len,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ConfigError(f"{config_file}: missing field {e.args[0]}") from e
    if hf.get("head_dim") not in (None, config.head_dim):
        raise ConfigError(
            f"{config_file}: head_dim {hf['head_dim']} differs from hidden_size/num_attention_heads = {config.head_dim}"
        )
    return config


def rope_from_hf(hf: dict, config_file: Path) -> tuple[float, dict | None, int]:
    """(rope_theta, native rope_scaling, max_seq_len) of a config.json.

    transformers 5 writes `rope_parameters` (theta inside), earlier releases `rope_scaling` beside
    `rope_theta`; `type` is the older spelling of `rope_type`. Linear and dynamic scaling need no
    original length there: it is the top-level `original_max_position_embeddings` when given (our
    exports write it), else max_position_embeddings, which is what dynamic scaling grows from in
    transformers; the model's limit is then that length times the factor."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    max_positions = hf.get("max_position_embeddings", 2048)
    theta = float(rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0))
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{config_file}: partial_rotary_factor other than 1 is not a LLaMA architecture")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return theta, None, max_positions
    if kind not in ROPE_SCALING:
        raise ConfigError(f"{config_file}: rope scaling {kind!r} is not supported (known: {', '.join(ROPE_SCALING)})")
    rope.pop("type", None)
    rope["rope_type"] = kind
    stated = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if kind == "dynamic":  # transformers grows dynamic scaling from max_position_embeddings, whatever else is written
        rope["original_max_position_embeddings"] = max_positions
    elif rope.get("original_max_position_embeddings") is None:
        rope["original_max_position_embeddings"] = stated or max_positions
    scaling = check_rope_scaling(rope, where=f"{config_file}: rope_scaling")
    if kind == "dynamic" or (kind == "linear" and not stated):
        # max_position_embeddings is then the original length: the scaled model serves factor times more
        max_positions = max(max_positions, int(scaling["original_max_position_embeddings"] * scaling["factor"]))
    return theta, scaling, max_positions


def rope_to_hf(config: ModelConfig) -> tuple[dict, dict]:
    """(rope_parameters, top-level keys) of config.json for `config`'s RoPE.

    Dynamic scaling in transformers grows from max_position_embeddings, so that key holds the original
    length there. Linear and dynamic carry no original length in rope_parameters (transformers warns
    on keys it does not read): it goes top-level, where transformers keeps it unread."""
    params = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    top = {"max_position_embeddings": config.max_seq_len}
    scaling = config.rope_scaling
    if scaling is None:
        return params, top
    params["factor"] = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    top["original_max_position_embeddings"] = original
    if config.rope_type == "dynamic":
        top["max_position_embeddings"] = original
    if config.rope_type in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    for key, value in scaling.items():
        if key not in ("type", "factor", "original_max_position_embeddings") and value is not None:
            params[key] = value
    return params, top


def read(path: Path, tokenizer: Path | None = None) -> WeightStream:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)")
    config = config_from_hf(config_file)
    files = safetensors_files(path, "model")
    rename = _renamer(str(path), config)
    if files:
        specs, tensors = safetensors_stream(files, rename)
    else:
        specs, tensors = _bin_stream(path, rename)
    tok = Path(tokenizer) if tokenizer else find_tokenizer(path)
    stream = WeightStream(config, specs, tensors, tok if tok is not None and tok.is_file() else None, source=str(path))
    check_specs(stream)
    return stream


def _renamer(source: str, config: ModelConfig):
    """KEYS' renamer; a tied model's lm_head.weight, which some tied checkpoints still store (a copy
    of the embedding), is skipped: the head is the embedding."""
    rename = KEYS.renamer(source)
    if not config.tie_word_embeddings:
        return rename
    return lambda key: None if key == KEYS.to_outside("head.weight") else rename(key)


def _bin_stream(path: Path, rename):
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (path / "pytorch_model.bin").is_file():
        files = [path / "pytorch_model.bin"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors, pytorch_model.bin or their index json")
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
    rope, rope_top = rope_to_hf(config)
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
        **rope_top,
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters, older releases (and vLLM) rope_theta and rope_scaling: write all.
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"} if config.rope_scaling else None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def write(
    stream: WeightStream,
    path: Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    chat_template: str | None = None,
) -> Path:
    check_specs(stream)
    dtype = dtype_name(next(iter(stream.specs.values()))[0])
    files = metadata_files(
        stream, dtype, chat_template
    )  # a tokenizer that cannot be exported is refused before any weight is written
    target = CheckpointDir(path, overwrite, stream_bytes(stream.specs))
    with target:
        write_safetensors_shards(
            target.tmp,
            stream.specs,
            stream.tensors(),
            max_shard_bytes,
            rename=KEYS.to_outside,
            metadata={"format": "pt"},
        )
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
            raise CheckpointError(
                f"{stream.tokenizer}: {len(proto.pieces)} pieces, more than the model's vocab_size "
                f"{stream.config.vocab_size} (ids past it have no embedding row)"
            )
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


def tokenizer_files(
    model: Path, config: ModelConfig, special: SpecialPieces, chat_template: str | None = None
) -> dict[str, bytes]:
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


def is_hf(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def _read(path: Path, model: ModelConfig | None, tokenizer: Path | None) -> WeightStream:
    return read(path, tokenizer)  # config.json gives the shape: `model` is not read


def _write(stream: WeightStream, dst: Path, options: WriteOptions) -> Path:
    return write(
        stream,
        dst,
        max_shard_bytes=options.max_shard_bytes,
        overwrite=options.overwrite,
        chat_template=options.chat_template,
    )


FORMAT = Format("hf", "a directory with config.json (Hugging Face)", is_hf, _read, _write)
