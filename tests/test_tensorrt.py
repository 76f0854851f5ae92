"""The TensorRT path: type-checked against tensorrt-stubs here, run for real where TensorRT is.

TensorRT cannot be installed on a machine without an NVIDIA GPU, so this file has two halves:
- mypy over dfine/backends/tensorrt*.py against the stubs (always runs where mypy and the stubs
  are installed), plus the pure parts (FP32 layer rule, trtexec command, availability check);
- building and running a real engine, skipped with the reason when TensorRT or a GPU is absent.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dfine.backends.tensorrt_backend import (
    TensorRTUnavailableError,
    require_tensorrt,
    tensorrt_available,
)
from dfine.backends.tensorrt_build import (
    fp32_node_names,
    keeps_fp32_onnx,
    keeps_fp32_trt,
    trtexec_command,
)

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_ONNX = "dfine_n_calibrated/dfine_n_calibrated_official.onnx"


# ---- type check against the stubs ----------------------------------------------------------


def _stub_dirs() -> list[Path]:
    """The stub packages tensorrt-stubs installs (``tensorrt/``, ``tensorrt_bindings/``)."""
    found = []
    for name in ("tensorrt", "tensorrt_bindings"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            return []
        folder = Path(next(iter(spec.submodule_search_locations)))
        if not (folder / "__init__.pyi").is_file():
            return []
        found.append(folder)
    return found


@pytest.fixture(scope="module")
def stub_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A patched copy of the stubs that mypy can parse.

    tensorrt-stubs 10.13 ships as plain folders without ``py.typed`` (mypy skips them) and its
    generated ``tensorrt.pyi`` has a few syntax errors (parameters named ``in``, a required
    parameter after defaulted ones). We copy them, fix those lines, and point MYPYPATH there.
    """
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install mypy)")
    dirs = _stub_dirs()
    if not dirs:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    if tensorrt_available():
        pytest.skip("the real TensorRT is installed here; mypy would read it, not the stubs")
    root = tmp_path_factory.mktemp("trt_stubs")
    for folder in dirs:
        target = root / folder.name
        target.mkdir()
        for stub in folder.glob("*.pyi"):
            text = stub.read_text()
            text = re.sub(r"\bin: ", "in_: ", text)
            text = re.sub(r"(\w+: \w+)\) -> IScaleLayer", r"\1 = ...) -> IScaleLayer", text)
            (target / stub.name).write_text(text)
    return root


def _mypy(stub_root: Path, *targets: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    config = stub_root / "mypy.ini"
    # The stubs themselves are not ours to fix: their own errors are ignored, their types used.
    config.write_text(
        "[mypy]\npython_version = 3.11\nignore_missing_imports = True\n"
        "follow_imports = silent\nwarn_unused_ignores = True\n"
        "[mypy-tensorrt.*]\nignore_errors = True\n"
        "[mypy-tensorrt_bindings.*]\nignore_errors = True\n"
    )
    env = {"MYPYPATH": str(stub_root), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        # Own cache dir: results computed with the patched stubs stay out of .mypy_cache.
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--cache-dir",
            str(stub_root / "mypy_cache"),
            "--strict",
            *targets,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def mypy_output(stub_path: Path) -> tuple[int, str]:
    """One mypy run (the stubs take ~10 s to load): our TensorRT modules plus a probe with a
    deliberate misuse of the TensorRT API, which must be reported."""
    probe = stub_path / "probe_misuse.py"
    probe.write_text(
        "import tensorrt as trt\n"
        "builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
        "wrong: int = builder.create_builder_config()\n"
    )
    targets = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "dfine/backends").glob("tensorrt*.py")
    )
    assert len(targets) == 2, targets
    result = _mypy(stub_path, *targets, str(probe))
    return result.returncode, result.stdout + result.stderr


def test_stubs_are_in_force(mypy_output: tuple[int, str]) -> None:
    """Guard against a vacuous pass: the probe's wrong type must be caught via the stubs."""
    _, output = mypy_output
    assert re.search(r"probe_misuse\.py:3: error: .*IBuilderConfig", output), output


def test_tensorrt_modules_type_check_against_stubs(mypy_output: tuple[int, str]) -> None:
    _, output = mypy_output
    errors = [line for line in output.splitlines() if ": error:" in line]
    ours = [line for line in errors if "probe_misuse.py" not in line]
    assert ours == [], output
    assert len(errors) == 1, output


# ---- pure parts ----------------------------------------------------------------------------


def test_availability_check_sees_through_the_stubs() -> None:
    import tensorrt

    real = getattr(tensorrt, "__file__", None) is not None and hasattr(tensorrt, "Builder")
    assert tensorrt_available() is real
    if not real:
        with pytest.raises(TensorRTUnavailableError, match="pip install"):
            require_tensorrt()


@pytest.mark.parametrize(
    ("layer_type", "name", "expected"),
    [
        ("NORMALIZATION", "/model/encoder/encoder.0/layers.0/norm1/LayerNormalization", True),
        ("NORMALIZATION", "anything", True),
        ("SOFTMAX", "/model/decoder/decoder/layers.0/cross_attn/Softmax", True),
        ("REDUCE", "/model/decoder/enc_output/norm/ReduceMean", True),
        ("ELEMENTWISE", "/model/decoder/decoder/layers.2/gateway/norm/Pow", True),
        ("UNARY", "/model/encoder/encoder.0/layers.0/norm2/Sqrt", True),
        ("ELEMENTWISE", "/model/decoder/decoder/layers.0/Add_3", False),
        ("CONVOLUTION", "/model/encoder/input_proj.0/norm/Conv", False),
        ("REDUCE", "/model/decoder/ReduceMax", False),
        ("ELEMENTWISE", "/model/backbone/stem/normalize_Add", False),
    ],
)
def test_fp32_rule_on_layer_names(layer_type: str, name: str, expected: bool) -> None:
    assert keeps_fp32_trt(layer_type, name) is expected


def test_fp32_nodes_of_the_official_export(fixtures_dir: Path) -> None:
    """Opset 16 spells LayerNorm out op by op: every piece of the 12 norms is kept, no conv."""
    path = fixtures_dir / OFFICIAL_ONNX
    names = fp32_node_names(path)
    model = onnx.load(str(path), load_external_data=False)
    ops = {n.name: n.op_type for n in model.graph.node}
    # 12 LayerNorms x 9 ops (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add).
    norm_ops = [n for n in names if ops[n] != "Softmax"]
    assert len(norm_ops) == 12 * 9
    assert sum(ops[n] == "Sqrt" for n in names) == 12  # all 12 Sqrt nodes of the file
    assert sum(ops[n] == "Softmax" for n in names) == sum(v == "Softmax" for v in ops.values())
    assert not any(ops[n] in ("Conv", "Gemm", "MatMul") for n in names)
    assert all(keeps_fp32_onnx(ops[n], n) for n in names)


def test_trtexec_command(fixtures_dir: Path) -> None:
    path = fixtures_dir / OFFICIAL_ONNX
    cmd = trtexec_command(
        path, "/tmp/out dir/n.engine", max_batch=4, opt_batch=2, timing_cache_path="/tmp/tc.bin"
    )
    args = shlex.split(cmd)
    assert args[0] == "trtexec"
    assert f"--onnx={path}" in args
    assert "--saveEngine=/tmp/out dir/n.engine" in args
    assert "--minShapes=images:1x3x640x640,orig_target_sizes:1x2" in args
    assert "--optShapes=images:2x3x640x640,orig_target_sizes:2x2" in args
    assert "--maxShapes=images:4x3x640x640,orig_target_sizes:4x2" in args
    assert "--timingCacheFile=/tmp/tc.bin" in args
    assert "--fp16" in args and "--precisionConstraints=obey" in args
    precisions = next(a for a in args if a.startswith("--layerPrecisions="))
    listed = precisions.split("=", 1)[1].split(",")
    assert len(listed) == len(fp32_node_names(path))
    assert all(item.endswith(":fp32") for item in listed)
    assert "--layerOutputTypes=" + precisions.split("=", 1)[1] in args

    fp32 = shlex.split(trtexec_command(path, "n.engine", fp16=False))
    assert "--fp16" not in fp32 and not any(a.startswith("--layerPrecisions") for a in fp32)
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        trtexec_command(path, "n.engine", opt_batch=9, max_batch=8)


# ---- the real thing ------------------------------------------------------------------------

needs_tensorrt = pytest.mark.skipif(
    not (tensorrt_available() and torch.cuda.is_available()),
    reason="needs the real TensorRT package and a CUDA GPU (this machine has "
    f"TensorRT={tensorrt_available()}, CUDA={torch.cuda.is_available()})",
)


@pytest.fixture(scope="module")
def official_engine(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dfine.backends.tensorrt_build import build_engine

    out = tmp_path_factory.mktemp("trt")
    return build_engine(
        fixtures_dir / OFFICIAL_ONNX,
        out / "n.engine",
        fp16=True,
        max_batch=4,
        timing_cache_path=out / "timing.cache",
    )


@needs_tensorrt
def test_engine_matches_reference(official_engine: Path, fixtures_dir: Path) -> None:
    """FP16 with FP32 norms: the confident detections survive, as a matched set."""
    from scipy.optimize import linear_sum_assignment

    from dfine.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend(official_engine)
    assert backend.input_size_hw == (640, 640)
    assert len(backend.class_names) == 80
    io = torch.load(fixtures_dir / "dfine_n_calibrated/io.pt", weights_only=True)
    labels, boxes, scores = backend(io["images"].cuda(), io["orig_target_sizes"])
    assert labels.shape == (1, 300) and boxes.shape == (1, 300, 4) and scores.shape == (1, 300)
    ref_boxes = io["boxes"][0].numpy()
    cost = np.abs(boxes[0][:, None] - ref_boxes[None]).sum(-1)
    cost += 1e6 * (labels[0][:, None] != io["labels"][0].numpy()[None])
    rows, cols = linear_sum_assignment(cost)
    same_label = labels[0][rows] == io["labels"][0].numpy()[cols]
    # FP16 tolerance: most detections keep their label, boxes within a pixel or two.
    assert same_label.mean() > 0.9
    assert np.median(np.abs(boxes[0][rows] - ref_boxes[cols])[same_label]) < 1.0
    assert np.abs(scores[0][rows] - io["scores"][0].numpy()[cols])[same_label].max() < 5e-3

    # Outputs are the caller's: a second call does not change the first call's arrays.
    first = boxes.copy()
    backend(torch.zeros_like(io["images"]).cuda(), io["orig_target_sizes"])
    np.testing.assert_array_equal(boxes, first)

    # Any batch in the profile runs.
    batch = io["images"].repeat(3, 1, 1, 1).cuda()
    labels3, _, _ = backend(batch, io["orig_target_sizes"].repeat(3, 1))
    assert labels3.shape == (3, 300)
