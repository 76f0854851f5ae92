"""A real RTSP camera for tests: ../shared/rtsp/serve.py in a subprocess, on a fixed free port.

The port is chosen once and kept, so a test can kill the server (SIGKILL, like a crash), or
freeze it (SIGSTOP, like a hung camera), and start it again on the same URL, possibly with
another clip (a camera that comes back at another resolution).

The server needs Debian's /usr/bin/python3 with GStreamer's RTSP server bindings. Where that
interpreter cannot import them, ``require_rtsp_server()`` skips the test and says what to install;
every other failure (missing serve.py, a server that does not start) fails the test, so CI,
which has the packages, always runs these tests.
"""

from __future__ import annotations

import functools
import os
import selectors
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SERVE_PY = SHARED / "rtsp" / "serve.py"
SYSTEM_PYTHON = "/usr/bin/python3"
_READY_TIMEOUT_S = 20.0
_PROBE = (
    "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
    "from gi.repository import Gst, GstRtspServer"
)


@functools.cache
def _bindings_problem() -> str | None:
    """Why the RTSP server cannot run here, or None if it can."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} not found"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{SYSTEM_PYTHON} cannot import GstRtspServer ({last})"
    return None


def require_rtsp_server() -> None:
    """Skip the calling test where the GStreamer RTSP server cannot run, naming the fix."""
    problem = _bindings_problem()
    if problem is not None:
        pytest.skip(
            f"RTSP test server unavailable: {problem}; install python3-gi and "
            "gir1.2-gst-rtsp-server-1.0 (see ../shared/rtsp/README.md or scripts/setup.sh)"
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RtspServer:
    """serve.py on a fixed port; a context manager that stops it on exit.

    Args:
        clip: the video file to loop as the camera picture.
        port: the port to serve on; by default a free one, kept across restarts.

    URLs: ``url`` (the camera, ``/stream``), ``publish_url``, ``published_url``.
    """

    def __init__(self, clip: Path, port: int | None = None) -> None:
        require_rtsp_server()
        if not SERVE_PY.is_file():
            raise FileNotFoundError(f"RTSP test server script not found: {SERVE_PY}")
        self.clip = Path(clip)
        self.port = free_port() if port is None else port
        self._proc: subprocess.Popen[str] | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+")

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/stream"

    @property
    def publish_url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/publish"

    @property
    def published_url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/published"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, clip: Path | None = None) -> RtspServer:
        """Start the server (with ``clip`` instead of the current one if given); return when it
        prints READY. Raises RuntimeError with the server's stderr if it does not."""
        if self.running:
            raise RuntimeError(f"RTSP test server already running on port {self.port}")
        if clip is not None:
            self.clip = Path(clip)
        cmd = [SYSTEM_PYTHON, str(SERVE_PY), str(self.clip), "--port", str(self.port)]
        # stderr goes to a file: the server logs every client, and a pipe nobody reads would
        # fill up and freeze it.
        self._stderr.seek(0)
        self._stderr.truncate()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, start_new_session=True
        )
        self._proc = proc
        line = _read_line(proc, _READY_TIMEOUT_S)
        if not line.startswith("READY "):
            self.kill()
            self._stderr.seek(0)
            err = self._stderr.read()
            raise RuntimeError(
                f"RTSP test server did not start ({' '.join(cmd)}): stdout {line!r}, "
                f"stderr {err.strip()[-500:]!r}"
            )
        return self

    def kill(self) -> None:
        """SIGKILL, like a crash or a power cut. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal(proc, signal.SIGCONT)  # a frozen process must be able to die
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    def stop(self) -> None:
        """SIGTERM, a clean shutdown (clients see the end of stream). Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal(proc, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def freeze(self) -> None:
        """SIGSTOP: the connection stays open but nothing more is sent (a hung camera)."""
        if self._proc is not None:
            _signal(self._proc, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after ``freeze()``."""
        if self._proc is not None:
            _signal(self._proc, signal.SIGCONT)

    def restart(self, clip: Path | None = None) -> None:
        """Kill and start again on the same port (and, if given, another clip)."""
        self.kill()
        self.start(clip)

    def __enter__(self) -> RtspServer:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._stderr.close()


def _signal(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The first stdout line of ``proc``, or "" if it exits or stays silent for ``timeout_s``."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sel.select(timeout=0.1):
                return proc.stdout.readline().strip()
            if proc.poll() is not None:
                return ""
    return ""
