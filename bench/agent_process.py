"""The whole `kvmeter agent` process per poll, in three states of the cloud, next to Agent.poll and
the floor (one raw read of /proc/net/dev) measured in the same run.

The real command (`python -m kvmeter agent --config agent.toml`) runs in the bench host's
namespace over N veth taps (libvirt's test driver holds their domains, a Tansu broker listens on
the namespace's loopback, bench.frames moves bytes on every tap). Its CPU is read from outside:
utime + stime of /proc/<pid>/stat (every thread, dead ones too) over windows of exactly k poll
intervals (the agent polls on a fixed schedule, so a window of k intervals holds k polls), and
by live thread from /proc/<pid>/task/*/schedstat. The states:

- steady: the broker up, every counter moving;
- broker_down: the broker unreachable (its port answers with TCP resets: connections refused)
  while the spool grows, for about two and a half minutes (a real outage may last hours: this
  is its settled pace); then it is reachable again and the spool must drain to nothing;
- storm: a tenth of the taps replaced, back to back (bench.vethns.replace_taps): between
  consecutive polls where `ip` keeps up; the pace reached is counted and reported.

Between windows, bench.agent_probe times Agent.poll and the floor, interleaved, in the same
namespace (for the storm, Agent.poll right after the same kind of replacement, and also the poll
between a tenth of the taps deleted and made again, their domains still running: a VM stopping
loses its tap before libvirt says it stopped). Before the process starts and after it stops,
bench.cadence_floor reads the floor as the process meets it, once a poll interval (cold caches):
every state's process figure is also given against that floor. Resident memory is sampled every
0.2 s at every size, with the agent's metrics on and off.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import agent_bench, procstat
from bench.agent_command import METRICS_PORT, REPO, AgentProcess
from bench.vethns import VethHost, replace_taps

STATES = ("steady", "broker_down", "storm")


def probe(
    host: VethHost, n: int, rounds: int, storm: float = 0.0, offset: int = 0, *, gone_first: bool = False
) -> dict[str, Any]:
    return agent_bench._run_json(
        agent_bench._python(
            host,
            "bench.agent_probe",
            "--n",
            str(n),
            "--host-ns",
            host.host_ns,
            "--vm-ns",
            host.vm_ns,
            "--rounds",
            str(rounds),
            "--storm",
            str(storm),
            "--storm-offset",
            str(offset),
            *(["--gone-first"] if gone_first else []),
        ),
        timeout=600,
    )


class Storm:
    """Replace a tenth of the taps every poll interval, on a thread, until paused or stopped; a
    replacement that takes longer than an interval (`ip` on a busy machine) is followed by the
    next at once, so the pace reached is counted (`replaced`), not assumed."""

    def __init__(self, host: VethHost, n: int, interval: float, fraction: float = 0.1) -> None:
        self.host, self.n, self.interval = host, n, interval
        self.per_round = max(1, int(n * fraction))
        self.next = 0
        self.replaced = 0  # taps replaced so far (the replacements finished)
        self.running = threading.Event()
        self.lock = threading.Lock()  # held through each replacement
        self.seconds: list[float] = []  # what each replacement took
        self.stopping = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            if not self.running.wait(0.1):
                continue
            started = time.monotonic()
            with self.lock:
                try:
                    replace_taps(
                        self.host.host_ns,
                        self.host.vm_ns,
                        [(self.next + k) % self.n for k in range(self.per_round)],
                    )
                except Exception as exc:
                    self.error = str(exc)[-500:]
                self.next = (self.next + self.per_round) % self.n
                self.replaced += self.per_round
            self.seconds.append(time.monotonic() - started)
            self.stopping.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join()


def cadence_floor(host: VethHost, reads: int, interval: float) -> list[float]:
    """CPU seconds of each of `reads` raw reads of /proc/net/dev, one every `interval` seconds."""
    out = agent_bench._run_json(
        agent_bench._python(host, "bench.cadence_floor", "--reads", str(reads), "--every", str(interval)),
        timeout=reads * interval + 120,
    )
    return [float(s) for s in out["cpu_s"]]


def _with_cadence_floor(out: dict[str, Any], reads: list[float]) -> None:
    """Each state's process per poll over the floor read at the poll's cadence."""
    floor = statistics.median(reads)
    out["cadence_floor_ms"] = _spread([s * 1000 for s in reads])
    for key in STATES:
        runs = out[key]["runs"]
        out[key]["process_to_cadence_floor"] = _spread([r["cpu_per_poll_s"] / floor for r in runs])


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _to_steady(down: dict[str, Any], steady: dict[str, Any]) -> float:
    """CPU per poll with the broker unreachable over steady's: the tick-rounded totals, or where
    steady's windows saw no whole tick (a tiny size in a smoke run) the live threads' run times."""
    key = "cpu_per_poll_ms" if steady["cpu_per_poll_ms"]["median"] > 0 else "live_threads_ms"
    return float(down[key]["median"] / steady[key]["median"])


def cut_broker(host: VethHost, port: int, *, cut: bool) -> None:
    """Make the broker unreachable (or reachable again): every packet to its port is answered
    with a TCP reset, so the agent's connections are refused, while the broker keeps its state
    (its producer ids: the spool then drains by the same idempotent producer)."""
    rule = ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "REJECT", "--reject-with", "tcp-reset"]
    subprocess.run(host.exec_args("iptables", "-I" if cut else "-D", *rule), check=True, capture_output=True)


def measure_state(
    agent: AgentProcess,
    host: VethHost,
    n: int,
    *,
    polls: int,
    repeats: int,
    rounds: int,
    storm: Storm | None = None,
) -> dict[str, Any]:
    """`repeats` x (a process window of `polls` polls, then a probe): per-poll CPU of the process,
    Agent.poll and the floor, and their ratios per repeat."""
    runs = []
    for _ in range(repeats):
        if storm is not None:
            storm.running.set()
            agent.sample(agent.interval)  # the storm reaches its pace before the window
            replaced = storm.replaced
        window = agent.window(polls)
        if storm is not None:
            # the replacements finished within the window (one under way at its start counts)
            window["taps_replaced_per_poll"] = (storm.replaced - replaced) / polls
            storm.running.clear()
            with storm.lock:  # a replacement in progress finishes first
                pass
        ref = probe(
            host, n, rounds, storm=0.1 if storm is not None else 0.0, offset=storm.next if storm else 0
        )
        gone: dict[str, Any] = {}
        if storm is not None:
            storm.next = (storm.next + ref["replaced_per_round"] * (rounds + 1)) % n
            between = probe(host, n, rounds, storm=0.1, offset=storm.next, gone_first=True)
            storm.next = (storm.next + between["replaced_per_round"] * (rounds + 1)) % n
            gone_poll, gone_floor = (between["methods"][m]["cpu_s"] for m in ("agent_poll", "floor"))
            gone = {
                "agent_poll_gone_first_s": gone_poll,
                "agent_poll_gone_first_to_floor": gone_poll / gone_floor,
            }
        floor = ref["methods"]["floor"]["cpu_s"]
        poll = ref["methods"]["agent_poll"]["cpu_s"]
        runs.append(
            {
                **window,
                "floor_s": floor,
                "agent_poll_s": poll,
                "link_events_per_round": ref["link_events_per_round"],
                "process_to_floor": window["cpu_per_poll_s"] / floor,
                "agent_poll_to_floor": poll / floor,
                **gone,
            }
        )
    result: dict[str, Any] = {
        "runs": runs,
        "process_to_floor": _spread([r["process_to_floor"] for r in runs]),
        "agent_poll_to_floor": _spread([r["agent_poll_to_floor"] for r in runs]),
        "cpu_per_poll_ms": _spread([r["cpu_per_poll_s"] * 1000 for r in runs]),
        "live_threads_ms": _spread([r["cpu_per_poll_live_threads_s"] * 1000 for r in runs]),
        "floor_ms": _spread([r["floor_s"] * 1000 for r in runs]),
        "log_lines_per_poll": _spread([r["log_lines_per_poll"] for r in runs]),
    }
    if storm is not None:
        result["agent_poll_gone_first_to_floor"] = _spread(
            [r["agent_poll_gone_first_to_floor"] for r in runs]
        )
        result["taps_replaced_per_poll"] = _spread([r["taps_replaced_per_poll"] for r in runs])
    return result


def states(
    host: VethHost, work: Path, n: int, uri: str, broker: Any, interval: float, quick: bool, log: Any
) -> dict[str, Any]:
    """The three states at one size."""
    polls, repeats, rounds = (3, 2, 2) if quick else (20, 3, 5)
    outage_settle = 2.0 if quick else 15.0
    out: dict[str, Any] = {"n": n, "interval_s": interval, "polls_per_window": polls, "repeats": repeats}
    reads = cadence_floor(host, polls, interval)
    agent = AgentProcess(host, work, uri, broker.bootstrap, interval, metrics=False)
    try:
        agent.sample(3 * interval)  # the baseline poll and a few steady ones
        out["steady"] = measure_state(agent, host, n, polls=polls, repeats=repeats, rounds=rounds)
        log(f"process: steady {out['steady']['process_to_floor']['median']:.1f}x the floor")

        agent.sample(0)
        rss_before = agent.last_mb
        cut_broker(host, broker.port, cut=True)
        try:
            started = time.monotonic()
            agent.sample(outage_settle)
            down = measure_state(agent, host, n, polls=polls, repeats=repeats, rounds=rounds)
            down["outage_s"] = time.monotonic() - started
            down["pending_batches"], down["pending_bytes"] = agent.pending()
            # What the batches held for the broker cost in memory (the spool keeps them on disk)
            agent.sample(0)
            down["rss_before_mb"], down["rss_end_mb"] = rss_before, agent.last_mb
        finally:
            cut_broker(host, broker.port, cut=False)
        t0 = time.monotonic()
        while agent.pending()[0] > 1 and time.monotonic() - t0 < 120:
            agent.sample(0.5)
        down["drained_s"] = time.monotonic() - t0
        down["pending_after_drain"] = agent.pending()[0]
        down["to_steady"] = _to_steady(down, out["steady"])
        out["broker_down"] = down
        log(
            f"process: broker down {down['outage_s']:.0f} s: {down['to_steady']:.2f}x steady, "
            f"{down['pending_batches']} batches spooled, drained in {down['drained_s']:.0f} s, "
            f"resident {down['rss_before_mb']:.1f} -> {down['rss_end_mb']:.1f} MB"
        )

        storm = Storm(host, n, interval)
        try:
            out["storm"] = measure_state(
                agent, host, n, polls=polls, repeats=repeats, rounds=rounds, storm=storm
            )
        finally:
            storm.stop()
        out["storm"]["taps_per_replacement"] = storm.per_round
        out["storm"]["storm_errors"] = storm.error
        out["storm"]["replacement_s"] = _spread(storm.seconds) if storm.seconds else None
        log(
            f"process: storm {out['storm']['process_to_floor']['median']:.1f}x the floor, the poll after "
            f"link events {out['storm']['agent_poll_to_floor']['median']:.1f}x, the poll between taps gone "
            f"and made again {out['storm']['agent_poll_gone_first_to_floor']['median']:.1f}x"
        )
        out["threads"] = procstat.thread_names(agent.pid)
    finally:
        agent.stop()
    _with_cadence_floor(out, reads + cadence_floor(host, polls, interval))
    return out


def memory(
    host: VethHost, work: Path, n: int, uri: str, bootstrap: str, interval: float, quick: bool
) -> dict[str, Any]:
    """Resident memory of the process over a few polls, metrics off and on."""
    out: dict[str, Any] = {"n": n}
    for metrics in (False, True):
        agent = AgentProcess(host, work, uri, bootstrap, interval, metrics=metrics)
        try:
            agent.sample((3 if quick else 8) * interval)
            if metrics:  # one scrape, as Prometheus does, and a check that it is served
                scrape = agent_bench.run_snippet(
                    host,
                    "import urllib.request\n"
                    f"text = urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}/metrics').read()\n"
                    "assert b'kvmeter_agent_polls_total' in text, text[:300]\n",
                )
                if scrape:
                    raise RuntimeError(f"metrics scrape failed: {scrape}")
                agent.sample(2 * interval)
        finally:
            agent.stop()
        key = "metrics_on" if metrics else "metrics_off"
        out[key] = {"rss_peak_mb": agent.peak_mb, "rss_last_mb": agent.last_mb}
    driver = agent_bench._run_json([sys.executable, "-m", "bench.libvirt_rss", "--uri", uri], timeout=300)
    out["libvirt_test_driver_mb"] = driver["test_driver_mb"]
    for key in ("metrics_off", "metrics_on"):
        out[key]["rss_peak_without_test_driver_mb"] = out[key]["rss_peak_mb"] - driver["test_driver_mb"]
    return out


def run(sizes: list[int], *, quick: bool, log: Any = print) -> dict[str, Any]:
    interval = 0.5 if quick else 2.0
    main_size = 2000 if 2000 in sizes else max(sizes)
    out: dict[str, Any] = {"interval_s": interval, "memory": []}
    with VethHost() as host:
        work = Path(agent_bench.tempfile.mkdtemp(prefix="kvmeter-bench-process-", dir="/var/tmp"))
        broker = agent_bench.start_broker(host, work)
        try:
            for n in sorted(sizes):
                host.grow(n)
                uri = agent_bench.write_libvirt(work / f"node-{n}.xml", n)
                pusher = subprocess.Popen(
                    agent_bench._python(
                        host,
                        "bench.frames",
                        "--n",
                        str(n),
                        "--vm-ns",
                        host.vm_ns,
                        "--every",
                        str(interval / 2),
                    ),
                    cwd=REPO,
                )
                try:
                    out["memory"].append(memory(host, work, n, uri, broker.bootstrap, interval, quick))
                    log(f"process: memory at {n} interfaces measured")
                    if n == main_size:
                        out["states"] = states(host, work, n, uri, broker, interval, quick, log)
                finally:
                    pusher.kill()
                    pusher.wait()
        finally:
            broker.stop()
            shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":  # python -m bench.agent_process [sizes]: this section alone
    found = run([int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "2000").split(",")], quick=False)
    json.dump(found, sys.stdout, indent=2)
