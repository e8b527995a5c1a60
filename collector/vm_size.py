"""A VM's size (vCPUs, memory MiB) where it is the VM's own: a custom offering's, chosen at
deploy and changed by scaleVirtualMachine (details cpuNumber / memory) without an offering
change. Carried by VM time segments and kept in their usage records' `detail` ("" when the
offering alone says the size), so a size change splits records as an offering change does.

    size_text(cpu, memory) -> "2/2048" ("" unless both are known)
    parse_size(text) -> (2, 2048) | None
    size_of(attributes, prefix="") -> the size an event names: cpunumber / cpuNumber and memory,
        else ""; a job result's VM details (a custom offering's VM) with prefix "details."
"""

from __future__ import annotations

from collections.abc import Mapping

CPU_KEYS = ("cpunumber", "cpuNumber")  # a job result's UserVmResponse / a correction; the VM's details
MEMORY_KEY = "memory"


def size_text(cpu: int | None, memory: int | None) -> str:
    if cpu is None or memory is None or cpu <= 0 or memory <= 0:
        return ""
    return f"{cpu}/{memory}"


def parse_size(text: str) -> tuple[int, int] | None:
    cpu, sep, memory = text.partition("/")
    if not sep or not (cpu.isascii() and cpu.isdigit() and memory.isascii() and memory.isdigit()):
        return None
    return int(cpu), int(memory)


def size_of(attributes: Mapping[str, str], prefix: str = "") -> str:
    cpu = next((attributes[prefix + k] for k in CPU_KEYS if prefix + k in attributes), "")
    memory = attributes.get(prefix + MEMORY_KEY, "")
    if not (cpu.isascii() and cpu.isdigit() and memory.isascii() and memory.isdigit()):
        return ""
    return size_text(int(cpu), int(memory))
