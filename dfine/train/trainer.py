"""The training loop: data → D-FINE (train mode) → criterion → AdamW, with EMA, checkpoints,
validation and the user-facing progress.

Read :meth:`Trainer.fit` top to bottom: set-up (seed, model, ``--from``, optimiser, schedule,
EMA, resume), then the epoch loop; each optimiser step is ``accumulate`` batches of forward
(autocast on CUDA), loss in float32, backward, clipping, ``optimizer.step``, EMA update and
the lr of the next step. Losses stay on the device and are read back every ``_SYNC_EVERY``
steps, before every checkpoint and at the end of each epoch (one host sync, not one per step),
which is also when a NaN or inf loss is caught: the run stops with :class:`NonFiniteLossError`
naming the step, the terms and the last good checkpoint (that checkpoint was written from
weights that produced only finite losses).

Outputs in ``settings.out``: ``last.pth`` (every ``checkpoint.every_steps`` steps or
``every_s`` seconds, at each epoch end, and on a stop request), ``best.pth`` (highest val
AP50:95), ``metrics.csv`` (one row per epoch), ``losses.csv`` (one row per optimiser step) and,
at the end, ``results.png``. ``--resume`` continues from ``last.pth`` exactly: the data order
and augmentation are functions of (seed, epoch, index), the loader skips the batches already
done, and the RNG states are restored, so the losses after a resume are those an uninterrupted
run would have had.

Thread: the caller's. :meth:`Trainer.request_stop` may be called from a signal handler; the
loop finishes the step in progress, writes ``last.pth`` and returns.
"""

from __future__ import annotations

import csv
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn

from dfine.train.checkpointing import (
    BEST,
    LAST,
    atomic_save,
    load_matching_weights,
    plain,
    read_checkpoint,
    set_rng_state,
    training_checkpoint,
)
from dfine.train.ema import ModelEma
from dfine.train.evaluate import EvalResult, evaluate_model
from dfine.train.host_memory import retain_freed_memory
from dfine.train.optim import LrSchedule, build_optimizer
from dfine.train.settings import Amp, TrainDevice, TrainSettings

logger = logging.getLogger(__name__)

_SYNC_EVERY = 10  # optimiser steps between reads of the losses (a host sync on CUDA)
METRICS_CSV = "metrics.csv"
LOSSES_CSV = "losses.csv"


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or inf; the message (one line) names step, terms and checkpoint."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run leaves."""

    steps: int
    epochs_done: int
    interrupted: bool
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_map50_95: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(choice: TrainDevice) -> torch.device:
    """``auto`` → CUDA when available; ``cuda`` without a GPU is refused (ValueError)."""
    if choice is TrainDevice.CUDA and not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is visible to torch; use --device cpu or auto")
    if choice is TrainDevice.CPU or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _float32(value: Any) -> Any:
    """The model's outputs with every floating tensor in float32 (for the loss under AMP)."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_float32(v) for v in value)
    return value


def _to_device(targets: Sequence[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [
        {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in t.items()
        }
        for t in targets
    ]


class _Progress:
    """One progress bar per epoch on ``stream``: step, loss, lr, it/s, ETA (a line every 5 s
    when the stream is not a terminal)."""

    def __init__(
        self, stream: TextIO | None, epoch: int, epochs: int, total: int, done: int
    ) -> None:
        self.stream = stream
        self.label = f"epoch {epoch + 1}/{epochs}"
        self.total, self.done, self.start_done = total, done, done
        self.start_s = time.monotonic()
        self.last_plain_s = 0.0
        self.is_tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.text = ""

    def update(self, done: int, loss: float | None, lr: float) -> None:
        if self.stream is None:
            return
        self.done = done
        elapsed = time.monotonic() - self.start_s
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        filled = int(20 * done / self.total) if self.total else 20
        loss_text = "-" if loss is None else f"{loss:.4f}"
        self.text = (
            f"{self.label} [{'#' * filled}{'.' * (20 - filled)}] {done}/{self.total} "
            f"loss {loss_text} lr {lr:.2e} {rate:.2f} it/s ETA {_duration(eta)}"
        )
        if self.is_tty:
            self.stream.write("\r" + self.text + "\033[K")
            self.stream.flush()
        elif time.monotonic() - self.last_plain_s >= 5.0 or done == self.total:
            self.stream.write(self.text + "\n")
            self.stream.flush()
            self.last_plain_s = time.monotonic()

    def close(self) -> None:
        if self.stream is not None and self.is_tty and self.text:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class Trainer:
    """Trains a D-FINE on a validated dataset.

    Args:
        settings: the run (see :class:`~dfine.train.settings.TrainSettings`).
        dataset: ``dfine.train.datasets.DatasetSpec`` (class names, train and val samples).
        progress: where the per-epoch bar and the per-class tables go (``None``: nowhere).
        on_step: called as ``on_step(step, model)`` after each optimiser step and its
            checkpoint; benchmarks time steps with it, tests use it to break a run.
    """

    def __init__(
        self,
        settings: TrainSettings,
        dataset: Any,
        *,
        progress: TextIO | None = None,
        on_step: Callable[[int, nn.Module], None] | None = None,
    ) -> None:
        self.settings = settings
        self.dataset = dataset
        self.class_names = list(dataset.class_names)
        self.progress = progress
        self.on_step = on_step
        self._stop_requested = False
        self.device = resolve_device(settings.device)
        if len(dataset.train) < settings.data.batch:
            raise ValueError(
                f"the training set has {len(dataset.train)} images, fewer than one batch "
                f"of {settings.data.batch}; use a smaller --batch"
            )

    def request_stop(self) -> None:
        """Stop after the current step, writing ``last.pth`` (safe from a signal handler)."""
        self._stop_requested = True

    # ------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        s = self.settings
        out = s.out
        out.mkdir(parents=True, exist_ok=True)
        self.last_path, self.best_path = out / LAST, out / BEST
        self._last_good: Path | None = None

        random.seed(s.seed)
        np.random.seed(s.seed)
        torch.manual_seed(s.seed)
        if self.device.type == "cpu":
            # Each step frees and re-allocates the same large activations: keep them in the
            # heap rather than page-faulting them in again (15 % of a CPU step's time).
            retain_freed_memory()

        import dfine
        from dfine.criterion import Criterion
        from dfine.train.loader import DetectionDataset, make_loader

        num_classes = len(self.class_names)
        model = dfine.build_model(s.size, num_classes=num_classes, num_denoising=s.num_denoising)
        if s.init_from is not None:
            load_matching_weights(model, s.init_from)
        # Channels-last convolutions: about 12 % less CPU per step for D-FINE-N at 320 (bench.train),
        # and the layout tensor cores want under CUDA AMP.
        model.to(self.device, memory_format=torch.channels_last).train()
        criterion = Criterion(num_classes=num_classes).to(self.device)

        stop_epoch = s.epochs - s.data.no_aug_epochs if s.data.no_aug_epochs else None
        train_set = DetectionDataset(
            self.dataset.train, s.data.imgsz, augment=True, seed=s.seed, stop_epoch=stop_epoch
        )
        batches_per_epoch = len(self.dataset.train) // s.data.batch
        steps_per_epoch = max(1, batches_per_epoch // s.optim.accumulate)
        total_steps = s.epochs * steps_per_epoch
        if s.max_steps is not None:
            total_steps = min(total_steps, s.max_steps)

        optimizer = build_optimizer(model, s.optim)
        schedule = LrSchedule(optimizer, s.optim, total_steps)
        ema = ModelEma(model, s.ema.decay, s.ema.warmups, s.ema.start) if s.ema.enabled else None
        amp_dtype = self._amp_dtype()
        scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None

        step, epoch, batch_in_epoch = 0, 0, 0
        history: list[dict[str, Any]] = []
        best: float | None = None
        resume_rng: dict[str, Any] | None = None
        if s.resume:
            ckpt = read_checkpoint(self.last_path)
            if list(ckpt.get("class_names", [])) != self.class_names:
                raise ValueError(
                    f"cannot resume {self.last_path}: it was trained on classes "
                    f"{ckpt.get('class_names')}, the dataset has {self.class_names}"
                )
            model.load_state_dict(ckpt["model"])
            if ema is not None and "ema" in ckpt:
                ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            schedule.load_state_dict(ckpt["lr_scheduler"])
            schedule.warmup.load_state_dict(ckpt["lr_warmup_scheduler"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
            state = ckpt["finestream"]
            step, epoch, batch_in_epoch = (
                int(state["step"]),
                int(state["epoch"]),
                int(state["batch_in_epoch"]),
            )
            history = list(state.get("history", []))
            best = state.get("best_map50_95")
            resume_rng = state["rng"]
            self._last_good = self.last_path
            self._truncate_logs(out, step, epoch)
            logger.info(
                "resuming %s at epoch %d, batch %d, step %d",
                self.last_path,
                epoch + 1,
                batch_in_epoch,
                step,
            )
            del ckpt

        self._parts = dict(
            model=model, ema=ema, optimizer=optimizer, schedule=schedule, scaler=scaler
        )
        self._history = history
        self._best = best
        loss_names: list[str] | None = None
        pending: list[tuple[int, int, torch.Tensor, float]] = []  # (step, epoch, stacked terms, lr)
        epoch_sums: dict[str, float] = {}
        epoch_count = 0
        last_save_s = time.monotonic()
        start_s = time.monotonic()
        interrupted = False

        def flush() -> None:
            """Read the pending losses back, check them, write them to losses.csv."""
            nonlocal epoch_count
            if not pending or loss_names is None:
                return
            values = torch.stack([p[2] for p in pending]).cpu().numpy()
            finite = np.isfinite(values)
            if not finite.all():
                row, _ = np.argwhere(~finite)[0]
                bad = [loss_names[j] for j in np.flatnonzero(~finite[row])]
                where = str(self._last_good) if self._last_good else "none written yet"
                more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
                raise NonFiniteLossError(
                    f"step {pending[row][0]}: non-finite loss in {', '.join(bad[:4])}{more}; "
                    f"training stopped; last good checkpoint: {where}"
                )
            with (out / LOSSES_CSV).open("a", newline="") as f:
                writer = csv.writer(f)
                if f.tell() == 0:
                    writer.writerow(["step", "epoch", "loss", *loss_names, "lr"])
                for (st, ep, _, lr), row_values in zip(pending, values):
                    writer.writerow(
                        [
                            st,
                            ep,
                            f"{float(row_values.sum()):.6g}",
                            *(f"{v:.6g}" for v in row_values),
                            f"{lr:.6g}",
                        ]
                    )
                    for name, v in zip(loss_names, row_values):
                        epoch_sums[name] = epoch_sums.get(name, 0.0) + float(v)
                    epoch_count += 1
            self._last_loss = float(values[-1].sum())
            pending.clear()

        self._last_loss: float | None = None
        done = step >= total_steps
        while epoch < s.epochs and not done:
            loader = make_loader(
                train_set,
                s.data.batch,
                s.data.workers,
                s.seed,
                epoch,
                shuffle=True,
                skip_batches=batch_in_epoch,
                drop_last=True,
                multiscale=s.data.multiscale,
            )
            batches = iter(loader)
            if resume_rng is not None:
                # After the loader drew its worker seeds: the RNG then continues as it was.
                set_rng_state(resume_rng)
                resume_rng = None
            bar = _Progress(self.progress, epoch, s.epochs, batches_per_epoch, batch_in_epoch)
            epoch_sums.clear()
            epoch_count = 0
            accumulated = 0
            step_terms = zero = torch.zeros((), device=self.device)
            optimizer.zero_grad(set_to_none=True)
            for images, targets in batches:
                images = images.to(self.device, non_blocking=True).contiguous(
                    memory_format=torch.channels_last
                )
                targets = _to_device(targets, self.device)
                with torch.autocast(
                    self.device.type,
                    dtype=amp_dtype or torch.float32,
                    enabled=amp_dtype is not None,
                ):
                    outputs = model(images, targets)
                with torch.autocast(self.device.type, enabled=False):
                    losses = criterion(_float32(outputs), targets)
                if loss_names is None:
                    loss_names = sorted(losses)
                # A term the first batch lacked is in the loss but not in the logs; one it has
                # and a later batch lacks (no boxes to denoise, say) is logged as 0.
                terms = torch.stack(
                    [losses[k].detach().float() if k in losses else zero for k in loss_names]
                )
                step_terms = terms if accumulated == 0 else step_terms + terms
                loss = sum(losses.values()) / s.optim.accumulate
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
                accumulated += 1
                batch_in_epoch += 1
                if accumulated < s.optim.accumulate:
                    continue
                accumulated = 0

                if s.optim.clip_max_norm > 0:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), s.optim.clip_max_norm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                lr = float(optimizer.param_groups[-1]["lr"])
                schedule.step()
                step += 1
                pending.append((step, epoch, step_terms / s.optim.accumulate, lr))

                due = (s.checkpoint.every_steps and step % s.checkpoint.every_steps == 0) or (
                    s.checkpoint.every_s and time.monotonic() - last_save_s >= s.checkpoint.every_s
                )
                stop = self._stop_requested or step >= total_steps
                if due or stop or len(pending) >= _SYNC_EVERY:
                    flush()
                bar.update(batch_in_epoch, self._last_loss, lr)  # the loss as of the last read
                if (due or self._stop_requested) and not (
                    step >= total_steps and batch_in_epoch >= batches_per_epoch
                ):
                    self._save(self.last_path, step, epoch, batch_in_epoch, last_epoch=epoch - 1)
                    last_save_s = time.monotonic()
                if self.on_step is not None:
                    self.on_step(step, model)
                if self._stop_requested:
                    interrupted = True
                    break
                if step >= total_steps:
                    done = True
                    break
            flush()
            bar.update(batch_in_epoch, self._last_loss, float(optimizer.param_groups[-1]["lr"]))
            bar.close()
            if interrupted:
                break

            epoch_finished = batch_in_epoch >= batches_per_epoch
            if not epoch_finished:  # max_steps reached mid-epoch
                self._save(self.last_path, step, epoch, batch_in_epoch, last_epoch=epoch - 1)
                break
            record: dict[str, Any] = {"epoch": epoch + 1, "step": step}
            record["loss"] = sum(epoch_sums.values()) / max(1, epoch_count)
            record.update({k: v / max(1, epoch_count) for k, v in epoch_sums.items()})
            record["lr"] = float(optimizer.param_groups[-1]["lr"])
            last_epoch = epoch + 1 == s.epochs or done
            result = None
            if s.val_every and ((epoch + 1) % s.val_every == 0 or last_epoch) and self.dataset.val:
                result = self._validate(ema.module if ema is not None else model, amp_dtype)
                record["map50_95"], record["map50"] = result.map50_95, result.map50
            record["time_s"] = round(time.monotonic() - start_s, 1)
            history.append(record)
            self._append_metrics(out, record, loss_names or [])
            epoch += 1
            batch_in_epoch = 0
            if result is not None and (best is None or result.map50_95 > best):
                best = result.map50_95
                self._best = best
                self._save(self.best_path, step, epoch, 0, last_epoch=epoch - 1)
            self._save(self.last_path, step, epoch, 0, last_epoch=epoch - 1)
            last_save_s = time.monotonic()
            if self._stop_requested:
                interrupted = True
                break

        self._plot(out)
        return TrainResult(
            steps=step,
            epochs_done=epoch,
            interrupted=interrupted,
            last_checkpoint=self.last_path if self.last_path.exists() else None,
            best_checkpoint=self.best_path if self.best_path.exists() else None,
            best_map50_95=best,
            history=history,
        )

    # ------------------------------------------------------------------------------------
    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.settings.amp
        if amp is Amp.OFF:
            return None
        if self.device.type != "cuda":
            logger.info("amp %s applies to CUDA only; training in float32 on the CPU", amp.value)
            return None
        return torch.bfloat16 if amp is Amp.BF16 else torch.float16

    def _validate(self, module: nn.Module, amp_dtype: torch.dtype | None) -> EvalResult:
        s = self.settings
        result = evaluate_model(
            module,
            self.dataset.val,
            self.class_names,
            imgsz=s.data.imgsz,
            batch=s.data.batch,
            workers=s.data.workers,
            device=self.device,
            amp_dtype=amp_dtype,
        )
        if self.progress is not None:
            self.progress.write(result.format_table() + "\n")
            self.progress.flush()
        return result

    def _save(
        self, path: Path, step: int, epoch: int, batch_in_epoch: int, last_epoch: int
    ) -> None:
        p = self._parts
        ema: ModelEma | None = p["ema"]
        progress = {
            "settings": plain(self.settings),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "history": plain(self._history),
            "best_map50_95": self._best,
            "size": self.settings.size,
            "imgsz": self.settings.data.imgsz,
            "num_classes": len(self.class_names),
        }
        checkpoint = training_checkpoint(
            model=p["model"],
            ema_state=ema.state_dict() if ema is not None else None,
            optimizer=p["optimizer"],
            lr_scheduler=p["schedule"],
            lr_warmup_scheduler=p["schedule"].warmup,
            scaler=p["scaler"],
            last_epoch=last_epoch,
            class_names=self.class_names,
            progress=progress,
        )
        atomic_save(checkpoint, path)
        if path == self.last_path:
            self._last_good = path
        logger.info("saved %s (step %d)", path, step)

    @staticmethod
    def _append_metrics(out: Path, record: dict[str, Any], loss_names: list[str]) -> None:
        columns = ["epoch", "step", "loss", *loss_names, "lr", "map50_95", "map50", "time_s"]
        path = out / METRICS_CSV
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if f.tell() == 0:
                writer.writerow(columns)
            writer.writerow(
                [
                    ""
                    if record.get(c) is None
                    else (f"{record[c]:.6g}" if isinstance(record[c], float) else record[c])
                    for c in columns
                ]
            )

    @staticmethod
    def _truncate_logs(out: Path, step: int, epoch: int) -> None:
        """Drop log rows written after the checkpoint a resume starts from."""
        for name, key, limit in ((LOSSES_CSV, "step", step), (METRICS_CSV, "epoch", epoch)):
            path = out / name
            if not path.exists():
                continue
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
            if not rows:
                continue
            col = rows[0].index(key)
            kept = [rows[0]] + [r for r in rows[1:] if r and int(r[col]) <= limit]
            with path.open("w", newline="") as f:
                csv.writer(f).writerows(kept)

    def _plot(self, out: Path) -> None:
        try:
            from dfine.train.plots import plot_results
        except ImportError:  # matplotlib missing: the CSVs hold the same numbers
            logger.warning(
                "matplotlib is not installed: no results.png (the CSVs have the numbers)"
            )
            return
        try:
            plot_results(out / LOSSES_CSV, out / METRICS_CSV, out / "results.png")
        except (OSError, ValueError) as exc:
            logger.warning("could not draw %s: %s", out / "results.png", exc)
