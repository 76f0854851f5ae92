"""The shipped configs load, and configs/reference.yaml lists every key there is."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import AppConfig, CliOverrides, apply_overrides, load_config
from pipeline.schema import ConfigError, from_dict, to_dict
from stages.infer import Backend
from stages.sinks.mot import MotSinkConfig
from stages.sinks.rtsp_publish import RtspPublishConfig
from stages.sinks.zmq_events import ZmqSinkConfig
from tests.conftest import REPO

# train_*.yaml configure the trainer (pipeline/train_cli.py), not a run.
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("train_"))


def keys(tree: Any, prefix: str = "") -> set[str]:
    if isinstance(tree, dict):
        out = set()
        for k, v in tree.items():
            out.add(f"{prefix}{k}")
            out |= keys(v, f"{prefix}{k}.")
        return out
    if isinstance(tree, list):
        return set().union(*(keys(v, prefix) for v in tree)) if tree else set()
    return set()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    config = load_config(path)
    assert config.sources


def test_reference_lists_every_key_with_its_default() -> None:
    reference = load_config(REPO / "configs" / "reference.yaml")
    written = keys(yaml.safe_load((REPO / "configs" / "reference.yaml").read_text()))
    assert keys(to_dict(reference)) == written
    # Defaults, not examples: apart from the required paths and urls, every value is the default.
    defaults = AppConfig()
    assert reference.model == defaults.model
    assert reference.track == defaults.track
    assert reference.buffers == defaults.buffers


def test_unknown_key_names_file_and_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - file: {path: a.mp4, stream: x}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: sources\[0\].file.stream: unknown key"):
        load_config(bad)


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {size: n\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "not valid YAML" in str(info.value) and "\n" not in str(info.value)


def test_cli_overrides_replace_config_values() -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    changed = apply_overrides(
        config,
        CliOverrides(
            sources=("a.mp4", "rtsp://127.0.0.1:1/x"),
            backend="torch",
            imgsz=320,
            realtime=True,
            jsonl=Path("x.jsonl"),
        ),
    )
    assert [s.stream_id for s in changed.sources] == ["0", "1"]
    assert changed.sources[0].file is not None and changed.sources[0].file.realtime
    assert changed.sources[1].live is not None
    assert changed.model.backend is Backend.TORCH and changed.model.imgsz == 320
    assert changed.outputs.jsonl is not None and changed.outputs.jsonl.path == "x.jsonl"
    assert changed.outputs.video == config.outputs.video  # untouched


def test_bad_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="imgsz"):
        apply_overrides(AppConfig(), CliOverrides(imgsz=100))


def test_source_needs_exactly_one_kind() -> None:
    from pipeline.config import SourceConfig
    from pipeline.schema import from_dict

    with pytest.raises(ConfigError, match="exactly one"):
        from_dict(AppConfig, {"sources": [{}]})
    assert dataclasses.is_dataclass(SourceConfig)


def test_a_cli_flag_sets_one_key_and_keeps_the_rest_of_its_section() -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    assert config.outputs.video is not None and config.outputs.video.annotation.trail_length == 20
    video = dataclasses.replace(config.outputs.video, crf=30, preset="medium")
    zmq_config = from_dict(ZmqSinkConfig, {"endpoint": "tcp://127.0.0.1:1", "sndhwm": 7})
    rtsp_config = from_dict(RtspPublishConfig, {"url": "rtsp://127.0.0.1:1/a", "bitrate_kbps": 900})
    config = dataclasses.replace(
        config,
        outputs=dataclasses.replace(config.outputs, video=video, zmq=zmq_config, rtsp=rtsp_config),
    )
    changed = apply_overrides(
        config,
        CliOverrides(
            video=Path("x.mp4"),
            jsonl=Path("x.jsonl"),
            zmq="tcp://127.0.0.1:2",
            publish="rtsp://127.0.0.1:2/b",
        ),
    )
    out = changed.outputs
    assert out.video == dataclasses.replace(video, path="x.mp4")  # trail, crf, preset kept
    assert out.jsonl == dataclasses.replace(config.outputs.jsonl, path="x.jsonl")
    assert out.zmq == dataclasses.replace(zmq_config, endpoint="tcp://127.0.0.1:2")
    assert out.rtsp == dataclasses.replace(rtsp_config, url="rtsp://127.0.0.1:2/b")
    assert out.mot == config.outputs.mot
    # A section the config lacks is made with its defaults.
    bare = apply_overrides(AppConfig(), CliOverrides(mot=Path("t.txt")))
    assert bare.outputs.mot == MotSinkConfig(path="t.txt")


def test_a_url_with_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown URL scheme 'ftp'"):
        apply_overrides(AppConfig(), CliOverrides(sources=("ftp://cam/x",)))
    with pytest.raises(ConfigError, match="unknown URL scheme"):
        from_dict(AppConfig, {"sources": [{"live": {"url": "gopher://cam"}}]})
