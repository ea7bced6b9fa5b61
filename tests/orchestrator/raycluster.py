"""A local Ray head for the tests that need one (started once per test module that asks)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    def __init__(self, num_cpus: int = 2):
        self.port, self.dashboard_port = free_port(), free_port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        # its own temp dir (short: Ray's socket paths must fit 107 characters): its logs are its own
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
        ray = str(Path(sys.executable).with_name("ray"))
        # --block in its own process group: stopping it stops this head only (`ray stop` would stop every
        # Ray on the machine, a user's sweep included)
        self.proc = subprocess.Popen(
            [ray, "start", "--head", "--block", f"--port={self.port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
             "--disable-usage-stats", f"--temp-dir={self.temp_dir}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.ray = ray
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self._wait_for_dashboard()

    def _wait_for_dashboard(self, timeout: float = 120) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5)
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"Ray dashboard at {self.dashboard} did not come up")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def processes(self) -> list:
        """Every process of this head (GCS, raylet, workers, trial actors)."""
        import psutil

        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]
