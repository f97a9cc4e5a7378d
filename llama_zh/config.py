"""The model's shape as a torch-free dataclass, and the named shapes of docs/reference.md#shapes.

The named shapes live in llama_zh/conf/model/<name>.yaml, one file each, so the Hydra group and the Python
API read the same data: `ModelConfig.from_name("llama_7b")` and `model=llama_7b` cannot disagree.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from llama_zh.errors import LlamaZhError

# Package data, so that a non-editable install composes the same groups as a checkout.
T = TypeVar("T")

CONF_DIR = Path(__file__).resolve().parent / "conf"


class ConfigError(LlamaZhError, ValueError):
    """A model configuration that cannot describe a LLaMA model."""


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int | None = None  # None: taken from the tokenizer when the model is built
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads = n_heads)
    ffn_dim: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # None: plain RoPE. Else a mapping with `type` (see ROPE_SCALING), `factor` and
    # `original_max_position_embeddings`, the context the weights were pretrained at.
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False  # the output head is the embedding matrix (Llama-3.2 1B/3B)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{field} must be a positive integer, got {value!r}")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size <= 0):
            raise ConfigError(f"model.vocab_size must be a positive integer or null, got {self.vocab_size!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head size {self.head_dim} must be even for rotary embeddings")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("model.norm_eps and model.rope_theta must be positive")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"model.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = check_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_params(self) -> int:
        """Parameter count (needs vocab_size)."""
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is unset: build the model with a tokenizer first")
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * self.dim * self.ffn_dim + 2 * self.dim
        return self.n_layers * block + (1 if self.tie_word_embeddings else 2) * self.vocab_size * self.dim + self.dim

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["type"] if self.rope_scaling else "default"

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        return dataclasses.replace(self, vocab_size=vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_name(cls, name: str) -> ModelConfig:
        path = CONF_DIR / "model" / f"{name}.yaml"
        if not path.is_file():
            names = ", ".join(available_names())
            raise ConfigError(f"unknown model name {name!r}; known: {names}")
        return from_mapping(cls, yaml.safe_load(path.read_text()), f"{path}: model", what="field")


# The keys each scaling type reads: required, then optional with their defaults (None: absent).
# The formulas are transformers' (docs/reference.md#rope-scaling), so that its checkpoints and ours agree.
_COMMON = ("type", "factor", "original_max_position_embeddings")
ROPE_SCALING: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "linear": (_COMMON, {}),
    "dynamic": (_COMMON, {}),
    "yarn": (
        _COMMON,
        {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "attention_factor": None,
            "mscale": None,
            "mscale_all_dim": None,
            "truncate": True,
        },
    ),
    "llama3": (_COMMON + ("low_freq_factor", "high_freq_factor"), {}),
}


def check_rope_scaling(values: Any, where: str = "model.rope_scaling") -> dict[str, Any]:
    """A rope scaling mapping checked and completed: `type` (`rope_type` accepted, as transformers
    writes it), every key its type needs, its optional keys defaulted, nothing it would ignore."""
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{where} must be a mapping with type, factor and original_max_position_embeddings, got {values!r}"
        )
    values = dict(values)
    if "rope_type" in values:
        kind = values.pop("rope_type")
        if values.setdefault("type", kind) != kind:
            raise ConfigError(f"{where}: type {values['type']!r} and rope_type {kind!r} disagree")
    kind = values.get("type")
    if kind not in ROPE_SCALING:
        raise ConfigError(f"{where}.type: unknown rope scaling {kind!r}; known: {', '.join(ROPE_SCALING)}")
    required, optional = ROPE_SCALING[kind]
    check_keys(values, list(required) + list(optional), where)
    for key in required:
        if values.get(key) is None:
            raise ConfigError(f"{where}.{key} is missing (needed by rope scaling type {kind!r})")
    for key, default in optional.items():
        if values.get(key) is None:
            values[key] = default
    for key, value in values.items():
        if key in ("type", "truncate") or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{where}.{key} must be a positive number, got {value!r}")
    if not isinstance(values["original_max_position_embeddings"], int):
        raise ConfigError(
            f"{where}.original_max_position_embeddings must be an integer, "
            f"got {values['original_max_position_embeddings']!r}"
        )
    if not isinstance(values.get("truncate", True), bool):
        raise ConfigError(f"{where}.truncate must be true or false, got {values['truncate']!r}")
    if kind == "llama3" and values["high_freq_factor"] <= values["low_freq_factor"]:
        raise ConfigError(
            f"{where}.high_freq_factor ({values['high_freq_factor']}) must exceed "
            f"low_freq_factor ({values['low_freq_factor']})"
        )
    return {key: values[key] for key in list(required) + list(optional)}


def available_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def from_mapping(
    cls: type[T],
    values: Mapping[str, Any] | None,
    where: str,
    error: type[Exception] = ConfigError,
    what: str = "key",
) -> T:
    """The dataclass `cls` from a config slice: a plain mapping, as a stage resolves its part of the
    Hydra config into.

    `where` names the mapping in messages, as the prefix of its keys (`<file>: model`); `what` is the
    word for a key there (a model shape's are "fields"). Every stage builds its typed objects through
    this one door, so an unknown key is refused the same way everywhere (named, with the closest
    field), a missing required field is named, and defaults live only in the dataclass. A field whose
    type is a dataclass (or an optional one) is built from its sub-mapping.
    """
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(values, list(fields), where, error, what=what)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        kind = _dataclass_of(hints.get(name))
        if kind is not None and isinstance(value, Mapping):
            value = from_mapping(kind, value, f"{where}.{name}", error, what)
        kwargs[name] = value
    missing = [
        n
        for n, f in fields.items()
        if f.init and n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise error(f"{where}.{missing[0]}: missing (required)")
    return cls(**kwargs)


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds: its type, or the one member of an optional (`X | None`) besides None."""
    if dataclasses.is_dataclass(hint):
        return hint
    members = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(members) == 1:
        return members[0] if dataclasses.is_dataclass(members[0]) else None
    return None


def check_keys(
    values: Mapping[str, Any],
    known: Iterable[str] | Mapping[str, Any],
    where: str,
    error: type[Exception] = ConfigError,
    what: str = "key",
    free: Iterable[str] = (),
) -> None:
    """Refuse a key its reader would silently ignore (a typo such as Hydra's `+stage.temprature=0.5`).

    `known` is a list of keys, or a mapping of defaults: where both the default and the given value
    are mappings, their keys are checked too, except under the dotted paths in `free` (whose children
    are the user's own names, e.g. data.sources). The message names the first unknown key, and the
    closest known one when there is one, which is what a typo needs.
    """
    free = set(free)
    for key, value in values.items():
        path = f"{where}.{key}"
        if key not in known:
            choices = sorted(str(k) for k in known)
            close = difflib.get_close_matches(str(key), choices, n=1)
            dotted = where.rsplit(": ", 1)[-1]  # a `<file>: model` prefix is not repeated in the hint
            hint = f"did you mean {dotted}.{close[0]}?" if close else f"expected one of {', '.join(choices)}"
            raise error(f"{path}: unknown {what} ({hint})")
        default = known[key] if isinstance(known, Mapping) else None
        if isinstance(default, Mapping) and isinstance(value, Mapping) and path not in free:
            check_keys(value, default, path, error, what, free)


def group_defaults(group: str, option: str) -> dict[str, Any] | None:
    """llama_zh/conf/<group>/<option>.yaml as plain data (interpolations left as strings); None if there is none."""
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return None
    values = yaml.safe_load(path.read_text())
    return values if isinstance(values, dict) else None
