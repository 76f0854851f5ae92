#!/usr/bin/env bash
# Makes .venv with finestream and everything its tests need. Safe to run again: it only adds
# what is missing. Used by scripts/demo.sh and scripts/test.sh; nothing else is needed first.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# Without an NVIDIA GPU take the CPU build of torch: the default wheel is a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        "${PIP[@]}" torch
    else
        "${PIP[@]}" torch==2.13.0 || "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi

"${PIP[@]}" -e ".[dev]"
# Type stubs only (for mypy on the TensorRT path); --no-deps because they depend on tensorrt.
"${PIP[@]}" --no-deps "tensorrt-stubs>=10,<11" || echo "setup: tensorrt-stubs not installed (type check of the TensorRT path will be skipped)"

# The RTSP tests need GStreamer's RTSP server (Debian packages, see ../shared/rtsp/README.md),
# the MQTT tests a real broker (mosquitto, which they start themselves on a free port).
# Install them when we can (root with apt); otherwise those tests skip and say why.
if ! /usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null \
    || ! PATH="$PATH:/usr/sbin" command -v mosquitto >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends python3-gi gir1.2-gst-rtsp-server-1.0 \
            gir1.2-gst-plugins-base-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
            gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav mosquitto >/dev/null
    else
        echo "setup: GStreamer RTSP server or mosquitto not installed (not root or no apt): RTSP and MQTT tests will skip"
    fi
fi
