"""`systemctl reload` while a daemon is starting does not end it. SIGHUP's default action killed
the process, and systemd counts a death by SIGHUP as a clean exit: Restart=on-failure did not start
it again. A start takes seconds (the agent asks its broker for the topic's size limit) or minutes
(a collector recomputing its store under a changed [policy]); here each waits on a server that
accepts and never answers, as a broker or a PostgreSQL still booting does."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def _agent(state: Path, silent: str) -> str:
    return (
        f'[agent]\nstate_dir = "{state}"\n[libvirt]\nuri = "test:///default"\n'
        f'[kafka]\nbootstrap_servers = "{silent}"\n[metrics]\nenabled = false\n'
    )


def _collector(state: Path, silent: str) -> str:
    return f'[store]\nurl = "postgresql://kvmeter@{silent}/usage"\n[kafka]\nbootstrap = "{silent}"\n'


def _all_in_one(state: Path, silent: str) -> str:
    return f'[store]\nurl = "postgresql://kvmeter@{silent}/usage"\n[agent]\nstate_dir = "{state}"\n'


@pytest.mark.parametrize(
    ("command", "config"), [("agent", _agent), ("collector", _collector), ("run --all-in-one", _all_in_one)]
)
def test_a_sighup_while_a_daemon_starts_does_not_end_it(
    tmp_path: Path, command: str, config: Callable[[Path, str], str]
) -> None:
    server = socket.create_server(("127.0.0.1", 0), backlog=16)
    server.settimeout(20)
    silent = f"127.0.0.1:{server.getsockname()[1]}"
    path = tmp_path / "daemon.toml"
    path.write_text(config(tmp_path / "state", silent))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmeter", *command.split(), "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    held = []
    try:
        held.append(server.accept()[0])  # the start is waiting on the silent server now
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert proc.poll() is None, f"kvmeter {command} ended: {proc.returncode}"
    finally:
        proc.kill()
        proc.communicate()
        for conn in held:
            conn.close()
        server.close()
