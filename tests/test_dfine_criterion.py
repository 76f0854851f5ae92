"""The D-FINE loss (matcher + criterion) against the official training code's saved numbers.

Fixture ``../shared/fixtures/dfine_n_train`` (see its README): the official train-mode outputs
of D-FINE-N on two images, with and without denoising, the official loss dict, the matcher's
indices and the gradient norms. The official criterion writes into the outputs dicts, so the
fixture README says to hand it a deep copy; ours must not need one, which one test checks.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import dfine
from dfine.criterion import Criterion, LossInputError, edge_targets, go_union
from dfine.fdr import weighting_function
from dfine.matcher import HungarianMatcher

TRAIN_FIXTURE = "dfine_n_train"
CHECKPOINT = "dfine_n_calibrated/dfine_n_calibrated.pth"
CASES = ["train_io_nodn.pt", "train_io.pt", "train_io_nodn_bntrain.pt"]

# The official criterion replayed in float64 differs from its float32 run by <= 1e-6 relative
# per term; the README suggests 1e-5 relative or 2e-6 absolute for an independent port.
LOSS_RTOL, LOSS_ATOL = 1e-5, 2e-6


def _load(fixtures_dir: Path, name: str) -> dict:
    return torch.load(fixtures_dir / TRAIN_FIXTURE / name, weights_only=True)


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest, fixtures_dir: Path) -> dict:
    return _load(fixtures_dir, request.param)


def _pairs(indices) -> list[set[tuple[int, int]]]:
    return [set(zip(p.tolist(), g.tolist())) for p, g in indices]


def _assert_same_indices(ours, ref, what: str) -> None:
    assert len(ours) == len(ref), what
    for b, ((p, g), (rp, rg)) in enumerate(zip(ours, ref)):
        assert p.dtype == g.dtype == torch.int64, what
        assert torch.equal(p, rp) and torch.equal(g, rg), (
            f"{what}, image {b}: {p}, {g} vs {rp}, {rg}"
        )


def _relative_errors(
    losses: dict[str, torch.Tensor], reference: dict[str, float]
) -> dict[str, float]:
    return {
        k: abs(losses[k].item() - v) / max(abs(v), LOSS_ATOL / LOSS_RTOL)
        for k, v in reference.items()
    }


# ---------------------------------------------------------------------------- official parity


def test_loss_terms_and_total_match_official(case: dict) -> None:
    losses = Criterion(num_classes=80)(copy.deepcopy(case["outputs"]), case["targets"])
    assert list(losses) == case["loss_keys"]
    errors = _relative_errors(losses, case["loss_dict_float"])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= LOSS_RTOL, (
        f"{worst}: {losses[worst].item()} vs {case['loss_dict_float'][worst]}"
    )
    total = sum(losses.values())
    assert total.item() == pytest.approx(case["total_loss_float"], rel=LOSS_RTOL)
    if "loss_ddf_dn_2" in losses:  # the last denoising layer is its own teacher
        assert losses["loss_ddf_dn_2"].item() == 0.0
    # Every other term carries signal in this fixture (a port that drops one would show it).
    assert all(v.item() > 0 for k, v in losses.items() if k != "loss_ddf_dn_2")


def test_matcher_indices_match_official(case: dict) -> None:
    matching = Criterion().match(case["outputs"], case["targets"])
    ref = case["matcher"]
    _assert_same_indices(matching.main, ref["main"], "main")
    for i, (ours, theirs) in enumerate(zip(matching.aux, ref["aux"], strict=True)):
        _assert_same_indices(ours, theirs, f"aux {i}")
    _assert_same_indices(matching.pre, ref["pre"], "pre")
    for i, (ours, theirs) in enumerate(zip(matching.enc, ref["enc"], strict=True)):
        _assert_same_indices(ours, theirs, f"enc {i}")
    # The order of the official union is an artefact of its implementation: compare as sets.
    assert _pairs(matching.go) == _pairs(ref["go"])
    assert matching.num_boxes == ref["num_boxes"]
    assert matching.num_boxes_go == ref["num_boxes_go"]
    if "dn" in ref:
        _assert_same_indices(matching.dn, ref["dn"], "dn")
    else:
        assert matching.dn is None


def test_second_call_on_the_same_dicts_gives_the_same_losses(fixtures_dir: Path) -> None:
    data = _load(fixtures_dir, "train_io.pt")
    outputs, targets = data["outputs"], data["targets"]
    keys_before = {k: sorted(v) for k, v in _nested_dicts(outputs)}
    criterion = Criterion()
    first = criterion(outputs, targets)
    second = criterion(outputs, targets)
    assert {k: sorted(v) for k, v in _nested_dicts(outputs)} == keys_before
    assert all(torch.equal(first[k], second[k]) for k in first)


def _nested_dicts(outputs: dict):
    yield "", outputs
    for key in ("aux_outputs", "enc_aux_outputs", "dn_outputs"):
        for i, layer in enumerate(outputs.get(key, [])):
            yield f"{key}.{i}", layer


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "name, num_denoising",
    [("train_io_nodn.pt", 0), pytest.param("train_io.pt", 100, marks=pytest.mark.slow)],
)
def test_gradient_norms_match_official(fixtures_dir: Path, name: str, num_denoising: int) -> None:
    data = _load(fixtures_dir, name)
    model = dfine.build_model("n", num_denoising=num_denoising)
    dfine.load_checkpoint(model, fixtures_dir / CHECKPOINT)
    model.train()
    for module in model.modules():  # the fixture's mode: BatchNorm on its running statistics
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    torch.manual_seed(0)  # the fixture's forward seed; only the denoising group draws from it
    outputs = model(data["images"], data["targets"])
    losses = Criterion()(outputs, data["targets"])
    assert list(losses) == data["loss_keys"]
    sum(losses.values()).backward()

    params = dict(model.named_parameters())
    reference = {**data["grad_norms"], **data["grad_norms_extra"]}
    errors = {k: abs(params[k].grad.norm().item() - v) / v for k, v in reference.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-3, f"{worst}: relative error {errors[worst]:.2e}"
    grads = [p.grad for p in params.values() if p.grad is not None]
    assert len(grads) == data["params_with_grad"]
    global_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    assert global_norm == pytest.approx(data["global_grad_norm"], rel=1e-3)


# ---------------------------------------------------------------------------- empty targets


def _with_grad(outputs: dict) -> tuple[dict, list[torch.Tensor]]:
    """A copy of ``outputs`` whose float tensors are leaves that require grad."""
    leaves: list[torch.Tensor] = []

    def leaf(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 1:
            tensor = value.detach().clone().requires_grad_(True)
            leaves.append(tensor)
            return tensor
        if isinstance(value, dict):
            return {k: leaf(v) for k, v in value.items()}
        if isinstance(value, list):
            return [leaf(v) for v in value]
        return value

    return leaf(outputs), leaves


@pytest.mark.parametrize("empty_images", [[1], [0, 1]])
def test_images_without_boxes_give_finite_losses_and_gradients(
    fixtures_dir: Path, empty_images: list[int]
) -> None:
    data = _load(fixtures_dir, "train_io_nodn.pt")
    targets = [
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
        if b in empty_images
        else t
        for b, t in enumerate(data["targets"])
    ]
    outputs, leaves = _with_grad(data["outputs"])
    criterion = Criterion()
    losses = criterion(outputs, targets)
    assert list(losses) == data["loss_keys"]
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves if t.grad is not None)
    # Empty images are negatives: their classification loss is still there.
    assert losses["loss_vfl"].item() > 0
    matching = criterion.match(outputs, targets)
    assert all(len(matching.go[b][0]) == 0 for b in empty_images)
    if len(empty_images) == len(targets):
        assert (
            losses["loss_bbox"].item()
            == losses["loss_giou"].item()
            == losses["loss_fgl"].item()
            == 0.0
        )
        assert matching.num_boxes == matching.num_boxes_go == 1.0


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value


def test_half_precision_outputs_are_scored_in_float32(fixtures_dir: Path) -> None:
    # AMP hands the loss bfloat16/float16 outputs; the criterion must compute in float32, so
    # it gives exactly the losses of the same (rounded) values given as float32.
    data = _load(fixtures_dir, "train_io.pt")
    half = _cast(data["outputs"], torch.bfloat16)
    criterion = Criterion()
    from_half = criterion(half, data["targets"])
    from_float = criterion(_cast(half, torch.float32), data["targets"])
    assert list(from_half) == data["loss_keys"]
    assert all(v.dtype == torch.float32 for v in from_half.values())
    assert all(torch.equal(from_half[k], from_float[k]) for k in from_float)
    # bfloat16 keeps ~3 significant digits of the official outputs; the losses stay close.
    errors = _relative_errors(from_half, {k: v for k, v in data["loss_dict_float"].items() if v})
    assert max(errors.values()) < 0.1


def test_batch_without_boxes_and_an_empty_denoising_group_is_finite(fixtures_dir: Path) -> None:
    # A model may build a denoising group of 0 groups when no image has a box: the denoising
    # terms must then be 0, not 0 / 0.
    data = _load(fixtures_dir, "train_io.pt")
    outputs = copy.deepcopy(data["outputs"])
    outputs["dn_outputs"] = [
        {k: v[:, :0] for k, v in layer.items()} for layer in outputs["dn_outputs"]
    ]
    outputs["dn_pre_outputs"] = {k: v[:, :0] for k, v in outputs["dn_pre_outputs"].items()}
    empty = torch.zeros(0, dtype=torch.int64)
    outputs["dn_meta"] = {
        "dn_positive_idx": [empty, empty],
        "dn_num_group": 0,
        "dn_num_split": [0, 300],
    }
    targets = [{"labels": empty, "boxes": torch.zeros(0, 4)} for _ in range(2)]
    losses = Criterion()(outputs, targets)
    assert list(losses) == data["loss_keys"]
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert all(v.item() == 0.0 for k, v in losses.items() if "_dn_" in k)


# ---------------------------------------------------------------------------- the matcher


def test_matcher_cost_of_a_hand_checkable_pair() -> None:
    # Logit 0 -> p = 0.5: focal cost = 0.25 * 0.25 * ln 2 - 0.75 * 0.25 * ln 2 = -0.125 ln 2.
    # Identical boxes: L1 = 0, GIoU = 1. Total = 2 * (-0.125 ln 2) + 5 * 0 + 2 * (-1).
    matcher = HungarianMatcher()
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    cost = matcher.cost_matrix(torch.zeros(1, 3), box, torch.tensor([1]), box)
    assert cost.item() == pytest.approx(-0.25 * math.log(2) - 2.0, abs=1e-6)
    # Disjoint boxes: L1 = |0.5-0.1| + |0.5-0.1| = 0.8; GIoU = 0 - (hull - union) / hull.
    other = torch.tensor([[0.1, 0.1, 0.2, 0.2]])
    hull, union = 0.6 * 0.6, 2 * 0.04
    expected = -0.25 * math.log(2) + 5 * 0.8 + 2 * ((hull - union) / hull)
    assert matcher.cost_matrix(
        torch.zeros(1, 3), box, torch.tensor([1]), other
    ).item() == pytest.approx(expected, abs=1e-5)


def test_matcher_finds_the_optimal_not_the_greedy_assignment() -> None:
    # Query 0 is the closest box to both GTs and closest of all to GT 0, so a greedy match
    # (cheapest pair first) gives it GT 0 and leaves GT 1 with query 1, far away. The optimum
    # gives query 0 to GT 1 and query 1 to GT 0; query 2 is far from both.
    gt_boxes = torch.tensor([[0.30, 0.30, 0.20, 0.20], [0.36, 0.30, 0.20, 0.20]])
    pred_boxes = torch.tensor(
        [[0.32, 0.30, 0.20, 0.20], [0.25, 0.30, 0.20, 0.20], [0.80, 0.80, 0.10, 0.10]]
    )
    outputs = {"pred_logits": torch.zeros(1, 3, 4), "pred_boxes": pred_boxes[None]}
    targets = [{"labels": torch.tensor([2, 2]), "boxes": gt_boxes}]
    matcher = HungarianMatcher()
    [(pred_idx, gt_idx)] = matcher(outputs, targets)
    assert pred_idx.tolist() == [0, 1] and gt_idx.tolist() == [1, 0]
    assert pred_idx.dtype == gt_idx.dtype == torch.int64
    cost = matcher.cost_matrix(
        outputs["pred_logits"][0], pred_boxes, targets[0]["labels"], gt_boxes
    )
    assert cost[0].argmin().item() == 0 and cost[:, 0].argmin().item() == 0  # greedy's first pick
    best = min(
        itertools.permutations(range(3), 2), key=lambda rows: cost[rows[0], 0] + cost[rows[1], 1]
    )
    assert [best.index(q) for q in sorted(best)] == gt_idx.tolist()


def test_matching_several_sets_at_once_equals_one_call_per_set(case: dict) -> None:
    # match_sets scores all sets' queries of an image in one cost matrix; the costs, and so
    # the assignments, must be those of separate calls (sets of another Q and an image
    # without boxes included).
    outputs, targets = case["outputs"], case["targets"]
    sets = [outputs, *outputs["aux_outputs"], outputs["pre_outputs"]]
    # fewer queries than image 0 has GT boxes: only 2 of its 3 GT get one
    sets.append({k: v[:, :2] for k, v in outputs["enc_aux_outputs"][0].items()})
    targets = [targets[0], {"labels": targets[1]["labels"][:0], "boxes": targets[1]["boxes"][:0]}]
    matcher = HungarianMatcher()
    together = matcher.match_sets(sets, targets)
    assert len(together) == len(sets)
    for s, (one_set, alone) in enumerate(zip(sets, together, strict=True)):
        _assert_same_indices(alone, matcher(one_set, targets), f"set {s}")
    assert len(together[-1][0][0]) == 2 and len(targets[0]["labels"]) == 3
    assert all(len(per_set[1][0]) == 0 for per_set in together)


def test_matcher_with_no_ground_truth_matches_nothing() -> None:
    outputs = {"pred_logits": torch.randn(1, 5, 3), "pred_boxes": torch.rand(1, 5, 4) * 0.5 + 0.25}
    [(pred_idx, gt_idx)] = HungarianMatcher()(
        outputs, [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    )
    assert pred_idx.shape == gt_idx.shape == (0,)


def test_go_union_keeps_each_querys_most_frequent_gt() -> None:
    def m(*pairs):
        return [
            (
                torch.tensor([p for p, _ in pairs], dtype=torch.int64),
                torch.tensor([g for _, g in pairs], dtype=torch.int64),
            )
        ]

    # Query 4: GT 1 twice, GT 0 once -> GT 1. Query 7: GT 0 and GT 2 once each -> tie, GT 0.
    union = go_union([m((4, 1), (7, 2)), m((4, 0), (9, 2)), m((4, 1), (7, 0))])
    assert union[0][0].tolist() == [4, 7, 9] and union[0][1].tolist() == [1, 0, 2]


# ---------------------------------------------------------------------------- FGL targets


def test_edge_targets_put_edges_on_the_right_bins() -> None:
    up, reg_scale, reg_max = torch.tensor([0.5]), torch.tensor([4.0]), 32
    bins = weighting_function(reg_max, up, reg_scale)
    # Dyadic coordinates, so every distance below is exact in float32 (unit = 0.25 / 4).
    ref = torch.tensor([[0.5, 0.5, 0.25, 0.25]] * 3)
    gt = torch.tensor(
        [
            [0.375, 0.375, 0.625, 0.625],  # on the reference: distance 0, the centre bin 16
            [0.0625, 0.0625, 0.9375, 0.9375],  # 5 units outside, beyond the last bin (4)
            [0.484375, 0.484375, 0.515625, 0.515625],  # 1.75 units inside, between bins
        ]
    )
    target = edge_targets(ref, gt, up, reg_scale, reg_max)
    assert target.left_bin.shape == (12,)
    assert (
        target.left_bin[:4].tolist() == [16] * 4 and target.weight_right[:4].tolist() == [0.0] * 4
    )
    assert (
        target.left_bin[4:8].tolist() == [31] * 4 and target.weight_right[4:8].tolist() == [1.0] * 4
    )
    distance = -1.75
    left = int(target.left_bin[8])
    assert bins[left] <= distance < bins[left + 1]
    expected_right = (distance - bins[left].item()) / (bins[left + 1] - bins[left]).item()
    assert target.weight_right[8].item() == pytest.approx(expected_right, abs=1e-5)
    assert torch.allclose(target.weight_left + target.weight_right, torch.ones(12))


# ---------------------------------------------------------------------------- bad input


def test_bad_targets_are_refused_with_one_line(fixtures_dir: Path) -> None:
    data = _load(fixtures_dir, "train_io_nodn.pt")
    bad_label = [dict(t) for t in data["targets"]]
    bad_label[1]["labels"] = torch.tensor([0, 2, 80, 7, 79])
    with pytest.raises(LossInputError, match=r"targets\[1\]\['labels'\].*0\.\.79") as info:
        Criterion()(data["outputs"], bad_label)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    flat_box = [dict(t) for t in data["targets"]]
    flat_box[0]["boxes"] = flat_box[0]["boxes"].clone()
    flat_box[0]["boxes"][2, 3] = 0.0
    with pytest.raises(LossInputError, match=r"targets\[0\]\['boxes'\].*positive"):
        Criterion()(data["outputs"], flat_box)
    with pytest.raises(LossInputError, match=r"num_classes=80"):
        Criterion(num_classes=3)(data["outputs"], data["targets"])
    with pytest.raises(LossInputError, match="one target dict per image"):
        Criterion()(data["outputs"], data["targets"][:1])
