"""What the benchmarks share: stopping a worker they started."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown, then the whole process group if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
