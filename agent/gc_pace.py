"""Python's cyclic garbage collector around the agent's polls: paused during a poll, and its
youngest generation walked more rarely (the agent makes next to no reference cycles).
"""

from __future__ import annotations

import gc
from typing import Any, Callable


def paused_collector(poll: Callable[[], Any]) -> Any:
    """Run a poll with the cyclic garbage collector paused. A poll makes and drops thousands of
    short-lived containers, and the collector would walk them several times mid-poll (a pass per
    700 new ones); afterwards it only sees what survived. Reference counting frees the rest."""
    if not gc.isenabled():
        return poll()
    gc.disable()
    try:
        return poll()
    finally:
        gc.enable()


# New containers between two passes of the cyclic collector over its youngest generation
# (Python's default: 700). A poll makes thousands, a VM storm's tens of thousands, and each pass
# walks every one still alive, the poll's columns of thousands of counters among them; the agent
# makes next to no reference cycles, so passes this much rarer free the same memory.
COLLECTOR_YOUNG_THRESHOLD = 10_000


def tune_collector() -> None:
    """Set the youngest generation's threshold (for the whole process, as Python's is)."""
    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(COLLECTOR_YOUNG_THRESHOLD, older, oldest)
