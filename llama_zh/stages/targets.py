"""Config groups that are a constructor's arguments: a `_target_` (the class or function) and its keyword
arguments, instantiated here with `hydra.utils.instantiate`, the library below taking the built object.

Hydra would report a misspelt argument, an unknown target or a bad value as a multi-line traceback from
deep inside the constructor, and only when the object is built, which for the Trainer is after the model.
So each node is checked against its target's signature first, before anything heavy runs, and a mistake
is one line naming the group and the key (the closest argument, where one is close).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from llama_zh.config import ConfigError, check_keys
from llama_zh.errors import LlamaZhError

# The keys instantiate reads itself; every other key of a node is an argument of its target.
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")

# Keys that moved out of a group: the message names their new place.
MOVED = {
    "trainer.memory_gb": "hardware.memory_gb",
    "trainer.peak_tflops": "hardware.peak_tflops",
}


def _import_object(path: str) -> Any:
    """The object a dotted path names: the longest importable module prefix, then attributes. Hydra's
    own lookup logs a multi-line error before it raises; this one only raises, with one line."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            found = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name):
                continue  # this prefix is no module: try a shorter one
            raise ImportError(f"importing {module_name}: {e}") from None  # a module that fails inside
        for depth, attribute in enumerate(parts[cut:], start=cut):
            if not hasattr(found, attribute):
                raise ImportError(f"{'.'.join(parts[:depth])} has no attribute {attribute}")
            found = getattr(found, attribute)
        return found
    raise ImportError(f"no module named {parts[0]}")


def locate(values: Mapping[str, Any], where: str) -> Callable:
    """The callable a node's `_target_` names, refused in one line if there is none or it cannot be imported."""
    path = values.get("_target_")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}._target_: missing (the class or function this node's keys are the arguments of)")
    try:
        found = _import_object(path)
    except ImportError as e:
        raise ConfigError(f"{where}._target_={path}: cannot be imported ({e})") from None
    if not callable(found):
        raise ConfigError(f"{where}._target_={path}: not a class or function")
    return found


def _parameters(target: Callable) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters of `target` and whether it takes **kwargs (then any key is an argument)."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}, True  # a builtin without a signature: its own call is the only check
    keyword = {
        name: p
        for name, p in signature.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return keyword, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


def check_arguments(
    values: Mapping[str, Any],
    where: str,
    own: Iterable[str] = (),
    supplied: Iterable[str] = (),
    offered: Iterable[str] = (),
) -> Callable:
    """Refuse a node whose keys are not arguments of its `_target_` (and nested nodes with a `_target_`
    of their own), or that leaves a required argument unset. `own`: the node's keys that are not
    arguments (dropped before instantiating); `supplied`: the arguments llama_zh passes itself when it
    completes the object, which the node may not set (the library's value would win unseen); `offered`:
    the arguments llama_zh passes where the node does not set them."""
    target = locate(values, where)
    parameters, any_key = _parameters(target)
    supplied = set(supplied)
    arguments = {k: v for k, v in values.items() if k not in HYDRA_KEYS and k not in own}
    for key in arguments:
        if f"{where}.{key}" in MOVED:
            raise ConfigError(f"{where}.{key}: moved to {MOVED[f'{where}.{key}']} (the hardware= node)")
        if key in supplied:
            raise ConfigError(f"{where}.{key}: set by llama_zh itself when it builds {values['_target_']}; drop it")
    if not any_key:
        check_keys(arguments, list(parameters), where, what=f"argument of {values['_target_']}")
    missing = [
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty and name not in arguments and name not in supplied | set(offered)
    ]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: missing (a required argument of {values['_target_']})")
    for key, value in arguments.items():
        if isinstance(value, Mapping) and "_target_" in value:
            check_arguments(value, f"{where}.{key}")
    return target


def instantiate_node(
    node: Any,
    where: str,
    own: Iterable[str] = (),
    supplied: Iterable[str] = (),
    offered: Iterable[str] = (),
    **kwargs: Any,
) -> Any:
    """`hydra.utils.instantiate` of a config node (a DictConfig or plain mapping), checked first (see
    `check_arguments`); `own` keys are dropped, `kwargs` passed on (`_partial_=True`: a partial the
    library completes with the `supplied` and `offered` arguments). Containers reach the target as plain
    lists and dicts. A constructor that refuses a value fails in one line naming the group."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    given = {k for k in kwargs if k not in HYDRA_KEYS}
    check_arguments(values, where, own, supplied=set(supplied) | given, offered=offered)
    values = {k: v for k, v in values.items() if k not in set(own)}
    try:
        return instantiate(values, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, LlamaZhError):
            raise cause from None
        text = str(cause or e).strip().splitlines()
        raise ConfigError(
            f"{where} ({values['_target_']}): {type(cause or e).__name__}: {text[0] if text else ''}"
        ) from None
