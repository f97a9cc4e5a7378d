"""`from_mapping`: the one door from a config slice to a typed object."""

from dataclasses import dataclass, field

import pytest

from llama_zh.config import ConfigError, from_mapping


@dataclass
class Inner:
    rank: int = 8


@dataclass
class Outer:
    lr: float
    inner: Inner = field(default_factory=Inner)
    tags: list = field(default_factory=list)


def test_builds_nested_dataclasses_and_keeps_defaults_in_one_place():
    built = from_mapping(Outer, {"lr": 0.1, "inner": {"rank": 4}}, "optim")
    assert built == Outer(lr=0.1, inner=Inner(rank=4))
    assert from_mapping(Outer, {"lr": 0.2}, "optim").inner == Inner()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lr": 0.1, "lrr": 1}, "optim.lrr: unknown key (did you mean optim.lr?)"),
        ({"lr": 0.1, "inner": {"rnak": 2}}, "optim.inner.rnak: unknown key (did you mean optim.inner.rank?)"),
        ({}, "optim.lr: missing (required)"),
    ],
)
def test_refuses_unknown_and_missing_keys_by_name(values, message):
    with pytest.raises(ConfigError) as caught:
        from_mapping(Outer, values, "optim")
    assert str(caught.value) == message
