"""CSV as kvmeter writes it: /v1/usage, /v1/adjustments, /v1/costs and the CLI's `--format csv`.

A text cell can hold what a tenant chose (a VM's name, an offering, a reason). A spreadsheet
opening the export runs a cell that starts with =, +, -, @, tab or CR as a formula (CSV
injection), so such a text cell is written with a leading ' (OWASP's advice), which shows it as
text. Numeric columns (a negative adjustment, a refund's cost) are written as they are: a
spreadsheet reads them as numbers, and a billing system parses them as before. A cell holding a
line break (CR as well as LF) is quoted, so no text can end its row and start a forged one.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Collection, Iterable, Mapping
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def text_cell(value: Any) -> Any:
    """A text cell a spreadsheet shows as text, never runs; anything else as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def render(fields: list[str], rows: Iterable[Mapping[str, Any]], *, numeric: Collection[str] = ()) -> str:
    """A header and one line per row, each ending in LF. numeric: the columns holding numbers
    written as text (money, rawusage), kept as they are; ints and floats are never touched."""
    out, line = io.StringIO(), io.StringIO()
    # csv quotes a cell holding a character of its line terminator, and only then: with "\n" a
    # CR inside a tenant's text would go out bare and end the row for every reader (a forged
    # row). Written with "\r\n", such a cell is quoted; the row then ends in "\n" as before.
    writer = csv.DictWriter(line, fieldnames=fields, lineterminator="\r\n")
    for row in itertools.chain([dict(zip(fields, fields, strict=True))], rows):
        line.seek(0)
        line.truncate()
        writer.writerow({k: v if k in numeric else text_cell(v) for k, v in row.items()})
        out.write(line.getvalue()[:-2] + "\n")
    return out.getvalue()
