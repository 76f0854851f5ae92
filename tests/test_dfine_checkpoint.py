"""Building every official size, and loading checkpoints: layouts, EMA preference, wrong files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dfine
from dfine.checkpoint import state_dict_signature

CHECKPOINT = "dfine_n_calibrated/dfine_n_calibrated.pth"

# The official models' counts, all decoder layers included (bench/params.py prints them).
OFFICIAL_PARAMS = {
    "n": 3_782_693,
    "s": 10_321_877,
    "m": 19_590_064,
    "l": 31_244_152,
    "x": 62_621_560,
}


@pytest.fixture(scope="module")
def official(fixtures_dir: Path) -> dict:
    return torch.load(fixtures_dir / CHECKPOINT, weights_only=True)


@pytest.mark.parametrize("size", list(OFFICIAL_PARAMS))
def test_every_size_builds_with_the_official_parameter_count(size: str) -> None:
    model = dfine.build_model(size)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[size]
    sig = state_dict_signature(model.state_dict())
    assert sig is not None and sig.size_name() == size and sig.num_classes == 80


@pytest.mark.parametrize("size", ["l", "x"])
def test_large_sizes_have_frozen_backbone_norms(size: str) -> None:
    # The official L/X checkpoints store backbone norms as buffers without a batch counter.
    model = dfine.build_model(size)
    state = model.state_dict()
    params = dict(model.named_parameters())
    assert "backbone.stem.stem1.bn.weight" in state
    assert "backbone.stem.stem1.bn.weight" not in params
    assert "backbone.stem.stem1.bn.num_batches_tracked" not in state
    assert "backbone.stem.stem1.lab.scale" not in state  # no learnable affine in B4/B5


def test_n_structure_matches_the_official_keys(official: dict) -> None:
    model = dfine.build_model("n")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in official["ema"]["module"].items()}
    assert ours == theirs


def test_class_count_changes_only_the_heads() -> None:
    model = dfine.build_model("s", num_classes=365)
    assert model.decoder.enc_score_head.out_features == 365
    assert all(h.out_features == 365 for h in model.decoder.dec_score_head)
    assert model.decoder.denoising_class_embed.num_embeddings == 366


@pytest.mark.parametrize("size", ["q", "", "nano", "B0"])
def test_unknown_size_is_refused_naming_the_valid_ones(size: str) -> None:
    with pytest.raises(ValueError, match="valid sizes: n, s, m, l, x"):
        dfine.build_model(size)


def test_ema_is_preferred_and_model_only_files_load(
    official: dict, tmp_path: Path, fixtures_dir: Path
) -> None:
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    model = dfine.build_model("n")

    def logits(path: Path) -> torch.Tensor:
        dfine.load_checkpoint(model, path)
        with torch.no_grad():
            return model.eval()(images)["pred_logits"]

    torch.save({"model": official["model"]}, tmp_path / "model.pth")
    torch.save({"ema": {"module": official["ema"]["module"], "updates": 0}}, tmp_path / "ema.pth")
    torch.save(official["ema"]["module"], tmp_path / "bare.pth")
    full = logits(fixtures_dir / CHECKPOINT)
    assert torch.equal(full, logits(tmp_path / "ema.pth"))
    assert torch.equal(full, logits(tmp_path / "bare.pth"))
    assert not torch.allclose(full, logits(tmp_path / "model.pth"), atol=1e-2)


def test_a_checkpoint_trained_at_another_resolution_loads(official: dict, tmp_path: Path) -> None:
    # Anchor buffers follow the training size (320x320 here); they carry no weights.
    state = dict(official["ema"]["module"])
    state["decoder.anchors"] = torch.zeros(1, 500, 4)
    state["decoder.valid_mask"] = torch.ones(1, 500, 1, dtype=torch.bool)
    torch.save({"model": state}, tmp_path / "n320.pth")
    model = dfine.build_model("n")
    dfine.load_checkpoint(model, tmp_path / "n320.pth")
    assert model.decoder.anchors.shape == (1, 500, 4)


def test_an_input_too_small_for_the_queries_is_refused() -> None:
    # 64x64 gives 4x4 + 2x2 cells for N: fewer anchors than its 300 queries.
    with pytest.raises(ValueError, match="fewer than the 300 queries"):
        dfine.build_model("n").eval()(torch.zeros(1, 3, 64, 64))


def _assert_one_line(message: str, *fragments: str) -> None:
    assert "\n" not in message
    assert len(message) < 400
    for fragment in fragments:
        assert fragment in message


def test_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    with pytest.raises(dfine.CheckpointError) as info:
        dfine.load_checkpoint(dfine.build_model("n"), path)
    _assert_one_line(str(info.value), "notes.pth", "not a PyTorch checkpoint")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(dfine.CheckpointError, match="does not exist"):
        dfine.load_checkpoint(dfine.build_model("n"), tmp_path / "nothing.pth")


def test_dict_without_weights_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "random.pt"
    torch.save({"epoch": 3, "loss": torch.rand(4), "config": {"lr": 0.1}}, path)
    with pytest.raises(dfine.CheckpointError) as info:
        dfine.load_checkpoint(dfine.build_model("n"), path)
    _assert_one_line(str(info.value), "no model weights", "epoch")


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    with pytest.raises(dfine.CheckpointError) as info:
        dfine.load_checkpoint(dfine.build_model("n"), path)
    _assert_one_line(str(info.value), "not a D-FINE checkpoint")


def test_checkpoint_of_another_size_is_refused(fixtures_dir: Path) -> None:
    model = dfine.build_model("s")
    before = model.decoder.enc_score_head.weight.clone()
    with pytest.raises(dfine.CheckpointError) as info:
        dfine.load_checkpoint(model, fixtures_dir / CHECKPOINT)
    _assert_one_line(
        str(info.value), "is for D-FINE-N with 80 classes", "model is D-FINE-S with 80 classes"
    )
    assert torch.equal(before, model.decoder.enc_score_head.weight)  # left untouched


def test_checkpoint_with_another_class_count_is_refused(fixtures_dir: Path) -> None:
    with pytest.raises(dfine.CheckpointError) as info:
        dfine.load_checkpoint(dfine.build_model("n", num_classes=20), fixtures_dir / CHECKPOINT)
    _assert_one_line(
        str(info.value),
        "is for D-FINE-N with 80 classes",
        "model is D-FINE-N with 20 classes",
        "build_model('n', num_classes=80)",
    )


def test_same_architecture_with_different_keys_gives_one_line(
    official: dict, tmp_path: Path
) -> None:
    state = dict(official["ema"]["module"])
    del state["decoder.query_pos_head.layers.0.weight"]
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "edited.pth")
    with pytest.raises(dfine.CheckpointError) as info:
        dfine.load_checkpoint(dfine.build_model("n"), tmp_path / "edited.pth")
    _assert_one_line(str(info.value), "1 missing keys", "query_pos_head", "1 unexpected keys")
