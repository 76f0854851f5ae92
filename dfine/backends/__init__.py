"""Inference backends for D-FINE, all behind the ``DetectorBackend`` protocol (``base.py``).

- ``TorchBackend`` (``torch_backend``): the PyTorch network, CPU or CUDA (FP16, CUDA graphs).
- ``OnnxRuntimeBackend`` (``onnx_backend``): a deploy ONNX export, ours or the official one.
- ``TensorRTBackend`` (``tensorrt_backend``) and ``build_engine``/``trtexec_command``
  (``tensorrt_build``): TensorRT 10 engines.

onnxruntime and tensorrt are imported only when a backend of theirs is made, so importing this
package needs neither.
"""

from __future__ import annotations

from dfine.backends.base import BackendOutput, DetectorBackend
from dfine.backends.class_names import resolve_class_names
from dfine.backends.onnx_backend import OnnxRuntimeBackend
from dfine.backends.tensorrt_backend import (
    TensorRTBackend,
    TensorRTUnavailableError,
    tensorrt_available,
)
from dfine.backends.tensorrt_build import EngineBuildError, build_engine, trtexec_command
from dfine.backends.torch_backend import TorchBackend

__all__ = [
    "BackendOutput",
    "DetectorBackend",
    "EngineBuildError",
    "OnnxRuntimeBackend",
    "TensorRTBackend",
    "TensorRTUnavailableError",
    "TorchBackend",
    "build_engine",
    "resolve_class_names",
    "tensorrt_available",
    "trtexec_command",
]
