"""PEFT LoRA adapters: export a `finetune=lora` checkpoint's adapter for peft, merge a peft adapter on import.

A PEFT adapter directory holds adapter_config.json and adapter_model.safetensors (older releases, such
as Chinese-LLaMA-Alpaca's, adapter_model.bin), its tensors named after the Hugging Face modules under
`base_model.model.`: `<module>.lora_A.weight` (r, in), `<module>.lora_B.weight` (out, r), and the whole
weights of the `modules_to_save` (`model.embed_tokens.weight`, `lm_head.weight`, with an extended
vocabulary more rows than the base has). The merged weight is W + scale * B A, scale = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora).

No q/k row permutation: the native model and Hugging Face share the halves RoPE layout (see hf.py),
so B's rows are already in the order of the HF weight's rows.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_zh.checkpoint import CONFIG_FILE, DEFAULT_SHARD_BYTES, WeightStream, expected_specs, read_native
from llama_zh.config import ModelConfig
from llama_zh.convert import hf
from llama_zh.convert.format import Format
from llama_zh.dtypes import SAFETENSORS_DTYPES
from llama_zh.errors import LlamaZhError
from llama_zh.model import build_model
from llama_zh.tensor_io import CheckpointDir, iter_safetensors, safetensors_header, torch_load_weights
from llama_zh.tokenizer import copy_tokenizer, find_tokenizer

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."  # PeftModel -> LlamaForCausalLM
LORA_SUFFIXES = {".lora_A.weight": "a", ".lora_B.weight": "b"}
# The HF module names a LoRA may target here (embeddings take another kind of LoRA, not merged here).
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# peft matches modules_to_save by name suffix: a bare "norm" would also take every layer's
# input_layernorm and post_attention_layernorm.
HF_SAVED = {"embed": "embed_tokens", "head": "lm_head", "norm": "model.norm"}
VOCAB_TENSORS = ("embed.weight", "head.weight")


class PeftError(LlamaZhError, ValueError):
    pass


def _hf_module(native_module: str) -> str:
    """`layers.0.attn.wq` -> `model.layers.0.self_attn.q_proj`."""
    return hf.KEYS.to_outside(native_module + ".weight").removesuffix(".weight")


def _native_weight(hf_key: str) -> str | None:
    """Native weight name of an HF weight key, None if it is none of the model's."""
    try:
        return hf.KEYS.to_native(hf_key)
    except KeyError:
        return None


# ---------------------------------------------------------------------------------------------- export


def peft_config(rank: int, alpha: float, target_modules: list[str], modules_to_save: list[str]) -> dict:
    """adapter_config.json with the field names peft writes; the fields left out take peft's defaults."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "revision": None,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": 0.0,  # inference only: the run's dropout does not change the weights
        "target_modules": target_modules,
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _peft_key(name: str) -> str:
    """Our adapter tensor name -> peft's (`layers.0.attn.wq.lora_a` -> `...self_attn.q_proj.lora_A.weight`)."""
    module, _, leaf = name.rpartition(".")
    if leaf in ("lora_a", "lora_b"):
        return f"{PREFIX}{_hf_module(module)}.lora_{leaf[-1].upper()}.weight"
    return PREFIX + hf.KEYS.to_outside(name)


def export(src: Path, dst: Path, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """The adapter of the `finetune=lora` checkpoint `src` as a PEFT adapter directory `dst`, for the
    base model exported to Hugging Face (stage=convert dst_format=hf)."""
    from safetensors.torch import save_file

    from llama_zh.train.finetune import HF_ALIASES, read_adapter  # the training stack: not loaded for detection

    src = Path(src)
    stream = read_native(src)
    if not (src / "adapter_config.json").is_file() or not (src / "adapter.safetensors").is_file():
        raise PeftError(
            f"stage.src: {src} has no adapter.safetensors + adapter_config.json "
            f"(dst_format=peft exports the adapter of a finetune=lora checkpoint)"
        )
    ft, state = read_adapter(src, build_model(stream.config, device="meta"))
    both = sorted(set(ft.target_modules) & set(ft.modules_to_save))
    if both:
        raise PeftError(
            f"{src / 'adapter_config.json'}: {both[0]} is both a LoRA target and in modules_to_save, "
            f"which peft cannot load as trained"
        )
    tensors = {}
    for name, t in state.items():
        t = t.to(dtype) if dtype is not None else t
        tensors[_peft_key(name)] = t.contiguous()
    hf_names = {native: name for name, native in HF_ALIASES.items()}
    config = peft_config(
        ft.rank, ft.alpha, [hf_names[m] for m in ft.target_modules], [HF_SAVED[m] for m in ft.modules_to_save]
    )
    target = CheckpointDir(dst, overwrite, sum(t.numel() * t.element_size() for t in tensors.values()))
    with target:
        save_file(tensors, str(target.tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        (target.tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
        if stream.tokenizer is not None:  # the run's vocabulary, which its embed/head rows follow
            copy_tokenizer(stream.tokenizer, target.tmp)
        return target.commit()


# ---------------------------------------------------------------------------------------------- import


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter, its tensors read one at a time when the merge reaches them."""

    directory: Path
    file: Path
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]  # key in the file -> (dtype, shape)
    rank: int
    scale: float
    lora: dict[str, tuple[str, str]]  # native weight name -> (A key, B key)
    saved: dict[str, str]  # native weight name -> key of the whole weight (modules_to_save)
    _bin_state: dict | None = None

    def tensor(self, key: str) -> torch.Tensor:
        if self._bin_state is not None:
            return self._bin_state[key]
        return next(iter_safetensors(self.file, [key]))[1]


def _config_refusal(config: dict) -> str | None:
    """Why an adapter_config.json describes an adapter that cannot be merged here, or None."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return f"peft_type {peft_type!r}; only LORA adapters can be merged"
    if config.get("use_dora"):
        return "use_dora=true (DoRA rescales each merged weight by a learned magnitude, not merged here)"
    if config.get("bias", "none") != "none":
        return f"bias {config['bias']!r}; only bias 'none' can be merged (a LLaMA model has no biases)"
    if config.get("lora_bias"):
        return "lora_bias=true (LoRA B with a bias) cannot be merged into a model without biases"
    if config.get("fan_in_fan_out"):
        return "fan_in_fan_out=true (transposed weights, a GPT-2 convention) is not a LLaMA adapter"
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            return f"{field} {config[field]!r}: per-module ranks or alphas are not supported"
    for field in ("target_parameters", "trainable_token_indices", "layer_replication"):
        if config.get(field):
            return f"{field} is set: not supported"
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        return f"r {r!r}: expected a positive integer"
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        return f"lora_alpha {alpha!r}: expected a positive number"
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if not isinstance(t, str) or t.rpartition(".")[2] not in HF_TARGETS]
        if unknown:
            return f"target_modules {unknown[0]!r} cannot be merged here; supported: {', '.join(HF_TARGETS)}"
    elif not isinstance(targets, str):  # a regex or "all-linear": the tensors say which modules it took
        return f"target_modules {targets!r}: expected a list of module names or a pattern"
    return None


def read_peft(directory: Path) -> PeftAdapter:
    """The adapter in `directory`, its config and tensor names checked (shapes against the base: `merge`)."""
    from llama_zh.train.finetune import PROJECTIONS  # the training stack: not loaded for detection

    directory = Path(directory)
    config_file = directory / PEFT_CONFIG
    if not config_file.is_file():
        raise PeftError(f"stage.adapter: {directory} has no {PEFT_CONFIG} (not a PEFT adapter directory)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise PeftError(f"{config_file}: not a readable JSON config ({e})") from None
    if not isinstance(config, dict):
        raise PeftError(f"{config_file}: expected a JSON object")
    refusal = _config_refusal(config)
    if refusal:
        raise PeftError(f"{config_file}: {refusal}")
    rank, alpha = config["r"], float(config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    bin_state = None
    if (directory / PEFT_WEIGHTS).is_file():
        file = directory / PEFT_WEIGHTS
        header, _ = safetensors_header(file)
        specs = {k: (SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"])) for k, e in header.items()}
    elif (directory / PEFT_WEIGHTS_BIN).is_file():
        file = directory / PEFT_WEIGHTS_BIN
        bin_state = torch_load_weights(file)  # memory-mapped: each tensor is read when the merge uses it
        specs = {k: (t.dtype, tuple(t.shape)) for k, t in bin_state.items()}
    else:
        raise PeftError(f"stage.adapter: {directory} has neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN}")

    pairs: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    for key in specs:
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if not key.startswith(PREFIX):
            raise PeftError(f"{file}: tensor {key!r} is not a PEFT model's (no {PREFIX!r} prefix)")
        if suffix is not None:
            module = name.removesuffix(suffix)
            weight = _native_weight(module + ".weight")
            if weight is None or not (weight == "head.weight" or weight.split(".")[-2] in PROJECTIONS):
                raise PeftError(
                    f"{file}: LoRA tensor {key!r} targets {module}, which cannot be merged here; "
                    f"supported: {', '.join(HF_TARGETS)}"
                )
            pairs.setdefault(weight, {})[LORA_SUFFIXES[suffix]] = key
        else:
            weight = _native_weight(name)
            if weight is None:
                kind = "DoRA magnitude" if "lora_magnitude_vector" in name else "tensor"
                raise PeftError(f"{file}: {kind} {key!r} is no weight of a LLaMA model this merge knows")
            if weight in saved:
                raise PeftError(f"{file}: tensors {saved[weight]!r} and {key!r} both give {weight}")
            saved[weight] = key
    lora = {}
    for weight, ab in pairs.items():
        if set(ab) != {"a", "b"}:
            have = next(iter(ab.values()))
            raise PeftError(f"{file}: {have!r} has no lora_{'B' if 'a' in ab else 'A'} partner")
        if weight in saved:
            raise PeftError(f"{file}: {saved[weight]!r} is both LoRA-adapted and saved whole; cannot merge both")
        lora[weight] = (ab["a"], ab["b"])
    if not lora and not saved:
        raise PeftError(f"{file}: no LoRA or modules_to_save tensors")
    return PeftAdapter(directory, file, specs, rank, scale, lora, saved, bin_state)


def _merged_shapes(adapter: PeftAdapter, base: WeightStream) -> tuple[ModelConfig, dict[str, tuple[int, ...]]]:
    """(config, shapes) of the merged model; every adapter tensor checked against the base, naming it."""
    config, shapes = base.config, {n: s for n, (_, s) in base.specs.items()}
    for weight, (a_key, _) in adapter.lora.items():
        if weight not in shapes:
            raise PeftError(f"{adapter.file}: {a_key} adapts {weight}, which the base {base.source} does not have")
    # In the model's order (files may sort mlp before self_attn): the first mismatch named is the first layer's.
    for weight in (n for n in expected_specs(config) if n in adapter.lora):
        (a_key, b_key), (out_features, in_features) = adapter.lora[weight], shapes[weight]
        for key, expected in ((a_key, (adapter.rank, in_features)), (b_key, (out_features, adapter.rank))):
            got = adapter.specs[key][1]
            if got != expected:
                raise PeftError(
                    f"{adapter.file}: {key} has shape {got}; the base's {weight} {shapes[weight]} with "
                    f"r={adapter.rank} needs {expected} (an adapter of another model?)"
                )
    vocab = {}
    for weight, key in adapter.saved.items():
        if weight not in shapes:
            raise PeftError(f"{adapter.file}: {key} gives {weight}, which the base {base.source} does not have")
        got, expected = adapter.specs[key][1], shapes[weight]
        if weight in VOCAB_TENSORS and len(got) == 2 and got[1] == expected[1]:
            vocab[weight] = got[0]  # modules_to_save embed/head may extend the vocabulary
        elif got != expected:
            raise PeftError(f"{adapter.file}: {key} has shape {got}, the base's {weight} is {expected}")
    rows = set(vocab.values())
    if len(rows) > 1:
        raise PeftError(
            f"{adapter.file}: embed_tokens has {vocab['embed.weight']} rows, lm_head {vocab['head.weight']}"
        )
    if rows and (new := rows.pop()) != config.vocab_size:
        for weight in VOCAB_TENSORS:
            if weight not in vocab:
                module = _hf_module(weight.removesuffix(".weight"))
                raise PeftError(
                    f"{adapter.file}: a vocabulary of {new} rows, the base has {config.vocab_size}, and "
                    f"{module} is not in modules_to_save to give the rest"
                )
        config = config.with_vocab(new)
        for weight in VOCAB_TENSORS:
            shapes[weight] = (new, shapes[weight][1])
    return config, shapes


def merge(base: WeightStream, directory: Path, tokenizer: Path | None = None) -> WeightStream:
    """`base` with the PEFT adapter in `directory` merged in, as peft's merge_and_unload would, one tensor
    at a time. The tokenizer: `tokenizer`, else the adapter's tokenizer.model, else the base's (refused
    when the adapter changes the vocabulary and brings none)."""
    adapter = read_peft(directory)
    config, shapes = _merged_shapes(adapter, base)
    if tokenizer is None:
        tokenizer = find_tokenizer(adapter.directory)
    if tokenizer is None:
        if config.vocab_size != base.config.vocab_size:
            raise PeftError(
                f"{adapter.directory}: the adapter extends the vocabulary to {config.vocab_size} "
                f"and has no tokenizer.model: pass its tokenizer as stage.tokenizer"
            )
        tokenizer = base.tokenizer
    specs = {n: (dtype, shapes[n]) for n, (dtype, _) in base.specs.items()}

    def tensors():
        for name, t in base.tensors():
            if name in adapter.saved:
                t = adapter.tensor(adapter.saved[name]).to(specs[name][0])
            elif name in adapter.lora:
                a_key, b_key = adapter.lora[name]
                delta = adapter.tensor(b_key).float() @ adapter.tensor(a_key).float()
                t = (t.float() + adapter.scale * delta).to(t.dtype)
                del delta
            yield name, t
            del t  # before the next read: one tensor alive at a time

    log.info(
        "merging %s: %d LoRA weights (r=%d, scale %g), %d whole weights",
        adapter.directory,
        len(adapter.lora),
        adapter.rank,
        adapter.scale,
        len(adapter.saved),
    )
    return WeightStream(
        config, specs, tensors, tokenizer, source=f"{base.source} + {adapter.directory}", notes=base.notes
    )


def convert_merged(
    src: Path,
    src_format: str,
    adapter: Path,
    dst: Path,
    dst_format: str,
    model: ModelConfig | None = None,
    tokenizer: Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """stage=convert with stage.adapter: read the base, merge the adapter, write any destination format."""
    from llama_zh.convert.registry import destination, read, write  # the registry holds this module's FORMAT

    destination(dst_format)  # an unknown destination is refused before the base is read
    stream = merge(read(src, src_format, model, tokenizer), adapter, tokenizer).cast(dtype)
    return write(stream, dst, dst_format, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def is_peft(path: Path) -> bool:
    """A PEFT adapter directory; a finetune=lora native checkpoint, which also has adapter_config.json, is native."""
    path = Path(path)
    return (path / PEFT_CONFIG).is_file() and not (path / CONFIG_FILE).is_file()


# An adapter is no model on its own: it is merged into a base (stage.adapter) or exported from a
# finetune=lora native checkpoint (dst_format=peft, export), neither of which is a stream reader or writer.
FORMAT = Format(
    "peft",
    f"a directory with {PEFT_CONFIG} (a PEFT adapter)",
    is_peft,
    unreadable="a PEFT adapter, not a whole model: merge it into its base with stage=convert stage.adapter=<dir>",
)
