"""`kvmeter credits add|list` against a SQLite store: a credit added is listed, in one currency
per account; bad amounts and a missing currency are refused and add nothing."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from kvmeter.cli import main
from tests.billing_support import ACCT_A, ACCT_B


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_add_and_list(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'usage.db'}"
    add = ("credits", "add", "--db", db)
    code, out = run(*add, "--account", ACCT_A, "--amount", "25.00", "--currency", "eur", "--note", "prepaid")
    assert code == 0, out
    assert out.strip() == f"credit 1: 25.00 EUR to {ACCT_A}"
    code, out = run("credits", "add", "--db", db, "--account", ACCT_B, "--amount", "7", "--currency", "EUR",
                    "--format", "json")  # fmt: skip
    assert code == 0, out
    assert json.loads(out)["amount"] == "7"
    for bad in (["--amount", "-5", "--currency", "EUR"], ["--amount", "1e3", "--currency", "EUR"],
                ["--amount", "5"], ["--amount", "5", "--currency", "USD"]):  # fmt: skip
        code, out = run("credits", "add", "--db", db, "--account", ACCT_A, *bad)
        assert code != 0, (bad, out)
    code, out = run("credits", "list", "--db", db, "--format", "json")
    assert code == 0, out
    listed = json.loads(out)
    assert [(c["account"], c["amount"], c["currency"], c["note"], c["created_by"]) for c in listed] == [
        (ACCT_A, "25.00", "EUR", "prepaid", "cli"),
        (ACCT_B, "7", "EUR", "", "cli"),
    ]
    code, out = run("credits", "list", "--db", db, "--account", ACCT_B)
    assert code == 0, out
    assert ACCT_B in out
    assert ACCT_A not in out
