"""Key maps between native and outside names, and the q/k row permutation between RoPE layouts.

A key map is a plain dict: native template -> outside template, `{i}` standing for the layer index.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from llama_zh.tensor_io import CheckpointError

NATIVE_KEYS = (
    "embed.weight",
    "layers.{i}.attn_norm.weight",
    "layers.{i}.attn.wq.weight",
    "layers.{i}.attn.wk.weight",
    "layers.{i}.attn.wv.weight",
    "layers.{i}.attn.wo.weight",
    "layers.{i}.ffn_norm.weight",
    "layers.{i}.ffn.w_gate.weight",
    "layers.{i}.ffn.w_up.weight",
    "layers.{i}.ffn.w_down.weight",
    "norm.weight",
    "head.weight",
)


class KeyMap:
    def __init__(self, templates: dict[str, str], ignore: tuple[str, ...] = ()):
        missing = set(NATIVE_KEYS) - set(templates)
        if missing:
            raise ValueError(f"key map lacks {sorted(missing)}")
        self.to_outside_templates = templates
        self._from_outside = [
            (re.compile("^" + re.escape(outside).replace(r"\{i\}", r"(\d+)") + "$"), native)
            for native, outside in templates.items()
        ]
        self._ignore = [re.compile(p) for p in ignore]

    def to_native(self, key: str) -> str | None:
        """Native name of an outside key; None for keys to ignore; KeyError for unknown keys."""
        for pattern, native in self._from_outside:
            m = pattern.match(key)
            if m:
                return native.replace("{i}", m.group(1)) if m.groups() else native
        if any(p.search(key) for p in self._ignore):
            return None
        raise KeyError(key)

    def to_outside(self, name: str) -> str:
        m = re.match(r"^layers\.(\d+)\.(.*)$", name)
        if m:
            return self.to_outside_templates["layers.{i}." + m.group(2)].replace("{i}", m.group(1))
        return self.to_outside_templates[name]

    def renamer(self, source: str) -> Callable[[str], str | None]:
        """`to_native` for the files of `source`; an unknown key is a CheckpointError naming it."""

        def rename(key: str) -> str | None:
            try:
                return self.to_native(key)
            except KeyError:
                raise CheckpointError(
                    f"{source}: unexpected tensor {key!r}, not part of a LLaMA model in this format"
                ) from None

        return rename


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from the interleaved RoPE layout (Meta, TencentPretrain) to the halves layout (native, HF).

    Per head, rows are pairs (0,1), (2,3), ...: view them as (D/2, 2) and transpose to (2, D/2), so
    the even rows come first, then the odd ones.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_permuter(n_heads: int, n_kv_heads: int, direction: Callable) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """A per-tensor transform that permutes q (n_heads) and k (n_kv_heads) rows, leaving the rest."""

    def transform(native_name: str, t: torch.Tensor) -> torch.Tensor:
        if native_name.endswith("attn.wq.weight"):
            return direction(t, n_heads)
        if native_name.endswith("attn.wk.weight"):
            return direction(t, n_kv_heads)
        return t

    return transform
