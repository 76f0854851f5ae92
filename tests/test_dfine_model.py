"""The D-FINE-N port against the official implementation's saved outputs.

Fixtures (../shared/fixtures, see their READMEs): ``dfine_n_calibrated`` holds a checkpoint
whose EMA weights make every part of the network active, and the official float32 outputs on
one 640x640 image; ``dfine_n_random`` holds the official outputs of the same input through the
checkpoint's non-EMA (``model``) weights, a degenerate network full of near-ties.

Near-ties: two queries of the calibrated fixture have encoder scores closer than float32
rounding noise, so a correct port may select them in the other order. Raw outputs are
therefore compared query by query (aligned by the selected anchor index), and the final
detections as a one-to-one matched set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import dfine
from dfine.model import DFINE

CHECKPOINT = "dfine_n_calibrated/dfine_n_calibrated.pth"


def _load_io(fixtures_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(fixtures_dir / name / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def n_model(fixtures_dir: Path) -> DFINE:
    model = dfine.build_model("n")
    dfine.load_checkpoint(model, fixtures_dir / CHECKPOINT)
    return model.eval()


@pytest.fixture(scope="module")
def calibrated(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return _load_io(fixtures_dir, "dfine_n_calibrated")


@pytest.fixture(scope="module")
def run(n_model: DFINE, calibrated: dict[str, torch.Tensor]) -> dict[str, object]:
    """The model's intermediate and final tensors on the fixture image, computed once."""
    with torch.no_grad():
        backbone = n_model.backbone(calibrated["images"])
        encoder = n_model.encoder(backbone)
        memory, shapes = n_model.decoder.flatten_features(encoder)
        _, _, topk_index = n_model.decoder.select_queries(memory, shapes)
        outputs = n_model.decoder(encoder)
    return {"backbone": backbone, "encoder": encoder, "topk_index": topk_index, "outputs": outputs}


def matched_set_errors(
    ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ours: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[int, float, float]:
    """Match detections of one image one-to-one (L1 box distance, labels must agree).

    Returns (label mismatches, worst matched box |Δ| in px, worst matched score |Δ|).
    """
    ref_l, ref_b, ref_s = (t.numpy() for t in ref)
    our_l, our_b, our_s = (t.numpy() for t in ours)
    cost = np.abs(ref_b[:, None, :] - our_b[None, :, :]).sum(-1) + 1e6 * (
        ref_l[:, None] != our_l[None, :]
    )
    rows, cols = linear_sum_assignment(cost)
    assert len(rows) == len(ref_l) == len(our_l)
    return (
        int((ref_l[rows] != our_l[cols]).sum()),
        float(np.abs(ref_b[rows] - our_b[cols]).max()),
        float(np.abs(ref_s[rows] - our_s[cols]).max()),
    )


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("level", [0, 1])
def test_backbone_outputs_match(run: dict, calibrated: dict, level: int) -> None:
    ref = calibrated[f"backbone_out_{level}"]
    assert run["backbone"][level].shape == ref.shape
    assert _relative_error(run["backbone"][level], ref) <= 1e-3


@pytest.mark.parametrize("level", [0, 1])
def test_encoder_outputs_match(run: dict, calibrated: dict, level: int) -> None:
    ref = calibrated[f"encoder_out_{level}"]
    assert run["encoder"][level].shape == ref.shape
    assert _relative_error(run["encoder"][level], ref) <= 1e-3


def test_query_selection_matches_up_to_near_ties(run: dict, calibrated: dict) -> None:
    ours, ref = run["topk_index"][0], calibrated["enc_topk_index"][0]
    assert sorted(ours.tolist()) == sorted(ref.tolist())
    # Only adjacent near-tied pairs may swap (2 positions measured against torch 2.13).
    assert int((ours != ref).sum()) <= 6


def test_raw_outputs_match_query_by_query(run: dict, calibrated: dict) -> None:
    ours_idx, ref_idx = run["topk_index"][0], calibrated["enc_topk_index"][0]
    # Decoder queries are permutation-equivariant: align ours to the reference order.
    position = {int(a): i for i, a in enumerate(ours_idx)}
    order = torch.tensor([position[int(a)] for a in ref_idx])
    logits = run["outputs"]["pred_logits"][0, order]
    boxes = run["outputs"]["pred_boxes"][0, order]
    assert float((logits - calibrated["pred_logits"][0]).abs().max()) <= 1e-3
    assert float((boxes - calibrated["pred_boxes"][0]).abs().max()) <= 1e-4
    # Where the selection order agrees, the raw outputs agree position by position.
    same = ours_idx == ref_idx
    assert (
        float(
            (run["outputs"]["pred_logits"][0, same] - calibrated["pred_logits"][0, same])
            .abs()
            .max()
        )
        <= 1e-3
    )


def test_forward_equals_parts(n_model: DFINE, run: dict, calibrated: dict) -> None:
    with torch.no_grad():
        outputs = n_model(calibrated["images"])
    assert torch.equal(outputs["pred_logits"], run["outputs"]["pred_logits"])
    assert torch.equal(outputs["pred_boxes"], run["outputs"]["pred_boxes"])


def test_deploy_outputs_match_as_a_set(run: dict, calibrated: dict) -> None:
    labels, boxes, scores = dfine.PostProcessor(80, 300)(
        run["outputs"], calibrated["orig_target_sizes"]
    )
    assert labels.shape == (1, 300) and labels.dtype == torch.int64
    assert boxes.shape == (1, 300, 4) and scores.shape == (1, 300)
    ref = (calibrated["labels"][0], calibrated["boxes"][0], calibrated["scores"][0])
    mismatches, box_err, score_err = matched_set_errors(ref, (labels[0], boxes[0], scores[0]))
    assert mismatches == 0
    assert box_err <= 0.01
    assert score_err <= 1e-5


def test_postprocessor_alone_reproduces_deploy_outputs(calibrated: dict) -> None:
    outputs = {
        "pred_logits": calibrated["deploy_pred_logits"],
        "pred_boxes": calibrated["deploy_pred_boxes"],
    }
    labels, boxes, scores = dfine.PostProcessor()(outputs, calibrated["orig_target_sizes"])
    torch.testing.assert_close(scores, calibrated["scores"], rtol=0, atol=1e-7)
    # Exactly tied scores may come out in either order; elsewhere positions must agree.
    s = calibrated["scores"][0]
    tied = torch.zeros_like(s, dtype=torch.bool)
    tied[1:] |= s[1:] == s[:-1]
    tied[:-1] |= s[:-1] == s[1:]
    assert torch.equal(labels[0, ~tied], calibrated["labels"][0, ~tied])
    torch.testing.assert_close(boxes[0, ~tied], calibrated["boxes"][0, ~tied], rtol=0, atol=1e-4)
    ref = (calibrated["labels"][0], calibrated["boxes"][0], calibrated["scores"][0])
    assert matched_set_errors(ref, (labels[0], boxes[0], scores[0]))[0] == 0


def test_boxes_are_scaled_by_width_then_height_and_not_clipped() -> None:
    outputs = {
        "pred_logits": torch.tensor([[[5.0, -5.0], [-6.0, 4.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.0, 1.0, 0.5, 0.5]]]),
    }
    labels, boxes, scores = dfine.PostProcessor(num_classes=2, num_top_queries=3)(
        outputs, torch.tensor([[200, 100]])
    )
    assert labels.tolist() == [[0, 1, 1]]
    torch.testing.assert_close(boxes[0, 0], torch.tensor([80.0, 30.0, 120.0, 70.0]))
    torch.testing.assert_close(boxes[0, 1], torch.tensor([-50.0, 75.0, 50.0, 125.0]))
    torch.testing.assert_close(boxes[0, 2], boxes[0, 0])  # the same query, its second class
    assert bool((scores[0, :-1] >= scores[0, 1:]).all())


def test_non_ema_weights_match_the_random_fixture(
    fixtures_dir: Path, tmp_path: Path, run: dict
) -> None:
    checkpoint = torch.load(fixtures_dir / CHECKPOINT, weights_only=True)
    model_only = tmp_path / "model_only.pth"
    torch.save({"model": checkpoint["model"]}, model_only)
    model = dfine.build_model("n")
    dfine.load_checkpoint(model, model_only)
    io = _load_io(fixtures_dir, "dfine_n_random")
    with torch.no_grad():
        outputs = model.eval()(io["images"])
    labels, boxes, scores = dfine.PostProcessor()(outputs, io["orig_target_sizes"])
    mismatches, box_err, score_err = matched_set_errors(
        (io["labels"][0], io["boxes"][0], io["scores"][0]), (labels[0], boxes[0], scores[0])
    )
    assert mismatches == 0 and box_err <= 0.01 and score_err <= 1e-5
    # Same image as the calibrated fixture: the EMA weights (preferred by default) differ.
    assert float((outputs["pred_logits"] - run["outputs"]["pred_logits"]).abs().max()) > 0.1


@pytest.mark.parametrize("height, width", [(320, 320), (480, 640)])
def test_other_sizes_and_batches_match_single_images(
    n_model: DFINE, height: int, width: int
) -> None:
    images = torch.rand(
        3, 3, height, width, generator=torch.Generator().manual_seed(height + width)
    )
    with torch.no_grad():
        batch = n_model(images)
        singles = [n_model(images[i : i + 1]) for i in range(3)]
    assert batch["pred_logits"].shape == (3, 300, 80)
    assert batch["pred_boxes"].shape == (3, 300, 4)
    for i, single in enumerate(singles):
        # As sets of queries: a batched kernel may round differently, which can swap two
        # near-tied queries in the top-k order (seen on Intel Xeon hosts) or, at the selection
        # boundary, exchange one for another. Every other query must be the same to 1e-4.
        ours = torch.cat([single["pred_logits"][0], single["pred_boxes"][0]], dim=1)
        theirs = torch.cat([batch["pred_logits"][i], batch["pred_boxes"][i]], dim=1)
        nearest = torch.cdist(ours, theirs, p=float("inf")).min(dim=1).values
        assert (nearest <= 1e-4).sum() >= ours.shape[0] - 2, nearest.max()


def test_anchors_follow_the_input_size(n_model: DFINE) -> None:
    anchors, valid = n_model.decoder.anchors_for(
        [(10, 10), (5, 5)], torch.device("cpu"), torch.float32
    )
    assert anchors.shape == (1, 125, 4) and valid.shape == (1, 125, 1)
    # At 640x640 the computed anchors equal the buffers saved in the official checkpoint.
    anchors, valid = n_model.decoder.anchors_for(
        [(40, 40), (20, 20)], torch.device("cpu"), torch.float32
    )
    assert torch.equal(valid, n_model.decoder.valid_mask)
    # Equal to the last bit where the checkpoint was made; another CPU's libm may round the
    # logit's log one ulp apart (seen on Intel Xeon hosts).
    torch.testing.assert_close(anchors, n_model.decoder.anchors, rtol=0, atol=1e-6)


def test_input_size_not_a_multiple_of_32_is_refused(n_model: DFINE) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        n_model(torch.zeros(1, 3, 320, 330))


def test_deploy_drops_unused_layers_and_keeps_outputs(
    fixtures_dir: Path, calibrated: dict, run: dict
) -> None:
    model = dfine.build_model("n")
    dfine.load_checkpoint(model, fixtures_dir / CHECKPOINT)
    model.decoder.eval_idx = 1  # pretend eval_idx = -2 so that deploy has a layer to drop
    with torch.no_grad():
        before = model.eval()(calibrated["images"])
        # The dropping alone (bit-exact); deploy() also fuses: see tests/test_dfine_fused.py.
        model.decoder.drop_unused_layers()
        after = model(calibrated["images"])
    assert len(model.decoder.decoder.layers) == 2 and len(model.decoder.dec_bbox_head) == 2
    assert torch.equal(before["pred_logits"], after["pred_logits"])
    assert not torch.allclose(before["pred_logits"], run["outputs"]["pred_logits"])
