"""Real training runs, kept tiny (D-FINE-N at 256 — 320 feature cells, above the 300 queries —
batch 1, a few steps): resume after SIGKILL
and after Ctrl-C continues the loss curve exactly; a NaN stops the run naming the step, the
term and the last good checkpoint."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

CONFIG = """\
size: n
epochs: 2
max_steps: 4
device: cpu
val_every: 0
data: {imgsz: 256, batch: 1, workers: 1, val_fraction: 0.25}
optim: {lr: 2.0e-4, warmup_steps: 2}
ema: {warmups: 10}
checkpoint: {every_steps: 1, every_s: 0}
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dfine.train.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(
        tmp_path_factory.mktemp("syn4"), 4, num_classes=3, size=256, seed=3
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(CONFIG)
    return path


def _train(config: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "train",
            str(config),
            "--data",
            str(data),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C sees it
    )


def _losses(out: Path) -> list[dict[str, str]]:
    path = out / "losses.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _wait_for_step(
    proc: subprocess.Popen[bytes], out: Path, steps: int, timeout_s: float = 240
) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if len(_losses(out)) >= steps and (out / "last.pth").exists():
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
            )
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no training step within the timeout")


def _finish(proc: subprocess.Popen[bytes], timeout_s: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout_s)
    return proc.returncode, err.decode()


@pytest.mark.slow
def test_resume_after_sigkill_and_sigint_continues_the_loss_curve(
    tmp_path: Path, dataset: Path, config: Path
) -> None:
    import dfine

    whole = tmp_path / "whole"
    code, err = _finish(_train(config, dataset, whole))
    assert code == 0, err
    reference = _losses(whole)
    assert [int(r["step"]) for r in reference] == [1, 2, 3, 4]
    assert [int(r["epoch"]) for r in reference] == [0, 0, 0, 1]  # 3 images per epoch, then epoch 2

    broken = tmp_path / "broken"
    proc = _train(config, dataset, broken)
    _wait_for_step(proc, broken, 1)
    proc.send_signal(signal.SIGKILL)  # mid-epoch: no chance to save anything
    proc.wait(timeout=30)
    killed_at = int(torch.load(broken / "last.pth", weights_only=True)["finestream"]["step"])
    assert 1 <= killed_at < 4

    proc = _train(config, dataset, broken, "--resume")
    _wait_for_step(proc, broken, killed_at + 1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C (trainer and loader workers): save, exit 130
    code, err = _finish(proc)
    if code == 0:  # the run reached its last step before the signal landed
        assert int(torch.load(broken / "last.pth", weights_only=True)["finestream"]["step"]) == 4
    else:
        assert code == 130, err
        assert "continue with --resume" in err
        code, err = _finish(_train(config, dataset, broken, "--resume"))
        assert code == 0, err

    resumed = _losses(broken)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for a, b in zip(reference, resumed):
        for key in a:
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), (
                a["step"],
                key,
            )

    ckpt = torch.load(broken / "last.pth", weights_only=True)
    assert ckpt["class_names"] == ["circle", "square", "triangle"]
    assert ckpt["finestream"]["step"] == 4 and ckpt["ema"]["updates"] == 4
    assert {
        "model",
        "ema",
        "optimizer",
        "lr_scheduler",
        "lr_warmup_scheduler",
        "last_epoch",
    } <= set(ckpt)
    model = dfine.build_model("n", num_classes=3)
    dfine.load_checkpoint(model, broken / "last.pth")  # strict
    whole_ema = torch.load(whole / "last.pth", weights_only=True)["ema"]["module"]
    for key, value in ckpt["ema"]["module"].items():
        torch.testing.assert_close(value, whole_ema[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_with_step_term_and_last_good_checkpoint(
    tmp_path: Path, dataset: Path
) -> None:
    from dfine.train.datasets import load_dataset
    from dfine.train.settings import CheckpointSettings, DataSettings, TrainSettings
    from dfine.train.trainer import NonFiniteLossError, Trainer

    settings = TrainSettings(
        size="n",
        epochs=1,
        max_steps=2,
        device="cpu",
        val_every=0,
        out=tmp_path / "run",
        data=DataSettings(imgsz=256, batch=1, workers=0),
        checkpoint=CheckpointSettings(every_steps=1, every_s=0),
    )

    def poison(step: int, model: torch.nn.Module) -> None:
        if step == 1:  # after step 1 (and its checkpoint), the class head goes bad
            with torch.no_grad():
                model.decoder.enc_score_head.bias.fill_(float("nan"))

    trainer = Trainer(settings, load_dataset(dataset, val_fraction=0.25), on_step=poison)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("step 2: non-finite loss in loss_")
    assert str(tmp_path / "run" / "last.pth") in message
    good = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert good["finestream"]["step"] == 1
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_gradient_accumulation_takes_one_step_per_k_batches(tmp_path: Path, dataset: Path) -> None:
    from dfine.train.datasets import load_dataset
    from dfine.train.settings import CheckpointSettings, DataSettings, OptimSettings, TrainSettings
    from dfine.train.trainer import Trainer

    settings = TrainSettings(
        size="n",
        epochs=1,
        max_steps=1,
        device="cpu",
        val_every=0,
        out=tmp_path / "run",
        num_denoising=0,
        data=DataSettings(imgsz=256, batch=1, workers=0),
        optim=OptimSettings(accumulate=2),
        checkpoint=CheckpointSettings(every_steps=0, every_s=0),
    )
    result = Trainer(settings, load_dataset(dataset, val_fraction=0.25)).fit()
    assert result.steps == 1
    ckpt = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert ckpt["finestream"]["batch_in_epoch"] == 2  # two batches went into the one step
    assert all(int(s["step"]) == 1 for s in ckpt["optimizer"]["state"].values())
    assert len(_losses(tmp_path / "run")) == 1
