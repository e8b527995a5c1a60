"""One logging setup for every kvmeter daemon (agent, collector, all-in-one).

Under systemd (or whenever stderr is not a terminal) one line per record, `<priority>logger:
message`: the journal adds time, host and unit, and reads the priority. On a terminal, time and
level in front.
"""

from __future__ import annotations

import logging
import os
import sys

# syslog priorities for systemd's "<N>" stderr prefixes (SyslogLevelPrefix=yes, the default)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JournalFormatter(logging.Formatter):
    """One line per record, `<priority>logger: message`: the journal adds time, host and unit."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"<{_PRIORITY.get(record.levelno, 6)}>{record.name}: {record.getMessage()}"
        if record.exc_info:
            # Keep a traceback in one journal entry.
            text += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        return text


def _quiet_libraries(record: logging.LogRecord) -> bool:
    # pyroute2 logs every netlink message at debug level: keep its warnings only.
    return record.levelno >= logging.WARNING or not record.name.startswith(("pyroute2", "asyncio"))


def setup_logging(level: str) -> None:
    """The root logger writes to stderr at `level` (debug, info, warning, error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_quiet_libraries)
    if os.environ.get("JOURNAL_STREAM") or not sys.stderr.isatty():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TERMINAL_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
