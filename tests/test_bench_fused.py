"""Smoke test of ``bench.fused``: it runs end to end on one round, its ratio column is the
ratio of the printed medians, and --write touches only its own section. No speed is asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import fused as bench_fused


def test_fused_bench_prints_both_forms_and_their_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        code = bench_fused.main(
            ["--imgsz", "320", "--threads", "1", "--rounds", "2", "--warmup", "0"]
        )
    finally:
        torch.set_num_threads(threads)  # the backend sets the process-wide count
    assert code == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 320")]
    forms = {cells[3]: cells for cells in (line.split("|") for line in rows)}
    assert set(forms) == {" training form ", " fused (deploy) "}
    training_ms = float(forms[" training form "][4])
    fused_ms = float(forms[" fused (deploy) "][4])
    ratio = float(forms[" fused (deploy) "][6].strip().rstrip("×"))
    assert ratio == pytest.approx(training_ms / fused_ms, abs=0.01)


def test_fused_bench_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_fused.main(["--imgsz", "300"]) == 2
    assert "multiples of 32" in capsys.readouterr().err
    assert bench_fused.main(["--rounds", "0"]) == 2


def test_fused_bench_replaces_only_its_own_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    heading = bench_fused.section_heading("2026-01-01")
    bench_fused.write_section(f"{heading}\n\nfirst\n", results)
    bench_fused.write_section(f"{heading}\n\nsecond\n", results)
    text = results.read_text()
    assert "## Other\n\nkept" in text and "second" in text and "first" not in text
    assert text.count(heading) == 1
