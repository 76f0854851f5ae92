"""The fused deploy form of D-FINE (``DFINE.deploy``, ``dfine.fuse``).

Three kinds of evidence: (1) each fused unit alone equals the unit it replaces in float64 to
~1e-12, with random norm statistics (a default BatchNorm is an identity and would hide a wrong
fold); (2) the fused D-FINE-N passes the same fixture checks as ``tests/test_dfine_model.py``
(the official float32 outputs, near-ties handled the same way); (3) on other inputs, sizes and
batches it agrees with the training form query by query. (A whole-network float64 comparison
would take ~30 s here: torch runs float64 depthwise convs one channel at a time.)
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfine
from dfine.encoder import RepVGGBlock
from dfine.fuse import FusedConv, SelfAttention, ShiftedMax2x2, fuse_network
from dfine.hgnetv2 import ConvBNAct, HGNetv2, pad_bottom_right
from dfine.layers import Activation, ConvNorm, FrozenBatchNorm2d
from dfine.model import DFINE
from matching import match_detections

CHECKPOINT = "dfine_n_calibrated/dfine_n_calibrated.pth"


def _randomise_norms(module: nn.Module, seed: int) -> None:
    """Give every norm non-trivial statistics and affine terms."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.3)


@pytest.fixture(scope="module")
def trained_form(fixtures_dir: Path) -> DFINE:
    model = dfine.build_model("n")
    dfine.load_checkpoint(model, fixtures_dir / CHECKPOINT)
    return model.eval()


@pytest.fixture(scope="module")
def fused(trained_form: DFINE) -> DFINE:
    return copy.deepcopy(trained_form).deploy()


@pytest.fixture(scope="module")
def calibrated(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(fixtures_dir / "dfine_n_calibrated" / "io.pt", weights_only=True)


@pytest.fixture(scope="module")
def run(fused: DFINE, calibrated: dict[str, torch.Tensor]) -> dict[str, object]:
    with torch.inference_mode():
        backbone = fused.backbone(calibrated["images"])
        encoder = fused.encoder(backbone)
        memory, shapes = fused.decoder.flatten_features(encoder)
        _, _, topk_index = fused.decoder.select_queries(memory, shapes)
        outputs = fused.decoder(encoder)
        whole = fused(calibrated["images"])
    return {
        "backbone": backbone,
        "encoder": encoder,
        "topk_index": topk_index,
        "outputs": outputs,
        "whole": whole,
    }


# --- (2) the fixture checks of test_dfine_model, on the fused float32 network --------------


@pytest.mark.parametrize("level", [0, 1])
def test_fused_backbone_and_encoder_match_the_fixture(
    run: dict, calibrated: dict, level: int
) -> None:
    for part in ("backbone", "encoder"):
        ref = calibrated[f"{part}_out_{level}"]
        ours = run[part][level]
        assert ours.shape == ref.shape
        assert float((ours - ref).abs().max() / ref.abs().max()) <= 1e-3


def test_fused_query_selection_matches_up_to_near_ties(run: dict, calibrated: dict) -> None:
    ours, ref = run["topk_index"][0], calibrated["enc_topk_index"][0]
    assert sorted(ours.tolist()) == sorted(ref.tolist())
    assert int((ours != ref).sum()) <= 6  # only adjacent near-tied pairs may swap


def test_fused_raw_outputs_match_query_by_query(run: dict, calibrated: dict) -> None:
    ours_idx, ref_idx = run["topk_index"][0], calibrated["enc_topk_index"][0]
    position = {int(a): i for i, a in enumerate(ours_idx)}
    order = torch.tensor([position[int(a)] for a in ref_idx])
    logits = run["outputs"]["pred_logits"][0, order]
    boxes = run["outputs"]["pred_boxes"][0, order]
    assert float((logits - calibrated["pred_logits"][0]).abs().max()) <= 1e-3
    assert float((boxes - calibrated["pred_boxes"][0]).abs().max()) <= 1e-4
    assert torch.equal(run["whole"]["pred_logits"], run["outputs"]["pred_logits"])


def test_fused_detections_match_the_fixture_as_a_set(run: dict, calibrated: dict) -> None:
    labels, boxes, scores = dfine.PostProcessor(80, 300)(
        run["whole"], calibrated["orig_target_sizes"]
    )
    ref = (
        calibrated["labels"][0].numpy(),
        calibrated["boxes"][0].numpy(),
        calibrated["scores"][0].numpy(),
    )
    report = match_detections(ref, (labels[0].numpy(), boxes[0].numpy(), scores[0].numpy()))
    assert report.label_mismatches == 0
    assert report.max_box_px <= 0.01
    assert report.max_score <= 1e-5


def _parts(model: DFINE, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
    """Encoder maps, the selected cell indices ``(B, Q)`` and the outputs, in one pass."""
    with torch.inference_mode():
        maps = model.encoder(model.backbone(images))
        memory, shapes = model.decoder.flatten_features(maps)
        _, _, topk_index = model.decoder.select_queries(memory, shapes)
        return maps, topk_index, model.decoder(maps)


def _aligned_errors(
    ref_idx: torch.Tensor, ref: dict, idx: torch.Tensor, out: dict, i: int, j: int
) -> tuple[float, float]:
    """Max |Δ| of logits and boxes of image ``i`` of ``ref`` and ``j`` of ``out``, queries
    aligned by selected cell (decoder queries are permutation-equivariant)."""
    position = {int(a): k for k, a in enumerate(idx[j])}
    order = torch.tensor([position[int(a)] for a in ref_idx[i]])
    return (
        float((out["pred_logits"][j, order] - ref["pred_logits"][i]).abs().max()),
        float((out["pred_boxes"][j, order] - ref["pred_boxes"][i]).abs().max()),
    )


def test_fused_matches_training_form_at_another_size_and_batch(
    trained_form: DFINE, fused: DFINE
) -> None:
    images = torch.rand(2, 3, 384, 512, generator=torch.Generator().manual_seed(896))
    ref_maps, ref_idx, ref = _parts(trained_form, images)
    maps, idx, out = _parts(fused, images)
    for a, b in zip(ref_maps, maps):
        assert float((a - b).abs().max() / a.abs().max()) <= 2e-4
    compared = 0
    for i in range(2):
        # A random image has near-tied cells: only the last few selected may differ.
        shared = set(ref_idx[i].tolist()) & set(idx[i].tolist())
        assert len(shared) >= 297
        if len(shared) < 300:
            continue  # the other queries attend differently; nothing to compare one by one
        logits_err, boxes_err = _aligned_errors(ref_idx, ref, idx, out, i, i)
        assert logits_err <= 1e-3 and boxes_err <= 1e-4
        compared += 1
    assert compared >= 1
    # The second image alone gives what it gave in the batch.
    _, single_idx, single = _parts(fused, images[1:])
    assert set(single_idx[0].tolist()) == set(idx[1].tolist())
    logits_err, boxes_err = _aligned_errors(idx, out, single_idx, single, 1, 0)
    assert logits_err <= 1e-3 and boxes_err <= 1e-4


def test_deploy_drops_the_layers_after_eval_idx(fixtures_dir: Path) -> None:
    model = dfine.build_model("n")
    dfine.load_checkpoint(model, fixtures_dir / CHECKPOINT)
    model.decoder.eval_idx = 1  # as if eval_idx were -2, so that there is a layer to drop
    images = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(4))
    _, ref_idx, ref = _parts(model.eval(), images)
    _, idx, out = _parts(model.deploy(), images)
    assert len(model.decoder.decoder.layers) == 2 and len(model.decoder.dec_bbox_head) == 2
    assert set(ref_idx[0].tolist()) == set(idx[0].tolist())
    logits_err, boxes_err = _aligned_errors(ref_idx, ref, idx, out, 0, 0)
    assert logits_err <= 1e-3 and boxes_err <= 1e-4


# --- deploy(): idempotent, loads before, state dict after -----------------------------------


def test_deploy_leaves_the_random_stream_alone(trained_form: DFINE) -> None:
    state = torch.random.get_rng_state()
    copy.deepcopy(trained_form).deploy()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_deploy_is_idempotent(fused: DFINE) -> None:
    again = copy.deepcopy(fused)
    state = {k: v.clone() for k, v in again.state_dict().items()}
    structure = repr(again)
    assert again.deploy() is again and again.deployed
    assert repr(again) == structure
    after = again.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    images = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        a, b = fused(images), again(images)
    assert torch.equal(a["pred_logits"], b["pred_logits"]) and torch.equal(
        a["pred_boxes"], b["pred_boxes"]
    )


def test_deployed_state_dict_and_loading(
    trained_form: DFINE, fused: DFINE, fixtures_dir: Path
) -> None:
    keys, ref_keys = set(fused.state_dict()), set(trained_form.state_dict())
    assert not any(
        k.endswith((".running_mean", ".running_var", ".num_batches_tracked")) for k in keys
    )
    assert not any(".lab." in k or ".bn." in k for k in keys)
    # Each fused conv gains a bias; the RepVGG blocks' two branches become one conv.
    assert "backbone.stem.stem1.conv.bias" in keys and "backbone.stem.stem1.conv.weight" in ref_keys
    assert "encoder.fpn_blocks.0.cv2.0.bottlenecks.0.conv.weight" in keys
    assert "encoder.fpn_blocks.0.cv2.0.bottlenecks.0.conv1.conv.weight" in ref_keys
    assert "encoder.input_proj.0.conv.bias" in keys
    # The attention keeps the nn.MultiheadAttention keys.
    assert "decoder.decoder.layers.0.self_attn.in_proj_weight" in keys
    assert not any(p.requires_grad for p in fused.backbone.parameters())
    with pytest.raises(ValueError, match="inference-only"):
        copy.deepcopy(fused).train()
    # A training-form checkpoint loads only before deploy(), with a message saying so.
    with pytest.raises(ValueError, match="before calling deploy"):
        dfine.load_checkpoint(copy.deepcopy(fused), fixtures_dir / CHECKPOINT)
    # A deployed state dict loads strictly into another deployed network.
    other = dfine.build_model("n").deploy()
    other.load_state_dict(fused.state_dict(), strict=True)
    images = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.equal(other(images)["pred_logits"], fused(images)["pred_logits"])


def test_torch_backend_runs_the_fused_form(fixtures_dir: Path) -> None:
    from dfine.backends.torch_backend import TorchBackend

    backend = TorchBackend.from_checkpoint(fixtures_dir / CHECKPOINT, "n", input_size_hw=(320, 320))
    model = backend._model
    assert isinstance(model, DFINE) and model.deployed
    assert not any(isinstance(m, nn.BatchNorm2d | RepVGGBlock) for m in model.modules())


def test_fused_model_exports_to_onnx(tmp_path: Path, fused: DFINE) -> None:
    ort = pytest.importorskip("onnxruntime")
    from dfine.export import export_onnx

    path = export_onnx(
        copy.deepcopy(fused),
        dfine.PostProcessor(80, 300),
        tmp_path / "fused.onnx",
        imgsz=320,
        dynamic_batch=False,
    )
    images = torch.rand(1, 3, 320, 320, generator=torch.Generator().manual_seed(9))
    sizes = torch.tensor([[640, 480]])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy(), "orig_target_sizes": sizes.numpy()})
    with torch.inference_mode():
        ref = dfine.PostProcessor(80, 300)(fused(images), sizes)
    report = match_detections([t[0].numpy() for t in ref], [np.asarray(g[0]) for g in got])
    assert report.label_mismatches == 0 and report.max_box_px <= 0.01 and report.max_score <= 1e-5


# --- (1) each fused unit alone --------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.3, -0.7, 0.0])
def test_conv_bn_relu_affine_folds_for_any_affine_sign(scale: float) -> None:
    unit = ConvBNAct(6, 8, 3, stride=2, use_lab=True).double().eval()
    _randomise_norms(unit, seed=1)
    with torch.no_grad():
        unit.lab.scale.fill_(scale)
        unit.lab.bias.fill_(-0.4)
    holder = nn.Sequential(unit)
    assert fuse_network(holder) == 1 and isinstance(holder[0], FusedConv)
    x = torch.randn(2, 6, 17, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(holder[0](x), unit(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("frozen", [False, True])
def test_conv_bn_units_fold(frozen: bool) -> None:
    units = nn.Sequential(
        ConvBNAct(4, 8, 1, use_act=False),  # conv + BN only
        ConvBNAct(8, 8, 5, groups=8),  # depthwise + BN + ReLU
        ConvNorm(8, 6, 3, stride=2, act=Activation.SILU),
        nn.Sequential(nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5)),  # an input projection
    )
    if frozen:  # the L and X backbones' buffers-only norms
        for unit in units[:2]:
            unit.bn = FrozenBatchNorm2d(unit.bn.num_features)
    units = units.double().eval()
    _randomise_norms(units, seed=4)
    fused_units = copy.deepcopy(units)
    assert fuse_network(fused_units) == 4
    assert not any(isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d) for m in fused_units.modules())
    assert fuse_network(fused_units) == 0
    x = torch.randn(2, 4, 15, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fused_units(x), units(x), rtol=0, atol=1e-12)


def test_repvgg_block_merges_into_one_conv() -> None:
    block = RepVGGBlock(7, 9, Activation.SILU).double().eval()
    _randomise_norms(block, seed=6)
    holder = nn.Sequential(block)
    fuse_network(holder)
    merged = holder[0]
    assert isinstance(merged, FusedConv) and merged.conv.kernel_size == (3, 3)
    x = torch.randn(1, 7, 11, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), block(x), rtol=0, atol=1e-12)


def test_self_attention_equals_multihead_attention() -> None:
    mha = nn.MultiheadAttention(32, 4, batch_first=True).double().eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    fast = SelfAttention(mha)
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 10, 32, dtype=torch.float64, generator=gen)
    v = torch.randn(2, 10, 32, dtype=torch.float64, generator=gen)
    blocked = torch.rand(10, 10, generator=gen) < 0.3
    blocked.fill_diagonal_(False)
    with torch.no_grad():
        for mask in (None, blocked):
            ref, _ = mha(q, q, v, attn_mask=mask)
            out, weights = fast(q, q, v, attn_mask=mask)
            assert weights is None
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="key to be the query"):
        fast(q, q.clone(), v)


def test_stem_pool_and_padding_give_identical_values() -> None:
    x = torch.randn(2, 5, 9, 12, generator=torch.Generator().manual_seed(10))
    pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        padded = pad_bottom_right(xl)
        assert torch.equal(padded, F.pad(x, (0, 1, 0, 1)))
        assert padded.is_contiguous(memory_format=layout)
        assert torch.equal(ShiftedMax2x2()(padded), pool(F.pad(x, (0, 1, 0, 1))))
        # The training form takes the same path on channels-last maps: gradients agree too.
        leaf = xl.clone().requires_grad_(True)
        weights = torch.rand(padded.shape, generator=torch.Generator().manual_seed(13))
        (pad_bottom_right(leaf) * weights).sum().backward()
        assert leaf.grad is not None and torch.equal(leaf.grad, weights[..., :-1, :-1])


def test_backbone_with_frozen_norms_fuses() -> None:
    """The L/X backbone kind (FrozenBatchNorm2d, no learnable affine), B0-sized for speed."""
    backbone = HGNetv2("B0", (1, 2, 3), use_lab=False, freeze_norm=True).eval()
    _randomise_norms(backbone, seed=11)
    fused_bb = copy.deepcopy(backbone)
    fuse_network(fused_bb)
    assert not any(isinstance(m, FrozenBatchNorm2d | nn.MaxPool2d) for m in fused_bb.modules())
    # float32: torch runs float64 depthwise convs one channel at a time (~20 s here).
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        for a, b in zip(backbone(x), fused_bb(x)):
            assert float((a - b).abs().max() / a.abs().max()) < 1e-5
