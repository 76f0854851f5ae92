"""``finestream release`` (``dfine.train.release``): a training checkpoint becomes the shipped
file (EMA weights only, FP16), which loads strictly, runs at its training side and cannot be
mistaken for a resumable run. The EMA weights are the calibrated fixture's, the raw ones another
initialisation, so taking the wrong set shows. (Whether FP16 keeps a model's boxes within 0.5 px
is a property of the trained model: assets/MODEL_CARD.md measures it on the bundled one; random
weights give near-tied scores whose top-k selection any rounding reshuffles.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dfine
from dfine.checkpoint import CheckpointError, load_checkpoint
from dfine.model_info import read_model_info
from dfine.train.checkpointing import read_checkpoint, training_checkpoint
from dfine.train.release import release_checkpoint
from pipeline.cli import main

NAMES = [f"class{i}" for i in range(80)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, fixtures_dir: Path) -> Path:
    """A trainer checkpoint as ``Trainer`` writes it: raw weights, EMA, AdamW state, progress."""
    ema_state = torch.load(
        fixtures_dir / "dfine_n_calibrated/dfine_n_calibrated.pth", weights_only=True
    )["ema"]["module"]
    torch.manual_seed(1)
    model = dfine.build_model("n", num_classes=80)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # fills the moments: the release must drop them
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = training_checkpoint(
        model=model,
        ema_state={"module": ema_state, "updates": 123},
        optimizer=optimizer,
        lr_scheduler=schedule,
        lr_warmup_scheduler=schedule,
        scaler=None,
        last_epoch=4,
        class_names=NAMES,
        progress={"step": 500, "size": "n", "imgsz": 320},
    )
    path = tmp_path_factory.mktemp("run") / "best.pth"
    torch.save(checkpoint, path)
    return path


def test_release_keeps_the_ema_weights_in_fp16_and_drops_the_rest(
    trained: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model.pth"
    assert main(["release", str(trained), str(target)]) == 0
    assert target.stat().st_size < trained.stat().st_size / 4  # no optimizer, no raw copy, FP16

    released = torch.load(target, weights_only=True)
    source = torch.load(trained, weights_only=True)
    assert set(released) == {"date", "last_epoch", "model", "class_names", "finestream"}
    assert released["class_names"] == NAMES
    ema, raw, got = source["ema"]["module"], source["model"], released["model"]
    assert set(got) == set(ema)
    floating = [k for k, v in ema.items() if v.is_floating_point()]
    assert all(got[k].dtype == torch.float16 for k in floating)
    assert all(torch.equal(got[k], ema[k].half()) for k in floating)
    assert sum(not torch.equal(got[k], raw[k].half()) for k in floating) > len(floating) // 2

    model = dfine.build_model("n", num_classes=80)
    load_checkpoint(model, target)  # strict, through the key finestream and the official tools read
    weight = "backbone.stem.stem1.conv.weight"
    assert torch.equal(model.state_dict()[weight], ema[weight].half().float())


def test_released_file_runs_at_its_training_side_and_cannot_be_resumed(
    trained: Path, tmp_path: Path
) -> None:
    target = tmp_path / "model.pth"
    release_checkpoint(trained, target, fp16=True)
    info = read_model_info(target)
    assert (info.size, info.num_classes, info.trained_side) == ("n", 80, 320)
    assert info.class_names[:2] == ("class0", "class1")
    with pytest.raises(CheckpointError, match="not a finestream training checkpoint"):
        read_checkpoint(target)


def test_release_refuses_a_file_that_is_not_a_training_checkpoint(
    fixtures_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    official = fixtures_dir / "dfine_n_calibrated/dfine_n_calibrated.pth"
    assert main(["release", str(official), str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a finestream training checkpoint" in err
    assert not (tmp_path / "x.pth").exists()
