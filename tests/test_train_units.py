"""Optimiser groups, lr curve, EMA warm-up, atomic checkpoints, ``--from`` and COCO mAP."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dfine.train.checkpointing import atomic_save, load_matching_weights, rng_state, set_rng_state
from dfine.train.ema import ModelEma, ema_decay
from dfine.train.evaluate import coco_map
from dfine.train.optim import LrSchedule, build_optimizer, build_param_groups
from dfine.train.settings import OptimSettings, ParamGroupSettings, Schedule

REPO = Path(__file__).resolve().parents[1]


class Tiny(nn.Module):
    """Parameter names shaped like D-FINE's: backbone convs and bns, encoder norms, heads."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict(
            {"conv": nn.Conv2d(3, 4, 3, bias=False), "bn": nn.BatchNorm2d(4)}
        )
        self.encoder = nn.ModuleDict({"proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
        self.decoder = nn.ModuleDict({"enc_score_head": nn.Linear(4, num_classes)})


@pytest.fixture(scope="module")
def dfine_n() -> nn.Module:
    import dfine

    return dfine.build_model("n", num_classes=3)


def test_official_groups_on_dfine_n(dfine_n: nn.Module) -> None:
    settings = OptimSettings(
        lr=8e-4,
        weight_decay=1e-4,
        param_groups=(
            ParamGroupSettings(r"^(?=.*backbone)(?!.*norm|bn).*$", lr=4e-4),
            ParamGroupSettings(r"^(?=.*backbone)(?=.*norm|bn).*$", lr=4e-4, weight_decay=0.0),
            ParamGroupSettings(
                r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", weight_decay=0.0
            ),
        ),
    )
    opt = build_optimizer(dfine_n, settings)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = {n: p for n, p in dfine_n.named_parameters() if p.requires_grad}
    seen = sum(len(g["params"]) for g in opt.param_groups)
    assert seen == len(names)  # every parameter in exactly one group
    for name, p in names.items():
        g = by_param[id(p)]
        if name.startswith("backbone."):
            assert g["lr"] == pytest.approx(4e-4), name
        else:
            assert g["lr"] == pytest.approx(8e-4), name
        if not name.startswith("backbone.") and (name.endswith(".bias") or ".norm" in name):
            assert g["weight_decay"] == 0.0, name
        if (
            name.startswith(("encoder.", "decoder."))
            and name.endswith(".weight")
            and "norm" not in name
        ):
            assert g["weight_decay"] == pytest.approx(1e-4), name
    # The official regex quirk: backbone "bn" tensors do not match "norm", so they stay in the
    # first group (backbone lr, with decay), exactly as in the official configs.
    assert by_param[id(names["backbone.stem.stem1.bn.weight"])]["weight_decay"] == pytest.approx(
        1e-4
    )


def test_overlapping_groups_are_refused() -> None:
    settings = OptimSettings(
        param_groups=(ParamGroupSettings("backbone"), ParamGroupSettings("conv"))
    )
    with pytest.raises(ValueError, match="backbone.conv.weight.*matches both"):
        build_param_groups(Tiny(), settings)


def test_warmup_then_flat_and_cosine() -> None:
    model = Tiny()
    opt = build_optimizer(
        model,
        OptimSettings(
            lr=1e-3,
            warmup_steps=4,
            schedule=Schedule.FLAT,
            param_groups=(ParamGroupSettings("backbone", lr=5e-4),),
        ),
    )
    sched = LrSchedule(opt, OptimSettings(warmup_steps=4), total_steps=100)
    seen = []
    for _ in range(6):
        seen.append(sched.get_last_lr())
        sched.step()
    # official LinearWarmup: step s runs at min(1, (s + 1) / 4) of the target
    assert [round(v[-1], 9) for v in seen] == [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    assert [round(v[0], 9) for v in seen] == [1.25e-4, 2.5e-4, 3.75e-4, 5e-4, 5e-4, 5e-4]

    opt = build_optimizer(model, OptimSettings(lr=1e-3))
    cos = LrSchedule(
        opt,
        OptimSettings(
            warmup_steps=0, schedule=Schedule.COSINE, flat_fraction=0.5, min_lr_ratio=0.1
        ),
        total_steps=100,
    )
    lrs = []
    for _ in range(101):
        lrs.append(cos.get_last_lr()[-1])
        cos.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[50] == pytest.approx(1e-3)
    assert lrs[75] == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way down the cosine
    assert lrs[100] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # state round trip: a fresh schedule continues at the same lr
    again = LrSchedule(
        build_optimizer(model, OptimSettings(lr=1e-3)),
        OptimSettings(warmup_steps=0, schedule=Schedule.COSINE, min_lr_ratio=0.1),
        100,
    )
    state = {"last_step": 75}
    again.load_state_dict({**cos.state_dict(), **state})
    assert again.get_last_lr()[-1] == pytest.approx(lrs[75])


def test_ema_follows_the_official_warmup_formula() -> None:
    torch.manual_seed(0)
    model = Tiny()
    ema = ModelEma(model, decay=0.9999, warmups=10)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    expected = {k: v.clone() for k, v in start.items()}
    for update in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = 0.9999 * (1 - math.exp(-update / 10))
        assert ema_decay(update, 0.9999, 10) == pytest.approx(d)
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                expected[k] = d * expected[k] + (1 - d) * v
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    assert ema.updates == 5
    assert not any(p.requires_grad for p in ema.module.parameters())
    # the first decay is tiny: the average starts almost at the model
    assert ema_decay(1, 0.9999, 1000) < 1e-3


def test_atomic_save_survives_a_kill_during_the_write(tmp_path: Path) -> None:
    target = tmp_path / "last.pth"
    atomic_save({"step": torch.tensor(1)}, target)
    # A process that dies while the new checkpoint is written (here: right before its fsync).
    script = (
        "import os, torch, pathlib\n"
        "from dfine.train.checkpointing import atomic_save\n"
        "os.fsync = lambda fd: os._exit(9)\n"
        f"atomic_save({{'step': torch.tensor(2), 'big': torch.zeros(1 << 20)}}, pathlib.Path({str(target)!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed writer should have left its temporary file"
    assert int(torch.load(target, weights_only=True)["step"]) == 1  # the old file, intact


def test_rng_state_round_trip_is_weights_only_loadable(tmp_path: Path) -> None:
    import random

    state = rng_state()
    atomic_save({"rng": state}, tmp_path / "r.pth")
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "r.pth", weights_only=True)["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_from_checkpoint_with_another_class_count(
    tmp_path: Path, dfine_n: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import dfine

    path = tmp_path / "coco.pth"
    torch.save({"ema": {"module": dfine_n.state_dict(), "updates": 3}}, path)
    other = dfine.build_model("n", num_classes=5)
    with caplog.at_level(logging.INFO, logger="dfine.train.checkpointing"):
        skipped = load_matching_weights(other, path)
    lines = [r.getMessage() for r in caplog.records if "--from" in r.getMessage()]
    assert len(lines) == 1 and "decoder.enc_score_head.weight" in lines[0], lines
    heads = {
        k
        for k, v in other.state_dict().items()
        if k in dfine_n.state_dict() and v.shape != dfine_n.state_dict()[k].shape
    }
    assert set(skipped) == heads  # exactly the class-count tensors, nothing else
    assert (
        "decoder.denoising_class_embed.weight" in heads and "decoder.dec_score_head.2.bias" in heads
    )
    own = other.state_dict()
    src = dfine_n.state_dict()
    for k in ("backbone.stem.stem1.conv.weight", "decoder.dec_bbox_head.0.layers.0.weight"):
        if k in own:
            assert torch.equal(own[k], src[k]), k


def _gt(boxes_per_image: list[list[tuple[int, list[float]]]], names: list[str]) -> dict:
    images, anns = [], []
    for i, boxes in enumerate(boxes_per_image):
        images.append({"id": i + 10, "width": 320, "height": 240, "file_name": f"{i}.jpg"})
        for cat, (x, y, w, h) in boxes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 10,
                    "category_id": cat + 1,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {
        "images": images,
        "annotations": anns,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
    }


def test_perfect_predictions_give_map_one_and_json_shape() -> None:
    names = ["circle", "square", "triangle"]
    gt = _gt(
        [
            [(0, [10, 10, 50, 40]), (1, [100, 60, 80, 80])],
            [(2, [5, 5, 30, 30]), (0, [200, 100, 60, 90])],
        ],
        names,
    )
    perfect = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in gt["annotations"]
    ]
    result = coco_map(gt, perfect, names)
    assert result.map50_95 == pytest.approx(1.0) and result.map50 == pytest.approx(1.0)
    js = result.to_json()
    assert set(js) >= {"map50_95", "map50", "per_class"}
    assert set(js["per_class"]) == set(names)
    assert js["per_class"]["circle"] == {
        "map50_95": pytest.approx(1.0),
        "map50": pytest.approx(1.0),
        "images": 2,
        "instances": 2,
    }
    table = result.format_table()
    assert "AP50:95" in table and "triangle" in table

    # shifted boxes: IoU ~0.6 for the squares -> AP50 holds, AP50:95 drops, for that class only
    shifted = [dict(d) for d in perfect]
    for d in shifted:
        if d["category_id"] == 2:
            x, y, w, h = d["bbox"]
            d["bbox"] = [x + 0.2 * w, y, w, h]
    partly = coco_map(gt, shifted, names)
    sq = {c.name: c for c in partly.per_class}["square"]
    assert sq.map50 == pytest.approx(1.0) and sq.map50_95 < 0.6
    assert {c.name: c for c in partly.per_class}["circle"].map50_95 == pytest.approx(1.0)
    assert coco_map(gt, [], names).map50_95 == 0.0


def test_from_checkpoint_of_another_size_is_refused(tmp_path: Path, dfine_n: nn.Module) -> None:
    import dfine

    path = tmp_path / "n.pth"
    torch.save({"model": dfine_n.state_dict()}, path)
    with pytest.raises(dfine.CheckpointError, match="pass --size n"):
        load_matching_weights(dfine.build_model("s", num_classes=3), path)


class _Oracle(nn.Module):
    """Answers each batch with its own ground truth (in loader order): logit +10 for the GT
    class of the first n queries, -10 everywhere else, boxes = the GT boxes."""

    def __init__(self, batches: list[list[dict]], num_classes: int) -> None:
        super().__init__()
        self.batches = batches
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        targets = self.batches.pop(0)
        logits = torch.full((len(targets), 300, self.num_classes), -10.0)
        boxes = torch.full((len(targets), 300, 4), 0.5)
        for b, t in enumerate(targets):
            n = len(t["labels"])
            logits[b, torch.arange(n), t["labels"]] = 10.0
            boxes[b, :n] = t["boxes"]
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_the_evaluation_path_scores_ground_truth_as_map_one(tmp_path: Path) -> None:
    """Resize, normalised boxes, postprocessing back to source pixels and COCO ids all agree."""
    from dfine.train.datasets import load_dataset
    from dfine.train.evaluate import evaluate_model
    from dfine.train.loader import DetectionDataset, make_loader
    from dfine.train.synthetic import make_synthetic_dataset

    ann = make_synthetic_dataset(tmp_path / "syn", 5, num_classes=3, size=200, seed=4)
    spec = load_dataset(ann, val_fraction=0.0)
    loader = make_loader(
        DetectionDataset(spec.train, 256, augment=False),
        2,
        0,
        seed=0,
        epoch=0,
        shuffle=False,
        drop_last=False,
    )
    oracle = _Oracle([targets for _, targets in loader], len(spec.class_names))
    result = evaluate_model(
        oracle,
        spec.train,
        list(spec.class_names),
        imgsz=256,
        batch=2,
        workers=0,
        device=torch.device("cpu"),
    )
    assert result.instances > 0
    assert result.map50 == pytest.approx(1.0)
    assert result.map50_95 == pytest.approx(1.0)


# A step's worth of large activations, allocated and freed five times; prints the minor page
# faults of each round. Run in a child: the malloc settings last for the process's life.
_FAULTS_SCRIPT = """
import resource, sys, torch
from dfine.train.host_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(n).fill_(1.0) for n in (16 << 20, 4 << 20, 16 << 20, 1 << 20, 8 << 20)]
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, *faults)
"""


def _fault_rounds(mode: str) -> tuple[bool, list[int]]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    }
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS_SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=env,
    )
    applied, *faults = done.stdout.split()
    return applied == "True", [int(f) for f in faults]


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc malloc settings",
)
def test_retained_memory_is_not_page_faulted_in_again_each_step() -> None:
    # 180 MB a round = ~46,000 pages of 4 KiB. glibc's defaults map and unmap them every round;
    # once the thresholds are raised, later rounds reuse the heap.
    _, default = _fault_rounds("default")
    applied, retained = _fault_rounds("retain")
    assert applied
    assert min(default[2:]) > 20_000, default
    assert max(retained[3:]) < 0.1 * min(default[2:]), (retained, default)


def test_retain_freed_memory_refuses_bad_thresholds() -> None:
    from dfine.train.host_memory import retain_freed_memory

    with pytest.raises(ValueError, match="malloc thresholds"):
        retain_freed_memory(mmap_threshold_bytes=0)
