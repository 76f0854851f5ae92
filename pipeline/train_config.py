"""The training configuration: one YAML file per recipe (``configs/train_*.yaml``), validated
at load into ``dfine.train.settings.TrainSettings``; CLI flags go on top.

Unknown keys and wrong types are refused with the key's full path, e.g.
``configs/x.yaml: optim.lr_backbone: unknown key (allowed: ...)``, exactly as the run config
(``pipeline.config``) does. No includes: a file holds the whole recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dfine.train.settings import TrainDevice, TrainSettings
from pipeline.schema import ConfigError, load_yaml


@dataclass(frozen=True)
class TrainOverrides:
    """Values given on the command line; ``None`` leaves the file's (or the default) value."""

    data: Path | None = None
    images: Path | None = None
    val_data: Path | None = None
    size: str | None = None
    imgsz: int | None = None
    epochs: int | None = None
    batch: int | None = None
    workers: int | None = None
    out: Path | None = None
    init_from: Path | None = None
    resume: bool | None = None
    device: str | None = None
    max_steps: int | None = None
    seed: int | None = None


def load_train_config(path: Path) -> TrainSettings:
    """Read and validate a training YAML; errors name the file and the key path."""
    return load_yaml(
        TrainSettings, path, missing=f"training config not found: {path} (see configs/train_n.yaml)"
    )


def apply_train_overrides(settings: TrainSettings, cli: TrainOverrides) -> TrainSettings:
    """``settings`` with the command line's values put in (each re-validated)."""
    try:
        data_changes = {
            k: v
            for k, v in (
                ("data", cli.data),
                ("images", cli.images),
                ("val_data", cli.val_data),
                ("imgsz", cli.imgsz),
                ("batch", cli.batch),
                ("workers", cli.workers),
            )
            if v is not None
        }
        top = {
            k: v
            for k, v in (
                ("size", cli.size),
                ("epochs", cli.epochs),
                ("out", cli.out),
                ("init_from", cli.init_from),
                ("resume", cli.resume),
                ("max_steps", cli.max_steps),
                ("seed", cli.seed),
            )
            if v is not None
        }
        if cli.device is not None:
            top["device"] = TrainDevice(cli.device)
        return dataclasses.replace(
            settings, data=dataclasses.replace(settings.data, **data_changes), **top
        )
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"command line: {exc}") from None
