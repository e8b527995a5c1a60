"""The real `kvmeter agent` under measurement: started from a TOML file in the bench host's
namespace (its stderr kept in a file), its CPU over windows of whole poll intervals and its
resident memory read from outside (/proc), its spool read back. Used by bench.agent_process.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import agent_bench, procstat
from bench.vethns import VethHost

REPO = agent_bench.REPO
TOPIC = agent_bench.TOPIC
METRICS_PORT = 9477


class AgentProcess:
    """`kvmeter agent` from a TOML file in the host namespace; its stderr is kept in a file."""

    def __init__(
        self, host: VethHost, work: Path, uri: str, bootstrap: str, interval: float, *, metrics: bool
    ) -> None:
        self.state_dir = work / "agent-state"
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.config = work / "agent.toml"
        self.config.write_text(
            "[agent]\n"
            'host_id = "bench-host"\n'
            f"poll_interval = {interval}\n"
            f'state_dir = "{self.state_dir}"\n'
            'log_level = "info"\n'
            f'[libvirt]\nuri = "{uri}"\n'
            f'[kafka]\nbootstrap_servers = "{bootstrap}"\ntopic = "{TOPIC}"\n'
            f"[metrics]\nenabled = {'true' if metrics else 'false'}\nport = {METRICS_PORT}\n"
        )
        self.log_path = work / f"agent-{int(time.time() * 1000)}.log"
        self.interval = interval
        self.host = host
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                host.exec_args(sys.executable, "-m", "kvmeter", "agent", "--config", str(self.config)),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.proc.pid  # `ip netns exec` execs: the same pid
        self.peak_mb = 0.0
        self.last_mb = 0.0
        self.wait_started()

    def wait_started(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while b"agent started" not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kvmeter agent did not start: {self.log_lines()[-20:]}")
            time.sleep(0.1)

    def log_lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def sample(self, seconds: float) -> None:
        """Wait `seconds`, sampling the resident memory."""
        end = time.monotonic() + seconds
        while True:
            self.last_mb = procstat.rss_mb(self.pid)
            self.peak_mb = max(self.peak_mb, self.last_mb)
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def window(self, polls: int) -> dict[str, Any]:
        """CPU of the process over exactly `polls` poll intervals: per poll, and by thread."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"kvmeter agent exited: {self.log_lines()[-20:]}")
        lines0 = len(self.log_lines())
        cpu0, threads0 = procstat.cpu_seconds(self.pid), procstat.threads_ns(self.pid)
        self.sample(polls * self.interval)
        cpu1, threads1 = procstat.cpu_seconds(self.pid), procstat.threads_ns(self.pid)
        by_thread = {
            group: (threads1[group] - threads0.get(group, 0)) / 1e9 / polls
            for group in threads1
            if group in threads0
        }
        return {
            "cpu_per_poll_s": (cpu1 - cpu0) / polls,
            "cpu_per_poll_by_thread_s": by_thread,
            # the same from the live threads' run times, in ns: a check on the tick-rounded total
            "cpu_per_poll_live_threads_s": sum(by_thread.values()),
            "log_lines_per_poll": (len(self.log_lines()) - lines0) / polls,
        }

    def pending(self) -> tuple[int, int]:
        """(batches, bytes) spooled and not delivered, read from the spool directory."""
        from kvmeter.agent.spool import Spool

        spool = Spool(self.state_dir / "spool", read_only=True)
        return len(spool.pending()), spool.pending_bytes()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
