"""Build a TensorRT engine from a D-FINE deploy ONNX export (FP16 with the norms in FP32).

DETR-family models lose almost all detections in pure FP16: the LayerNorm statistics (a sum of
squares over the hidden dimension) overflow or lose their precision. So in FP16 builds the
normalization layers, softmaxes, and the reduce/elementwise pieces of LayerNorms that older
exports (opset < 17) spell out op by op, are pinned to FP32 with precision constraints obeyed.

:func:`build_engine` uses the TensorRT Python API; :func:`trtexec_command` prints the
equivalent ``trtexec`` command (it reads the ONNX file only, TensorRT not needed) so an engine
can be built by hand.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from dfine.backends.onnx_backend import INPUT_NAMES
from dfine.backends.tensorrt_backend import (
    dims_list,
    require_tensorrt,
    sidecar_path,
    trt_logger,
)

if TYPE_CHECKING:
    import tensorrt as trt

logger = logging.getLogger(__name__)


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build an engine from it."""


# A module scope that is a norm: ".../norm/...", ".../norm1/...", ".../enc_norm/...",
# ".../LayerNorm/...". The name must continue after it (it is a scope, not the op itself).
_NORM_SCOPE = re.compile(r"(?:^|/)(?:norm\d*|\w+_norm\d*|\w*LayerNorm\w*|\w*layer_norm\w*)/")

# Always FP32, whatever their name: TensorRT layer types / the ONNX ops that become them.
_FP32_TRT_TYPES = frozenset({"NORMALIZATION", "SOFTMAX"})
_FP32_ONNX_OPS = frozenset({"LayerNormalization", "Softmax"})
# The pieces of a LayerNorm spelled out op by op (mean, x - mean, square, mean, + eps, sqrt,
# divide, scale, shift): FP32 when they sit in a norm scope.
_DECOMPOSED_TRT_TYPES = frozenset({"REDUCE", "ELEMENTWISE", "UNARY"})
_DECOMPOSED_ONNX_OPS = frozenset({"ReduceMean", "Sub", "Pow", "Add", "Sqrt", "Div", "Mul"})


def keeps_fp32_trt(layer_type: str, layer_name: str) -> bool:
    """Whether a TensorRT layer (its ``LayerType`` name, e.g. ``"NORMALIZATION"``, and its
    name, which the ONNX parser takes from the node) is pinned to FP32 in an FP16 build."""
    if layer_type in _FP32_TRT_TYPES:
        return True
    return layer_type in _DECOMPOSED_TRT_TYPES and _NORM_SCOPE.search(layer_name) is not None


def keeps_fp32_onnx(op_type: str, node_name: str) -> bool:
    """The same rule as :func:`keeps_fp32_trt` on an ONNX node (for ``trtexec`` commands)."""
    if op_type in _FP32_ONNX_OPS:
        return True
    return op_type in _DECOMPOSED_ONNX_OPS and _NORM_SCOPE.search(node_name) is not None


def fp32_node_names(onnx_path: str | Path) -> list[str]:
    """Names of the ONNX nodes an FP16 build keeps in FP32, in graph order."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.name and keeps_fp32_onnx(n.op_type, n.name)]


def _check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            "batch sizes must satisfy 1 <= min_batch <= opt_batch <= max_batch, got "
            f"{min_batch}, {opt_batch}, {max_batch}"
        )


def _onnx_input_shapes(onnx_path: Path) -> dict[str, list[int | None]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    shapes: dict[str, list[int | None]] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return shapes


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool = True,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 8,
    timing_cache_path: str | Path | None = None,
    workspace_gib: float = 4.0,
) -> str:
    """The ``trtexec`` command that builds what :func:`build_engine` builds.

    Reads the ONNX file for its input shapes and for the names of the layers kept in FP32
    (``--layerPrecisions``/``--layerOutputTypes`` with ``--precisionConstraints=obey``).
    """
    _check_batches(min_batch, opt_batch, max_batch)
    onnx_path = Path(onnx_path)
    shapes = _onnx_input_shapes(onnx_path)
    missing = [n for n in INPUT_NAMES if n not in shapes]
    if missing:
        raise ValueError(f"{onnx_path}: no input(s) {missing}; is it a D-FINE deploy export?")

    def spec(batch: int) -> str:
        parts = []
        for name in INPUT_NAMES:
            rest = shapes[name][1:]
            if any(d is None for d in rest):
                raise ValueError(
                    f"{onnx_path}: input {name!r} has dynamic non-batch dims {shapes[name]}; "
                    "export with a fixed image size"
                )
            parts.append(f"{name}:" + "x".join(str(d) for d in [batch, *rest]))
        return ",".join(parts)

    args = [
        "trtexec",
        f"--onnx={shlex.quote(str(onnx_path))}",
        f"--saveEngine={shlex.quote(str(engine_path))}",
        f"--minShapes={spec(min_batch)}",
        f"--optShapes={spec(opt_batch)}",
        f"--maxShapes={spec(max_batch)}",
        f"--memPoolSize=workspace:{round(workspace_gib * 1024)}M",
    ]
    if timing_cache_path is not None:
        args.append(f"--timingCacheFile={shlex.quote(str(timing_cache_path))}")
    if fp16:
        args.append("--fp16")
        kept = fp32_node_names(onnx_path)
        if kept:
            layers = ",".join(f"{name}:fp32" for name in kept)
            args += [
                "--precisionConstraints=obey",
                f"--layerPrecisions={shlex.quote(layers)}",
                f"--layerOutputTypes={shlex.quote(layers)}",
            ]
    return " ".join(args)


def _format_parser_error(error: trt.ParserError) -> str:
    where = error.node_name() or f"node {error.node()}"
    op = error.node_operator()
    return f"{where}{f' ({op})' if op else ''}: {error.desc()}"


def _pin_fp32(network: trt.INetworkDefinition) -> list[str]:
    """Pin the FP32 layers (see module docstring); returns their names."""
    import tensorrt as trt

    kept: list[str] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not keeps_fp32_trt(layer.type.name, layer.name):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            # Only floating outputs: shape and index outputs keep their integer types.
            if layer.get_output(j).dtype in (trt.float32, trt.float16):
                layer.set_output_type(j, trt.float32)
        kept.append(layer.name)
    return kept


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    fp16: bool = True,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 8,
    timing_cache_path: str | Path | None = None,
    workspace_gib: float = 4.0,
) -> Path:
    """Build and write a serialized TensorRT engine for a D-FINE deploy ONNX export.

    Args:
        onnx_path: deploy export (inputs ``images``, ``orig_target_sizes``; fixed H, W).
        engine_path: where the engine goes; a sidecar ``<engine>.json`` records the class
            names (from the ONNX metadata, or the class count from the graph) and the settings.
        fp16: FP16 kernels, with normalization layers pinned to FP32 (see module docstring).
        min_batch, opt_batch, max_batch: the optimization profile's batch range (the engine
            runs any batch in it, fastest at ``opt_batch``).
        timing_cache_path: loaded if it exists and saved after the build: rebuilds take
            seconds instead of minutes.
        workspace_gib: the builder's scratch memory limit.

    Returns:
        ``engine_path``.

    Raises:
        TensorRTUnavailableError: TensorRT is not installed.
        EngineBuildError: the parser rejects the file (each error is logged, one per line) or
            the build fails.
    """
    _check_batches(min_batch, opt_batch, max_batch)
    if workspace_gib <= 0:
        raise ValueError(f"workspace_gib must be > 0, got {workspace_gib}")
    require_tensorrt()
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: no such ONNX file")

    builder = trt.Builder(trt_logger())
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode.
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        for line in errors:
            logger.error("TensorRT ONNX parser: %s", line)
        first = errors[0] if errors else "no details"
        raise EngineBuildError(
            f"{onnx_path}: TensorRT's ONNX parser rejected it with {len(errors)} error(s), "
            f"first: {first} (all logged above)"
        )

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = dims_list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise EngineBuildError(
                f"{onnx_path}: input {tensor.name!r} has dynamic non-batch dims {shape}; "
                "export with a fixed image size"
            )
        if shape[0] >= 0 and not min_batch == max_batch == shape[0]:
            raise EngineBuildError(
                f"{onnx_path}: input {tensor.name!r} has a fixed batch of {shape[0]}; export "
                "with a dynamic batch or set min_batch = opt_batch = max_batch = "
                f"{shape[0]}"
            )
        rest = shape[1:]
        profile.set_shape(
            tensor.name,
            trt.Dims([min_batch, *rest]),
            trt.Dims([opt_batch, *rest]),
            trt.Dims([max_batch, *rest]),
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.add_optimization_profile(profile)
    kept: list[str] = []
    if fp16:
        if not builder.platform_has_fast_fp16:
            logger.warning("this GPU has no fast FP16; the FP16 engine may be slower than FP32")
        config.set_flag(trt.BuilderFlag.FP16)
        # OBEY, not PREFER: a silently dropped constraint brings the FP16 failure back.
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        kept = _pin_fp32(network)
        logger.info("TensorRT: %d layers kept in FP32 (normalization, softmax)", len(kept))

    cache_path = Path(timing_cache_path) if timing_cache_path is not None else None
    cache_bytes = (
        cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    )
    cache = config.create_timing_cache(cache_bytes)
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is refused, not used.
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("timing cache %s does not fit this GPU/TensorRT; starting empty", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    logger.info("TensorRT: building %s (this takes minutes the first time)", engine_path.name)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT failed to build an engine from {onnx_path} (its messages are logged above)"
        )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".partial")
    tmp.write_bytes(memoryview(serialized))
    tmp.replace(engine_path)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))

    sidecar = {
        "onnx": str(onnx_path),
        "class_names": _class_names_of(onnx_path),
        "fp16": fp16,
        "fp32_layers": kept,
        "batch": [min_batch, opt_batch, max_batch],
        "tensorrt": trt.__version__,
    }
    sidecar_path(engine_path).write_text(json.dumps(sidecar, indent=1))
    logger.info("TensorRT: wrote %s", engine_path)
    return engine_path


def _class_names_of(onnx_path: Path) -> list[str]:
    """Class names as every other part of the app reads them (dfine.model_info)."""
    from dfine.model_info import read_model_info

    return list(read_model_info(onnx_path).class_names)
