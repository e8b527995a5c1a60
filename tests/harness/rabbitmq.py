"""A throw-away RabbitMQ node from Debian's `rabbitmq-server`, on free ports, in a temporary
directory, run as the package's unprivileged `rabbitmq` user (the current user when not root).

Nothing of the system's node is used: its own database and logs (RABBITMQ_MNESIA_BASE,
RABBITMQ_LOG_BASE), node name, AMQP, distribution and epmd ports, and a fresh Erlang cookie in
its own HOME. stop() kills the node and its epmd; restart() stops and starts it on the same
ports and data, as a broker restart does (durable queues and persistent messages survive).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from tests.harness.ports import free_port, wait_for_port

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")


class Node:
    def __init__(self) -> None:
        if not SERVER.exists():
            raise RuntimeError(f"{SERVER} not found: apt-get install rabbitmq-server (make deps does)")
        # Not under pytest's tmp dirs: those are 0700 root, which the `rabbitmq` user cannot traverse.
        self.base = Path(tempfile.mkdtemp(prefix="kvmeter-rmq-"))
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.name = f"kvmeter-{uuid.uuid4().hex[:8]}@localhost"
        self.user = "rabbitmq" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.proc: subprocess.Popen[bytes] | None = None
        (self.base / "home").mkdir()
        cookie = self.base / "home" / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        if os.geteuid() == 0:
            for path in [self.base, *self.base.rglob("*")]:
                shutil.chown(path, self.user, self.user)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.base / "home"),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "node.pid"),
            "RABBITMQ_LOGS": str(self.base / "log" / "node.log"),
        }

    def _command(self, *cmd: str) -> list[str]:
        return ["runuser", "-u", self.user, "--", *cmd] if os.geteuid() == 0 else list(cmd)

    def start(self, timeout: float = 90) -> Node:
        with open(self.base / "console.log", "ab") as console:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                self._command(str(SERVER)),
                env=self.env(),
                cwd=self.base,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port("127.0.0.1", self.port, timeout, "RabbitMQ")
            self.ctl("await_startup", "--timeout", str(int(timeout)))
        except Exception as exc:
            self.stop(remove=False)
            raise RuntimeError(f"RabbitMQ did not start: {exc}\n{self.log()[-3000:]}") from None
        return self

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            self._command(str(CTL), "-n", self.name, *args),
            env=self.env(),
            cwd=self.base,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def log(self) -> str:
        parts = [p for p in (self.base / "console.log", self.base / "log" / "node.log") if p.exists()]
        return "".join(p.read_text(errors="replace") for p in parts)

    def _kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        self.proc = None
        # epmd runs detached (its own session): ask the one on this node's port to end.
        subprocess.run(
            ["epmd", "-port", str(self.epmd_port), "-kill"], check=False, capture_output=True, timeout=30
        )

    def restart(self) -> None:
        self._kill()
        time.sleep(0.5)
        self.start()

    def stop(self, *, remove: bool = True) -> None:
        self._kill()
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)
