"""The train-mode D-FINE forward against the official training code's saved outputs.

Fixture ``../shared/fixtures/dfine_n_train`` (read its README): the official D-FINE-N in
``train()`` on two 320x320 images with the calibrated weights of ``dfine_n_calibrated``
(``ema.module``, loaded with ``strict=False``: the official 640 anchor buffers do not fit).
Case A builds 200 denoising queries after ``torch.manual_seed(0)``; case B has none; the
``bntrain`` file is case B with BatchNorm on batch statistics.

Query order: the 300 matching queries come in the order of the encoder's top-k selection,
which near-tied scores (smallest gap 1e-5) make only as stable as float32 rounding, so
matching-query outputs are compared after aligning ours to the official order by the selected
cell index; the selected set itself must be the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dfine
from dfine.denoising import DenoisingGroup, make_denoising_group
from dfine.layers import FrozenBatchNorm2d
from dfine.model import DFINE

CHECKPOINT = "dfine_n_calibrated/dfine_n_calibrated.pth"
TRAIN = "dfine_n_train"
NUM_QUERIES = 300
# Per output kind, the largest |ours - official| allowed after alignment. The official
# float64 run differs from its float32 files by 3.5e-5 (corners), 2.8e-5 (logits) and 8e-7
# (boxes); these bounds leave a margin for other thread counts.
ATOL = {"logits": 1e-4, "corners": 1e-4, "boxes": 1e-5}
# Reordering is only allowed between selected cells whose scores are this close.
NEAR_TIE = 1e-4


def _kind(key: str) -> str:
    if key.endswith("logits"):
        return "logits"
    if key.endswith("corners"):
        return "corners"
    return "boxes"  # pred_boxes, ref_points


@pytest.fixture(scope="module")
def weights(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(fixtures_dir / CHECKPOINT, weights_only=True)["ema"]["module"]


def _load(fixtures_dir: Path, name: str) -> dict[str, Any]:
    return torch.load(fixtures_dir / TRAIN / name, weights_only=True)


def _model(weights: dict[str, torch.Tensor], num_denoising: int, freeze_bn: bool) -> DFINE:
    model = dfine.build_model("n", num_denoising=num_denoising)
    result = model.load_state_dict(weights, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    model.train()
    if freeze_bn:
        # The fixture's mode: BatchNorm normalises with the checkpoint's running statistics.
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    return model


class Capture:
    """Forward hooks keeping the backbone and encoder maps and the encoder's cell logits."""

    def __init__(self, model: DFINE) -> None:
        self.values: dict[str, Any] = {}
        self._handles = [
            model.backbone.register_forward_hook(self._keep("backbone")),
            model.encoder.register_forward_hook(self._keep("encoder")),
            model.decoder.enc_score_head.register_forward_hook(self._keep("enc_logits")),
        ]

    def _keep(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.values[name] = output

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    @property
    def topk_index(self) -> torch.Tensor:
        # The same top-k the decoder takes, on the same logits: the order the outputs come in.
        logits = self.values["enc_logits"].detach()
        return torch.topk(logits.max(-1).values, NUM_QUERIES, dim=-1).indices


def _forward(model: DFINE, images: torch.Tensor, **kwargs: Any) -> tuple[dict[str, Any], Capture]:
    capture = Capture(model)
    try:
        outputs = model(images, **kwargs)
    finally:
        capture.close()
    return outputs, capture


def _alignment(ours: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per image, the positions of our queries in the official order: ``ours[b, order[b]] == ref[b]``."""
    orders = []
    for mine, theirs in zip(ours.tolist(), ref.tolist()):
        assert sorted(mine) == sorted(theirs), "the selected cell sets differ"
        position = {cell: i for i, cell in enumerate(mine)}
        orders.append([position[cell] for cell in theirs])
    return torch.tensor(orders)


def _tensor_leaves(outputs: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in outputs.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, dict):
            yield from _tensor_leaves(value, name + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    yield from _tensor_leaves(item, f"{name}[{i}].")


def _compare_outputs(
    ours: dict[str, Any], ref: dict[str, Any], order: torch.Tensor
) -> dict[str, float]:
    """Compare every tensor of the official dict; returns the max abs error per key."""
    errors: dict[str, float] = {}
    ours_leaves = dict(_tensor_leaves(ours))
    ref_leaves = dict(_tensor_leaves(ref))
    assert set(ours_leaves) == set(ref_leaves), set(ours_leaves) ^ set(ref_leaves)
    for name, expected in ref_leaves.items():
        got = ours_leaves[name].detach()
        assert got.shape == expected.shape, name
        if name.startswith("dn_meta"):
            assert torch.equal(got, expected), name
            continue
        if name in ("up", "reg_scale"):
            # Same values; reg_scale is a float parameter here (int64 in the official model).
            assert torch.equal(got.to(expected.dtype), expected), name
            continue
        if not name.startswith("dn_"):
            got = torch.stack([g[o] for g, o in zip(got, order)])
        err = float((got - expected).abs().max())
        errors[name] = err
        assert err <= ATOL[_kind(name)], f"{name}: max |diff| {err:.3g}"
    return errors


def _check_selection(capture: Capture, intermediate: dict[str, Any]) -> torch.Tensor:
    """Maps and selection match; returns the alignment of our query order to the official one."""
    for name in ("backbone", "encoder"):
        for ours, ref in zip(capture.values[name], intermediate[f"{name}_outs"]):
            assert float((ours.detach() - ref).abs().max()) <= 1e-3 * float(ref.abs().max())
    enc_logits = capture.values["enc_logits"].detach()
    assert float((enc_logits - intermediate["enc_logits"]).abs().max()) <= 1e-4
    ours_idx, ref_idx = capture.topk_index, intermediate["enc_topk_index"]
    order = _alignment(ours_idx, ref_idx)
    # Where positions disagree, the official scores of the swapped cells must be near-tied.
    ref_scores = intermediate["enc_logits"].max(-1).values
    for b in range(ours_idx.shape[0]):
        swapped = (ours_idx[b] != ref_idx[b]).nonzero().flatten()
        for pos in swapped.tolist():
            gap = abs(float(ref_scores[b, ours_idx[b, pos]] - ref_scores[b, ref_idx[b, pos]]))
            assert gap <= NEAR_TIE, f"image {b} position {pos}: score gap {gap:.3g} is no near-tie"
    # Our own score gaps reproduce the official diagnostics (boundary gaps 7.6e-4 and 2.9e-4).
    top = torch.topk(enc_logits.max(-1).values, NUM_QUERIES + 1, dim=-1).values
    boundary = (top[:, NUM_QUERIES - 1] - top[:, NUM_QUERIES]).tolist()
    gaps = intermediate["enc_topk_score_gaps"]
    for ours_gap, ref_gap in zip(boundary, gaps["gap_at_boundary_300_301"]):
        assert abs(ours_gap - ref_gap) <= 5e-5
    min_gap = float((top[:, : NUM_QUERIES - 1] - top[:, 1:NUM_QUERIES]).min())
    assert abs(min_gap - gaps["min_gap_within_top300"]) <= 5e-5
    return order


# ---------------------------------------------------------------- case B: no denoising


@pytest.fixture(scope="module")
def case_b(fixtures_dir: Path) -> dict[str, Any]:
    return _load(fixtures_dir, "train_io_nodn.pt")


@pytest.fixture(scope="module")
def model_b(weights: dict) -> DFINE:
    """Case B's model; with frozen BatchNorm a forward leaves its state unchanged."""
    return _model(weights, num_denoising=0, freeze_bn=True)


@pytest.fixture(scope="module")
def model_a(weights: dict) -> DFINE:
    return _model(weights, num_denoising=100, freeze_bn=True)


@pytest.fixture(scope="module")
def run_b(model_b: DFINE, case_b: dict) -> tuple[dict[str, Any], Capture]:
    return _forward(model_b, case_b["images"], targets=case_b["targets"])


def test_case_b_every_output_matches(run_b: tuple, case_b: dict) -> None:
    outputs, capture = run_b
    assert "dn_outputs" not in outputs and "dn_meta" not in outputs
    assert outputs["enc_meta"] == {"class_agnostic": False}
    assert len(outputs["aux_outputs"]) == 2 and len(outputs["enc_aux_outputs"]) == 1
    order = _check_selection(capture, case_b["intermediate"])
    errors = _compare_outputs(outputs, case_b["outputs"], order)
    assert len(errors) == 4 + 6 * 2 + 2 + 2  # main, 2 aux layers, enc, pre


def test_case_b_teachers_are_the_last_layer_and_refs_are_shared(run_b: tuple) -> None:
    outputs, _ = run_b
    for aux in outputs["aux_outputs"]:
        assert aux["teacher_corners"] is outputs["pred_corners"]
        assert aux["teacher_logits"] is outputs["pred_logits"]
        assert torch.equal(aux["ref_points"], outputs["ref_points"])
    # FDR reference = the detached pre boxes; the pre boxes themselves carry the gradient.
    assert (
        not outputs["ref_points"].requires_grad
        and outputs["pre_outputs"]["pred_boxes"].requires_grad
    )
    assert torch.equal(outputs["ref_points"], outputs["pre_outputs"]["pred_boxes"].detach())


def test_no_targets_means_no_denoising_keys(model_a: DFINE, case_b: dict) -> None:
    with torch.no_grad():
        outputs = model_a(case_b["images"][:1])
    assert not any(key.startswith("dn_") for key in outputs)
    assert outputs["pred_logits"].shape == (1, NUM_QUERIES, 80)


# ---------------------------------------------------------------- case A: denoising


@pytest.fixture(scope="module")
def case_a(fixtures_dir: Path) -> dict[str, Any]:
    return _load(fixtures_dir, "train_io.pt")


def _saved_group(case_a: dict) -> DenoisingGroup:
    saved = case_a["denoising"]
    return DenoisingGroup(
        query_logits=saved["input_query_logits"],
        ref_points_unact=saved["input_query_bbox_unact"],
        attn_mask=saved["attn_mask"],
        dn_meta=saved["dn_meta"],
        labels=saved["input_query_class"],
        boxes=saved["input_query_bbox"],
    )


def test_case_a_denoising_group_reproduces_the_official_draws(model_a: DFINE, case_a: dict) -> None:
    model = model_a
    saved = case_a["denoising"]
    torch.manual_seed(0)
    assert torch.equal(torch.get_rng_state(), saved["rng_state_before"])
    group = model.decoder.make_denoising(case_a["targets"])
    after_ours = torch.get_rng_state()
    assert group is not None
    assert torch.equal(group.labels, saved["input_query_class"])
    assert float((group.boxes - saved["input_query_bbox"]).abs().max()) <= 1e-7
    assert float((group.ref_points_unact - saved["input_query_bbox_unact"]).abs().max()) <= 1e-6
    assert group.attn_mask is not None and torch.equal(group.attn_mask, saved["attn_mask"])
    torch.testing.assert_close(group.query_logits, saved["input_query_logits"], rtol=0, atol=0)
    assert group.dn_meta["dn_num_group"] == 20 and group.dn_meta["dn_num_split"] == [200, 300]
    for ours, ref in zip(group.dn_meta["dn_positive_idx"], saved["dn_meta"]["dn_positive_idx"]):
        assert ours.dtype == torch.int64 and torch.equal(ours, ref)
    # Exactly the official four draws, in order, and nothing else.
    torch.set_rng_state(saved["rng_state_before"])
    assert torch.equal(torch.rand(2, 200), saved["rand_label_uniform"])
    assert torch.equal(torch.randint(0, 80, (2, 200), dtype=torch.int32), saved["rand_new_label"])
    assert torch.equal(
        torch.randint(0, 2, (2, 200, 4), dtype=torch.float32) * 2 - 1, saved["rand_sign"]
    )
    assert torch.equal(torch.rand(2, 200, 4), saved["rand_part"])
    assert torch.equal(torch.get_rng_state(), after_ours)


def test_case_a_seeded_forward_matches(model_a: DFINE, case_a: dict) -> None:
    model = model_a
    torch.manual_seed(case_a["meta"]["forward_seed"])
    outputs, capture = _forward(model, case_a["images"], targets=case_a["targets"])
    order = _check_selection(capture, case_a["intermediate"])
    errors = _compare_outputs(outputs, case_a["outputs"], order)
    assert sum(name.startswith("dn_outputs") for name in errors) == 3 * 6
    assert len(outputs["dn_outputs"]) == 3 and outputs["dn_meta"]["dn_num_split"] == [200, 300]
    assert outputs["dn_outputs"][0]["teacher_corners"] is outputs["dn_outputs"][2]["pred_corners"]


def test_case_a_fed_the_saved_denoising_inputs_matches(model_a: DFINE, case_a: dict) -> None:
    model = model_a
    state = torch.get_rng_state()
    outputs, capture = _forward(model, case_a["images"], denoising=_saved_group(case_a))
    assert torch.equal(torch.get_rng_state(), state)  # a given group draws nothing
    order = _check_selection(capture, case_a["intermediate"])
    _compare_outputs(outputs, case_a["outputs"], order)


def test_case_a_layer_stack_from_the_saved_decoder_inputs(model_a: DFINE, case_a: dict) -> None:
    """The decoder layers alone, on the official layer-stack inputs (no selection involved)."""
    model = model_a
    inputs, ref = case_a["decoder_inputs"], case_a["outputs"]
    memory = torch.cat(
        [m.flatten(2).permute(0, 2, 1) for m in case_a["intermediate"]["encoder_outs"]], dim=1
    )
    shapes = [tuple(s) for s in inputs["spatial_shapes"]]
    dec = model.decoder
    with torch.no_grad():
        states = dec.run_layers(
            inputs["target"], inputs["ref_points_unact"], memory, shapes, 3, inputs["attn_mask"]
        )
        logits = [
            dec.class_logits(i, h, c) for i, (h, c) in enumerate(zip(states.hidden, states.corners))
        ]
    layers = [*ref["aux_outputs"], ref]
    for i in range(3):
        expected_logits = torch.cat(
            [ref["dn_outputs"][i]["pred_logits"], layers[i]["pred_logits"]], dim=1
        )
        expected_boxes = torch.cat(
            [ref["dn_outputs"][i]["pred_boxes"], layers[i]["pred_boxes"]], dim=1
        )
        expected_corners = torch.cat(
            [ref["dn_outputs"][i]["pred_corners"], layers[i]["pred_corners"]], dim=1
        )
        assert float((logits[i] - expected_logits).abs().max()) <= ATOL["logits"]
        assert float((states.boxes[i] - expected_boxes).abs().max()) <= ATOL["boxes"]
        assert float((states.corners[i] - expected_corners).abs().max()) <= ATOL["corners"]
    expected_pre = torch.cat(
        [ref["dn_pre_outputs"]["pred_boxes"], ref["pre_outputs"]["pred_boxes"]], dim=1
    )
    assert float((states.pre_boxes - expected_pre).abs().max()) <= ATOL["boxes"]


# ---------------------------------------------------------------- BatchNorm in train mode


def test_bn_train_outputs_and_running_stats_match(weights: dict, fixtures_dir: Path) -> None:
    case = _load(fixtures_dir, "train_io_nodn_bntrain.pt")
    model = _model(weights, num_denoising=0, freeze_bn=False)
    outputs, capture = _forward(model, case["images"], targets=case["targets"])
    # Batch statistics amplify rounding: the README measures encoder maps within 2e-4 of float64.
    for name in ("backbone", "encoder"):
        for ours, ref in zip(capture.values[name], case["intermediate"][f"{name}_outs"]):
            assert float((ours.detach() - ref).abs().max()) <= 1e-3 * float(ref.abs().max())
    ours_idx, ref_idx = capture.topk_index, case["intermediate"]["enc_topk_index"]
    _compare_outputs(outputs, case["outputs"], _alignment(ours_idx, ref_idx))
    state = model.state_dict()
    stats = case["bn_running_stats_after"]
    assert len(stats) == 237
    for key, expected in stats.items():
        if expected.dtype == torch.int64:
            assert torch.equal(state[key], expected), key
        else:
            torch.testing.assert_close(state[key], expected, rtol=1e-4, atol=1e-6, msg=key)


# ---------------------------------------------------------------- denoising edge cases


def _targets(*counts: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centres = 0.2 + 0.6 * torch.rand(n, 2, generator=gen)
        sizes = 0.05 + 0.3 * torch.rand(n, 2, generator=gen)
        out.append(
            {
                "labels": torch.randint(0, 80, (n,), generator=gen),
                "boxes": torch.cat([centres, sizes], 1),
            }
        )
    return out


def test_denoising_with_an_image_without_boxes() -> None:
    embed = nn.Embedding(81, 16, padding_idx=80)
    torch.manual_seed(3)
    group = make_denoising_group(_targets(0, 4), 80, 300, embed, num_denoising=100)
    assert group is not None
    assert group.num_queries == 2 * 4 * 25 and group.dn_meta["dn_num_group"] == 25
    positives = group.dn_meta["dn_positive_idx"]
    assert positives[0].numel() == 0 and positives[1].numel() == 100
    # Padding slots stay padding: label num_classes, zero box, zero content.
    assert bool((group.labels[0] == 80).all()) and float(group.boxes[0].abs().max()) == 0.0
    assert float(group.query_logits[0].detach().abs().max()) == 0.0
    # Positives stay within half a box size of their GT, negatives move further on average.
    gt = _targets(0, 4)[1]["boxes"]
    slots = torch.arange(200) % 8
    shift = (group.boxes[1] - gt[slots % 4]).abs()[:, :2]
    assert float(shift[slots < 4].mean()) < float(shift[slots >= 4].mean())
    mask = group.attn_mask
    assert mask is not None and mask.shape == (500, 500)
    assert bool(mask[200:, :200].all()) and not bool(mask[:, 200:].any())
    assert (
        not bool(mask[8:16, 8:16].any())
        and bool(mask[8:16, :8].all())
        and bool(mask[8:16, 16:200].all())
    )


def test_denoising_on_a_batch_without_boxes_draws_nothing(model_a: DFINE) -> None:
    model = model_a
    state = torch.get_rng_state()
    group = model.decoder.make_denoising(_targets(0, 0))
    assert torch.equal(torch.get_rng_state(), state)
    assert group is not None and group.num_queries == 0 and group.attn_mask is None
    assert group.dn_meta["dn_num_split"] == [0, 300]
    with torch.no_grad():
        outputs = model(torch.rand(1, 3, 320, 320), _targets(0))
    assert outputs["dn_outputs"][0]["pred_logits"].shape == (1, 0, 80)
    assert outputs["dn_meta"]["dn_num_split"] == [0, 300]
    assert outputs["pred_logits"].shape == (1, 300, 80)


def test_denoising_off_and_bad_targets(model_b: DFINE) -> None:
    embed = nn.Embedding(81, 16, padding_idx=80)
    assert make_denoising_group(_targets(2), 80, 300, embed, num_denoising=0) is None
    with pytest.raises(ValueError, match="boxes"):
        make_denoising_group([{"labels": torch.tensor([1])}], 80, 300, embed)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        make_denoising_group(
            [{"labels": torch.tensor([1]), "boxes": torch.zeros(2, 4)}], 80, 300, embed
        )
    with pytest.raises(ValueError, match="one dict per image"):
        model_b(torch.rand(2, 3, 320, 320), _targets(1))
    with pytest.raises(ValueError, match="num_denoising"):
        dfine.build_model("n", num_denoising=-1)


# ---------------------------------------------------------------- all five sizes


def _output_sum(outputs: dict[str, Any]) -> torch.Tensor:
    """A scalar touching every output tensor, so that every head gets a gradient."""
    total = torch.zeros(())
    for _, tensor in _tensor_leaves(outputs):
        if tensor.is_floating_point() and tensor.requires_grad:
            total = total + tensor.float().mean()
    return total


@pytest.mark.parametrize(
    "size",
    [
        "n",
        "s",
        pytest.param("m", marks=pytest.mark.slow),
        pytest.param("l", marks=pytest.mark.slow),
        pytest.param("x", marks=pytest.mark.slow),
    ],
)
def test_every_size_trains_forward_and_backward(size: str) -> None:
    torch.manual_seed(0)
    model = dfine.build_model(size).train()
    cfg = dfine.SIZES[size]
    images = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    outputs = model(images, _targets(2))
    layers = cfg.num_layers
    assert len(outputs["aux_outputs"]) == layers - 1 and len(outputs["dn_outputs"]) == layers
    num_dn = outputs["dn_meta"]["dn_num_split"][0]
    assert num_dn == 2 * 2 * 50
    assert outputs["pred_corners"].shape == (1, NUM_QUERIES, 132)
    assert outputs["dn_pre_outputs"]["pred_boxes"].shape == (1, num_dn, 4)
    _output_sum(outputs).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(bool(torch.isfinite(p.grad).all()) for p in trainable.values())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    backbone_norms = [
        m for m in model.backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))
    ]
    if cfg.freeze_at >= 0:
        # L and X: the stem is frozen and every backbone norm is a FrozenBatchNorm2d (official configs).
        assert {n for n in frozen if n.startswith("backbone.")} == {
            n for n, _ in model.backbone.stem.named_parameters(prefix="backbone.stem")
        }
        assert all(isinstance(m, FrozenBatchNorm2d) for m in backbone_norms)
    else:
        assert frozen == {"decoder.up", "decoder.reg_scale"}
        assert all(isinstance(m, nn.BatchNorm2d) for m in backbone_norms)
