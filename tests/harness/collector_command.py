"""`kvmeter collector --config FILE` as a child process, for front-door tests: its output in a log
file, stopped with SIGTERM (then SIGKILL) at the end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


class CollectorCommand:
    def __init__(self, config: Path, log_path: Path):
        self.config, self.log_path = config, log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kvmeter", "collector", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
