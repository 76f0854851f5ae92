"""``finestream train`` / ``eval`` at the command line: config and dataset errors, eval output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dfine.train.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("syn"), 6, num_classes=3, size=320, seed=1
    )


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("finestream: error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_unknown_config_key_is_refused_by_full_path(
    tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "t.yaml"
    config.write_text(
        "size: n\noptim:\n  param_groups:\n    - pattern: backbone\n      lr_backbone: 1.0e-4\n"
    )
    code = main(["train", str(config), "--data", str(synthetic), "--out", str(tmp_path / "run")])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "t.yaml: optim.param_groups[0].lr_backbone: unknown key" in line
    assert not (tmp_path / "run").exists()


def test_shipped_recipes_load() -> None:
    from pipeline.train_config import load_train_config

    repo = Path(__file__).resolve().parents[1]
    for size in "nsmlx":
        settings = load_train_config(repo / "configs" / f"train_{size}.yaml")
        assert settings.size == size
        assert settings.optim.clip_max_norm == 0.1 and settings.ema.decay == 0.9999


def test_dataset_error_exits_2_with_one_line_before_training(
    tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content = json.loads(synthetic.read_text())
    content["annotations"][0]["bbox"] = [300.0, 300.0, 80.0, 80.0]  # past the 320x320 image
    bad = synthetic.parent / "bad.json"
    bad.write_text(json.dumps(content))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(bad),
            "--size",
            "n",
            "--imgsz",
            "320",
            "--epochs",
            "1",
            "--batch",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "bad.json" in line
    assert not (out / "last.pth").exists() and not (out / "losses.csv").exists()


def test_bad_flag_value_exits_2(
    tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["train", "--data", str(synthetic), "--imgsz", "300", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "imgsz must be a multiple of 32" in _one_error_line(capsys.readouterr().err)
    code = main(["train", "--data", str(synthetic), "--resume", "--out", str(tmp_path / "none")])
    assert code == 2
    assert "last.pth does not exist" in _one_error_line(capsys.readouterr().err)


def test_eval_prints_the_table_and_writes_json(
    tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import dfine

    torch.manual_seed(0)
    model = dfine.build_model("n", num_classes=3)
    ckpt = tmp_path / "random.pth"
    torch.save({"model": model.state_dict(), "class_names": ["circle", "square", "triangle"]}, ckpt)
    out_json = tmp_path / "m.json"
    code = main(
        [
            "eval",
            "--model",
            str(ckpt),
            "--data",
            str(synthetic),
            "--all",
            "--imgsz",
            "320",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--json",
            str(out_json),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "AP50:95" in captured.out and "square" in captured.out
    result = json.loads(out_json.read_text())
    assert {"map50_95", "map50", "per_class"} <= set(result)
    assert set(result["per_class"]) == {"circle", "square", "triangle"}
    assert 0.0 <= result["map50_95"] <= result["map50"] <= 1.0
    assert result["images"] == 6
    assert sum(c["instances"] for c in result["per_class"].values()) == result["instances"]
