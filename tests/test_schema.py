"""Config sections are dataclasses; loading refuses unknown keys and wrong types by full path."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.schema import ConfigError, from_dict, to_dict


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    threshold: float = 0.5
    color: Color = Color.RED

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    count: int = 1
    path: Path | None = None
    classes: tuple[int, ...] | None = None
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)


def test_round_trip_and_conversions() -> None:
    data = {
        "name": "cam",
        "count": 3,
        "path": "~/a.mp4",
        "classes": [0, 2],
        "inner": {"threshold": 1, "color": "blue"},
        "items": [{"color": "RED"}],
    }
    cfg = from_dict(Outer, data)
    assert cfg.inner == Inner(1.0, Color.BLUE)
    assert cfg.classes == (0, 2)
    assert cfg.path == Path("~/a.mp4").expanduser()
    assert cfg.items == [Inner(0.5, Color.RED)]
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_empty_section_gives_defaults() -> None:
    assert from_dict(Outer, None) == Outer()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cout": 1}, "cout: unknown key"),
        ({"inner": {"treshold": 0.1}}, "inner.treshold: unknown key"),
        ({"count": "3"}, "count: expected int, got str '3'"),
        ({"count": True}, "count: expected int, got bool"),
        ({"inner": {"color": "green"}}, "inner.color: expected one of 'red', 'blue'"),
        ({"classes": [0, "car"]}, "classes[1]: expected int"),
        ({"items": [{}, {"threshold": "high"}]}, "items[1].threshold: expected float"),
        ({"inner": {"threshold": 2}}, "inner: threshold must be in [0, 1], got 2.0"),
        ({"inner": [1, 2]}, "inner: expected a mapping, got list"),
    ],
)
def test_bad_values_name_their_key_path(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
