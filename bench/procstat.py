"""A process's CPU time and memory from /proc, read from outside: all its threads, the dead ones
included (/proc/<pid>/stat's utime + stime count every thread the process ever had), and a
breakdown by live thread (/proc/<pid>/task/<tid>/schedstat, in nanoseconds)."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _fields(path: Path) -> list[str]:
    text = path.read_text()
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process, in seconds (clock-tick resolution)."""
    fields = _fields(Path(f"/proc/{pid}/stat"))
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of proc(5)


def thread_group(comm: str, tid: int, pid: int) -> str:
    """The part of the agent a thread belongs to, by its name: librdkafka names its threads
    rdk:main, rdk:broker<N>, ...; Python's threads all carry the program's name."""
    if tid == pid:
        return "main (poll loop)"
    if comm.startswith("rdk:"):
        return "librdkafka"
    return "other threads"


def threads_ns(pid: int) -> dict[str, int]:
    """Run time of the live threads in nanoseconds, summed by thread_group."""
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        group = thread_group(comm, int(task.name), pid)
        out[group] = out.get(group, 0) + ns
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"no VmRSS for {pid}")


def thread_names(pid: int) -> list[str]:
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            continue
    return sorted(names)
