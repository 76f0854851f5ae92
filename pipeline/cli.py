"""The ``finestream`` command line: ``run``, ``export`` and ``listen``.

The only module that configures logging, installs signal handlers and writes to the terminal.
Every error that reaches the user is one line, ``finestream: error: ...``, and a non-zero exit:
2 for bad usage, config or input (refused before anything starts), 1 for a failure while
running, 130 after an interrupt. Quiet by default: the progress bar or status line, warnings,
one start-up line naming the backend, and the final table; ``-v`` adds INFO, ``-vv`` DEBUG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TextIO

from dfine.backends.tensorrt_backend import TensorRTUnavailableError
from pipeline.assemble import AssembledPipeline, build_pipeline
from pipeline.config import AppConfig, CliOverrides, apply_overrides, load_config
from pipeline.label_cli import add_label_command
from pipeline.prometheus import MetricsServer
from pipeline.runner import StageError
from pipeline.schema import ConfigError
from pipeline.train_cli import add_train_commands

logger = logging.getLogger("finestream")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_DISPLAY_PERIOD_S = 0.5


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    code = _handle(args)
    if argv is None and any(
        t.is_alive() for t in threading.enumerate() if t is not threading.current_thread()
    ):
        # A stage thread stuck in native code (a model export, a network read) after a
        # failure: the runner has left it behind, and letting the interpreter tear down
        # under it can crash native libraries on the way out. Outputs are already closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _handle(args: argparse.Namespace) -> int:
    try:
        code: int = args.handler(args)
        return code
    except (ConfigError, FileNotFoundError, ValueError, TensorRTUnavailableError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except StageError as exc:
        _error(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finestream",
        description="Real-time video analytics with the D-FINE detector.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: what each stage does (INFO); -vv: debug logging",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="decode, detect, track and write outputs",
        description="Run the pipeline. Flags override the CONFIG file; without CONFIG the "
        "bundled defaults (configs/default.yaml values) apply.",
    )
    run.add_argument("config", nargs="?", type=Path, help="YAML config (see configs/)")
    # Also after the command (finestream run -v ...); counts add up with the global flag's.
    run.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="-v INFO, -vv DEBUG"
    )
    run.add_argument(
        "--source",
        action="append",
        metavar="PATH_OR_URL",
        help="video file or stream URL; repeat for several sources",
    )
    run.add_argument(
        "--model",
        metavar="CKPT_OR_ONNX_OR_ENGINE",
        help="official-layout .pth, .onnx, or TensorRT .engine",
    )
    run.add_argument(
        "--size",
        choices=["n", "s", "m", "l", "x"],
        help="D-FINE size (default: read from the checkpoint)",
    )
    run.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime", "tensorrt"],
        help="default auto: the fastest for the model here (the first line says which)",
    )
    run.add_argument(
        "--imgsz",
        type=int,
        help="model input size, a multiple of 32 (default: the .onnx/.engine's own, else 640)",
    )
    run.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="where to preprocess and infer"
    )
    run.add_argument("--threshold", type=float, help="score threshold for detections")
    run.add_argument("--output", type=Path, metavar="OUT_MP4", help="annotated MP4")
    run.add_argument(
        "--jsonl", type=Path, metavar="OUT_JSONL", help="detections, one line per frame"
    )
    run.add_argument("--mot", type=Path, metavar="OUT_TXT", help="tracks in MOTChallenge format")
    run.add_argument("--zmq", metavar="ENDPOINT", help="publish events on a ZeroMQ PUB socket")
    run.add_argument("--publish", metavar="RTSP_URL", help="re-stream the annotated video")
    run.add_argument(
        "--mqtt",
        metavar="BROKER_HOST",
        help="publish events to this MQTT broker (outputs.mqtt.host; credentials from "
        "FINESTREAM_MQTT_USERNAME/_PASSWORD/_CA)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on this port (metrics.host, 127.0.0.1 by default)",
    )
    run.add_argument("--stats", type=Path, metavar="OUT_JSON", help="write run metrics as JSON")
    run.add_argument(
        "--realtime", action="store_true", help="pace files at their native frame rate"
    )
    run.add_argument(
        "--max-frames", type=int, metavar="N", help="files: stop after N frames (a preview)"
    )
    run.add_argument("--no-progress", action="store_true", help="no live progress line")
    run.set_defaults(handler=_cmd_run)

    export = commands.add_parser(
        "export",
        help="export a checkpoint to ONNX or a TensorRT engine",
        description="Export an official-layout D-FINE checkpoint to ONNX (postprocessing inside "
        "the graph), and optionally build a TensorRT engine from it.",
    )
    export.add_argument("checkpoint", type=Path, help="official-layout .pth")
    export.add_argument(
        "--size",
        choices=["n", "s", "m", "l", "x"],
        help="default: read from the checkpoint (given, it must match)",
    )
    export.add_argument(
        "--num-classes", type=int, help="default: read from the checkpoint (given, it must match)"
    )
    export.add_argument("--imgsz", type=int, default=640)
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--output", type=Path, help="ONNX path (default: beside the checkpoint)")
    export.add_argument(
        "--tensorrt",
        action="store_true",
        help="also build a TensorRT engine (needs the tensorrt extra)",
    )
    export.add_argument("--max-batch", type=int, default=8)
    export.add_argument(
        "--edge-std",
        action="store_true",
        help="add an edge_std output: each box's per-edge spread in pixels (FDR distributions)",
    )
    export.add_argument(
        "--int8",
        action="store_true",
        help="also write an INT8 ONNX (<onnx>.int8.onnx), statically quantised on frames of "
        "--calibrate; CHECKPOINT may then be an FP32 .onnx (--output then names the INT8 file)",
    )
    export.add_argument(
        "--calibrate",
        type=Path,
        metavar="VIDEO_OR_DIR",
        help="--int8: a video or a folder of images from the footage the model will run on",
    )
    export.add_argument(
        "--calibration-frames",
        type=int,
        default=64,
        metavar="N",
        help="--int8: frames taken evenly spaced from --calibrate (default 64)",
    )
    export.add_argument(
        "--calibration-method",
        choices=["minmax", "entropy", "percentile"],
        default="minmax",
        help="--int8: how activation ranges are set (default minmax)",
    )
    export.set_defaults(handler=_cmd_export)

    listen = commands.add_parser("listen", help="print the events a pipeline publishes over ZeroMQ")
    listen.add_argument("endpoint", help="e.g. tcp://127.0.0.1:5555")
    listen.add_argument("--count", type=int, help="stop after this many messages")
    listen.add_argument("--timeout", type=float, help="stop after this many seconds")
    listen.set_defaults(handler=_cmd_listen)

    add_label_command(commands)
    add_train_commands(commands)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else AppConfig()
    config = apply_overrides(
        config,
        CliOverrides(
            sources=tuple(args.source or ()),
            model=args.model,
            size=args.size,
            backend=args.backend,
            imgsz=args.imgsz,
            device=args.device,
            score_threshold=args.threshold,
            video=args.output,
            jsonl=args.jsonl,
            mot=args.mot,
            zmq=args.zmq,
            publish=args.publish,
            mqtt=args.mqtt,
            metrics_port=args.metrics_port,
            realtime=True if args.realtime else None,
            max_frames=args.max_frames,
        ),
    )
    assembled = build_pipeline(config)  # the check phase: bad input is refused here
    exporter = None
    if config.metrics.port is not None:
        exporter = MetricsServer(config.metrics, assembled.metrics)
        exporter.start()  # a port in use is refused here, before any stage thread starts
    print(
        f"finestream: {assembled.backend.describe()}; model: {assembled.model.describe()}",
        file=sys.stderr,
    )
    if exporter is not None:
        print(f"finestream: Prometheus metrics on {exporter.url}", file=sys.stderr)
    try:
        interrupted = _run_with_signals(assembled, show_progress=not args.no_progress)
    finally:
        if exporter is not None:
            exporter.close()
    metrics = assembled.metrics()
    print(metrics.format_table(), file=sys.stderr)
    if args.stats:
        args.stats.parent.mkdir(parents=True, exist_ok=True)
        args.stats.write_text(json.dumps(metrics.to_dict(), indent=2))
    for line in assembled.output_summary():
        print(line, file=sys.stderr)
    if interrupted:
        return EXIT_INTERRUPTED
    losses = assembled.input_losses()
    if losses:
        _error(losses[0])
        return EXIT_FAILED
    return EXIT_OK


def _run_with_signals(assembled: AssembledPipeline, *, show_progress: bool) -> bool:
    """Run to the end; SIGINT/SIGTERM drain in-flight frames and close outputs. True if interrupted."""
    pipeline = assembled.pipeline
    interrupted = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal interrupted
        if interrupted:
            logger.warning("second interrupt: aborting without draining")
        else:
            logger.warning(
                "%s: finishing frames in flight and closing outputs (again to abort)",
                signal.Signals(signum).name,
            )
        interrupted = True
        assembled.stop()  # a second stop() while draining aborts

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    display = _ProgressDisplay(assembled, sys.stderr) if show_progress else None
    try:
        pipeline.start()
        try:
            while pipeline.running:
                pipeline.join(timeout=_DISPLAY_PERIOD_S)
                if display:
                    display.update()
            pipeline.join()
        except StageError:
            # join() reports a failure at once; let every stage finish its teardown (bounded
            # by the runner's join timeout) so outputs are closed before the process exits.
            while pipeline.running:
                try:
                    pipeline.join(timeout=_DISPLAY_PERIOD_S)
                except StageError:
                    pass
            raise
    finally:
        if display:
            display.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return interrupted


class _ProgressDisplay:
    """A progress bar for files (frames, fps, ETA) or a status line for live sources."""

    def __init__(self, assembled: AssembledPipeline, stream: TextIO) -> None:
        self._assembled = assembled
        self._stream = stream
        self._is_tty = stream.isatty()
        self._last_plain_s = 0.0
        self._width = 0

    def update(self) -> None:
        metrics = self._assembled.metrics()
        total = self._assembled.total_frames()
        if self._assembled.live or not total:
            text = metrics.status_line()
        else:
            done = metrics.frames_out
            fps = done / metrics.wall_s if metrics.wall_s > 0 else 0.0
            eta = (total - done) / fps if fps > 0 else float("nan")
            filled = int(20 * min(done / total, 1.0))
            text = (
                f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{total} frames "
                f"{fps:.1f} fps ETA {eta:.0f} s | drops {metrics.dropped}"
            )
        if self._is_tty:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        elif time.monotonic() - self._last_plain_s >= 5.0:  # logs: a line every 5 s, no \r
            self._stream.write(text + "\n")
            self._last_plain_s = time.monotonic()
        self._stream.flush()

    def close(self) -> None:
        if self._is_tty and self._width:
            self._stream.write("\n")
            self._stream.flush()


def _cmd_export(args: argparse.Namespace) -> int:
    from dfine.export import export_from_checkpoint
    from dfine.model_info import read_model_info

    if args.int8 or args.calibrate is not None:
        return _cmd_export_int8(args)
    info = read_model_info(args.checkpoint)  # one-line errors for a wrong file, before any work
    if info.size is None:
        raise ValueError(f"{args.checkpoint}: not a checkpoint; export takes a .pth")
    onnx_path = args.output or args.checkpoint.with_suffix(f".{args.imgsz}.onnx")
    export_from_checkpoint(
        args.checkpoint,
        args.size,
        args.num_classes,
        onnx_path,
        args.imgsz,
        args.opset,
        edge_std=args.edge_std,
    )
    print(f"wrote {onnx_path}", file=sys.stderr)

    from dfine.backends.tensorrt_build import trtexec_command

    engine_path = onnx_path.with_suffix(".engine")
    command = trtexec_command(onnx_path, engine_path, max_batch=args.max_batch)
    if args.tensorrt:
        from dfine.backends.tensorrt_build import build_engine

        build_engine(onnx_path, engine_path, max_batch=args.max_batch)
        print(f"wrote {engine_path}", file=sys.stderr)
    else:
        print(f"to build a TensorRT engine by hand:\n  {command}", file=sys.stderr)
    return EXIT_OK


def _cmd_export_int8(args: argparse.Namespace) -> int:
    """``export --int8``: the FP32 export (from a checkpoint) or the given FP32 .onnx, then its
    INT8 model beside it. Every bad flag, file or calibration source is refused first."""
    from dfine.export import export_from_checkpoint
    from dfine.model_info import ModelKind, model_kind, read_model_info
    from dfine.quantize import (
        CalibrationMethod,
        check_calibration_source,
        int8_path,
        quantize_int8,
    )

    if not args.int8:
        raise ValueError("--calibrate is for --int8: add --int8, or drop --calibrate")
    if args.calibrate is None:
        raise ValueError(
            "--int8 needs --calibrate VIDEO_OR_DIR: frames of the footage the model will run on "
            "set its INT8 ranges"
        )
    if args.tensorrt:
        raise ValueError(
            "--int8 makes an ONNX Runtime model; drop --tensorrt (TensorRT builds its own "
            "engines from the FP32 .onnx)"
        )
    if args.output is not None and args.output.suffix.lower() != ".onnx":
        raise ValueError(f"--output {args.output}: --int8 writes ONNX; give a path ending in .onnx")
    if args.calibration_frames < 1:
        raise ValueError(f"--calibration-frames must be >= 1, got {args.calibration_frames}")
    if model_kind(args.checkpoint) is ModelKind.ENGINE:
        raise ValueError(
            f"{args.checkpoint}: --int8 takes a .pth checkpoint or an FP32 .onnx, not a "
            "TensorRT engine"
        )
    info = read_model_info(args.checkpoint)  # one-line errors for a wrong file, before any work
    if info.int8:
        raise ValueError(f"{args.checkpoint} is already INT8; give the FP32 .onnx")
    source = check_calibration_source(args.calibrate)

    if info.kind is ModelKind.CHECKPOINT:
        fp32_path = args.output or args.checkpoint.with_suffix(f".{args.imgsz}.onnx")
        export_from_checkpoint(
            args.checkpoint,
            args.size,
            args.num_classes,
            fp32_path,
            args.imgsz,
            args.opset,
            edge_std=args.edge_std,
        )
        print(f"wrote {fp32_path}", file=sys.stderr)
        out_path = int8_path(fp32_path)
    else:
        fp32_path = args.checkpoint
        out_path = args.output or int8_path(fp32_path)
    done = quantize_int8(
        fp32_path,
        out_path,
        source,
        num_frames=args.calibration_frames,
        method=CalibrationMethod(args.calibration_method),
    )
    mib = 1024.0 * 1024.0
    print(
        f"wrote {done.path} (INT8, {done.path.stat().st_size / mib:.1f} MiB against "
        f"{fp32_path.stat().st_size / mib:.1f} MiB FP32; {done.calibration_frames} calibration "
        f"frames of {source.path.name}, {done.method.value}; {done.float_nodes} of {done.nodes} "
        f"nodes kept in float: {', '.join(p.value for p in done.float_parts)})",
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_listen(args: argparse.Namespace) -> int:
    from stages.sinks.zmq_events import listen

    listen(args.endpoint, count=args.count, timeout_s=args.timeout, out=sys.stdout)
    return EXIT_OK


def _configure_logging(verbosity: int) -> None:
    """Quiet by default (warnings); -v INFO, -vv DEBUG with times and threads."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level,
        format="finestream: %(levelname)s: %(message)s"
        if verbosity < 2
        else "%(asctime)s %(threadName)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def _error(message: str) -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"finestream: error: {first_line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
