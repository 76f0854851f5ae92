"""Bad input is refused before anything starts: one line on stderr, a non-zero exit, in seconds.

Each case is an ordinary mistake made with files made here (videos, checkpoints, ONNX files,
configs, URLs). ``finestream run`` must exit non-zero within seconds, print at most two lines on
stderr and no traceback, and refuse it in the check phase: no start-up line naming the backend
(printed only once the checks pass), no output file created, so no stage thread ran and no
model was loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from pipeline.cli import EXIT_USAGE
from tests.conftest import FIXTURES, REPO
from tests.made_clips import write_clip

CHECKPOINT = FIXTURES / "dfine_n_calibrated" / "dfine_n_calibrated.pth"
OFFICIAL_ONNX = FIXTURES / "dfine_n_calibrated" / "dfine_n_calibrated_official.onnx"
TEACHER = REPO.parent / "shared" / "teachers" / "nanodet_coco_416.onnx"
# Generous for a loaded 2-core machine; a refusal takes well under a second when it is idle.
WITHIN_S = 30.0


def _clip(tmp: Path) -> Path:
    return write_clip(tmp / "ok.mp4", list(range(6)), Fraction(1, 25))


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = (np.sin(np.arange(8000) / 8000 * 2 * np.pi * 440) * 10000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _header_only(tmp: Path) -> Path:
    data = write_clip(
        tmp / "whole.mp4",
        list(range(30)),
        Fraction(1, 25),
        container_options={"movflags": "+faststart"},
    ).read_bytes()
    cut = tmp / "cut.mp4"
    cut.write_bytes(data[: data.find(b"mdat") + 40])  # the index and no picture data
    return cut


def _cut(source: Path, dest: Path, fraction: float) -> Path:
    data = source.read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def _config(tmp: Path, data: object, name: str = "run.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _tensorrt_here() -> bool:
    from dfine.backends.tensorrt_backend import tensorrt_available

    return tensorrt_available()


# name -> (change the base arguments, text expected in the error line)
Case = Callable[[Path, list[str]], list[str]]


def _set(args: list[str], flag: str, value: str) -> list[str]:
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


CASES: dict[str, tuple[Case, str]] = {
    "wrong path": (lambda t, a: _set(a, "--source", str(t / "nope.mp4")), "not found"),
    "directory as source": (lambda t, a: _set(a, "--source", str(t)), "not a file"),
    "empty file": (lambda t, a: _set(a, "--source", str(_touch(t / "empty.mp4"))), "empty"),
    "text file named .mp4": (
        lambda t, a: _set(
            a, "--source", str(_text(t / "notes.mp4", "these are not frames\n" * 50))
        ),
        "cannot open",
    ),
    "audio-only file": (
        lambda t, a: _set(a, "--source", str(_audio_only(t / "tone.wav"))),
        "no video stream",
    ),
    "video cut before its first frame": (
        lambda t, a: _set(a, "--source", str(_header_only(t))),
        "no frame",
    ),
    "bad URL scheme": (
        lambda t, a: _set(a, "--source", "ftp://camera.local/live"),
        "unknown url scheme",
    ),
    "checkpoint of another size": (lambda t, a: _set(a, "--size", "s"), "D-FINE-N"),
    "checkpoint of another class count": (
        lambda t, a: [_config(t, {"model": {"num_classes": 6}}), *a],
        "has 80 classes",
    ),
    "text file named .pth": (
        lambda t, a: _set(a, "--model", str(_text(t / "weights.pth", "no"))),
        "checkpoint",
    ),
    "truncated checkpoint": (
        lambda t, a: _set(a, "--model", str(_cut(CHECKPOINT, t / "half.pth", 0.5))),
        "checkpoint",
    ),
    "truncated .onnx": (
        lambda t, a: _set(a, "--model", str(_cut(OFFICIAL_ONNX, t / "half.onnx", 0.5))),
        "onnx",
    ),
    "text file named .onnx": (
        lambda t, a: _set(a, "--model", str(_text(t / "m.onnx", "not a graph"))),
        "onnx",
    ),
    "unknown model suffix": (
        lambda t, a: _set(a, "--model", str(_text(t / "model.bin", "x"))),
        "unknown file type",
    ),
    "missing model file": (lambda t, a: _set(a, "--model", str(t / "gone.pth")), "not found"),
    "bad YAML key": (
        lambda t, a: [_config(t, {"model": {"treshold": 0.3}}), *a],
        "model.treshold: unknown key",
    ),
    "not YAML": (lambda t, a: [_config(t, "model: [unclosed\n"), *a], "not valid yaml"),
    "missing config": (lambda t, a: [t / "absent.yaml", *a], "config file not found"),
    "negative threshold": (lambda t, a: _set(a, "--threshold", "-0.2"), "score_threshold"),
    "imgsz not a multiple of 32": (lambda t, a: _set(a, "--imgsz", "300"), "multiple of 32"),
    "imgsz against a fixed ONNX": (
        lambda t, a: _set(_set(a, "--model", str(TEACHER)), "--imgsz", "320"),
        "takes 416x416",
    ),
    "class the model lacks": (
        lambda t, a: [_config(t, {"model": {"classes": [85]}}), *a],
        "classes",
    ),
    "tensorrt for a checkpoint": (lambda t, a: _set(a, "--backend", "tensorrt"), "engine"),
}
if not _tensorrt_here():
    CASES["engine without TensorRT"] = (
        lambda t, a: _set(a, "--model", str(_text(t / "m.engine", "not an engine"))),
        "TensorRT is not installed",
    )


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# Runs every case's `finestream run` in one interpreter, one after the other, each with a fresh
# stderr and fresh logging set-up, as a process of its own would have: starting Python and
# importing torch 23 times would cost minutes on a small machine and test nothing more (the
# subprocess tests in test_cli.py cover the process exit itself).
_DRIVER = """
import contextlib, io, json, logging, sys, time, traceback
from pipeline.cli import main
results = []
for args in json.loads(sys.stdin.read()):
    for handler in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(handler)
    err = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = -1
    results.append({"code": code, "stderr": err.getvalue(), "elapsed_s": time.monotonic() - started})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    if not FIXTURES.is_dir():
        pytest.skip(f"model fixtures not found at {FIXTURES}")
    runs, dirs = [], {}
    for case in sorted(CASES):
        tmp = tmp_path_factory.mktemp("bad")
        change, _ = CASES[case]
        base = [
            "run",
            "--no-progress",
            "--source",
            str(_clip(tmp)),
            "--model",
            str(CHECKPOINT),
            "--size",
            "n",
            "--imgsz",
            "320",
            "--jsonl",
            str(tmp / "out" / "o.jsonl"),
        ]
        args = [str(a) for a in change(tmp, base)]
        if args[0] != "run":  # a config path was put first: it goes after the command
            args = ["run", args[0], *[a for a in args[1:] if a != "run"]]
        runs.append(args)
        dirs[case] = tmp
    home = tmp_path_factory.mktemp("home")  # an empty ~/.cache: any export would show there
    env = {**os.environ, "HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        input=json.dumps(runs),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not (home / ".cache").exists(), "a model was exported, so it was loaded"
    return {case: {**result, "dir": dirs[case]} for case, result in zip(sorted(CASES), results)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_anything_starts(
    case: str, outcomes: dict[str, dict[str, object]]
) -> None:
    _, expected = CASES[case]
    result = outcomes[case]
    stderr = str(result["stderr"])
    lines = stderr.strip().splitlines()
    assert result["code"] == EXIT_USAGE, stderr[-2000:]
    assert float(result["elapsed_s"]) < WITHIN_S, f"took {result['elapsed_s']:.1f} s"  # type: ignore[str-format]
    assert 1 <= len(lines) <= 2, stderr[-2000:]
    assert "Traceback" not in stderr
    error = [line for line in lines if line.startswith("finestream: error:")]
    assert len(error) == 1 and expected.lower() in error[0].lower(), stderr
    # Refused in the check phase: the start-up line comes only after it, no output was made.
    assert "finestream: backend" not in stderr
    assert not (Path(str(result["dir"])) / "out").exists()


def test_the_whole_process_exits_2_with_one_line(tmp_path: Path, fixtures_dir: Path) -> None:
    """One case as a real process: exit status 2, one line, no traceback."""
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "run",
            "--source",
            str(tmp_path / "nope.mp4"),
            "--model",
            str(CHECKPOINT),
            "--jsonl",
            str(tmp_path / "o.jsonl"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr.strip().splitlines() == [
        f"finestream: error: video file not found: {tmp_path / 'nope.mp4'} (check --source or sources[].file.path)"
    ]
