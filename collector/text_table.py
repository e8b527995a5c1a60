"""Text for an operator's terminal: aligned tables whose cells may hold what a tenant or a
publisher wrote (a VM's name, a tag, a dead letter's bytes), with every control character shown
escaped. An escape sequence printed as is would act on the terminal (move the cursor, rewrite
what the screen shows, set its title); a newline or a tab would break the columns."""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROLS_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # \t and \n kept


def printable(text: str, *, lines: bool = False) -> str:
    """`text` with its control characters as `\\xNN`; `lines`: newlines and tabs kept."""
    return (_CONTROLS_BUT_LINES if lines else _CONTROLS).sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """The rows under the header in columns two spaces apart, no trailing blanks, no final newline."""
    lines = [[printable(cell) for cell in line] for line in (header, *rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
