"""Tariff audit: bad tariff files are refused with every problem listed (ConfigError / TariffError,
as the collector's start and its SIGHUP reload expect), never a traceback; the tariff in force
stays."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmeter.collector import config
from kvmeter.collector.billing import tariff_file
from kvmeter.collector.billing.tariff_file import TariffError, TariffSource

# The repository's shipped example (found from the code under test: this file is run from elsewhere too)
EXAMPLE = Path(config.__file__).resolve().parents[1] / "packaging" / "config" / "tariff.toml.example"
TIERS = 'tiers = [{ up_to = 1000, price = "0.09" }, { price = "0.05" }]'


def _refused(tmp_path: Path, text: str | bytes) -> list[str]:
    """The problems a collector's config naming this tariff file is refused with, after checking
    that a running collector's SIGHUP reload of it refuses it too and keeps the tariff in force."""
    path = tmp_path / "tariff.toml"
    path.write_text(EXAMPLE.read_text())
    source = TariffSource(tariff_file.load(path, {"public"}), path, {"public"})
    before = source.current
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(TariffError):
        source.reload()
    assert source.current is before
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"billing": {"tariff_file": "tariff.toml"}}, "collector.toml", base=tmp_path)
    return err.value.problems


@pytest.mark.parametrize("bound", ['"inf"', '"Infinity"', '"NaN"', '"sNaN"'])
def test_a_tier_bound_that_is_no_number_is_a_listed_problem(tmp_path: Path, bound: str) -> None:
    """`up_to = "inf"` (an operator's "no limit", which is the last tier without up_to) or "NaN"
    is refused like any bad number, with the other problems listed, not an OverflowError /
    ValueError / InvalidOperation traceback at the collector's start."""
    tiers = f'tiers = [{{ up_to = {bound}, price = "0.09" }}, {{ price = "0.05" }}]'
    text = EXAMPLE.read_text().replace(TIERS, tiers)
    assert text != EXAMPLE.read_text()
    problems = _refused(tmp_path, text.replace('per_hour = "0.0050"', "per_hour = 0.005"))
    assert any(f"tiers.0.up_to: {bound[1:-1]!r} must be a finite number" in p for p in problems), problems
    assert any("not float" in p for p in problems), problems  # every problem, at once


@pytest.mark.parametrize(
    ("old", "new", "listed"),
    [
        ('traffic_type = "public"', 'traffic_type = ["public", "guest"]', "traffic_type: ['public', "),
        ('usage_type = "IP_ADDRESS"', 'usage_type = ["IP_ADDRESS"]', "usage_type: ['IP_ADDRESS']"),
        ('unit = "GB"', 'unit = ["GB"]', "unit: ['GB']"),
    ],
)
def test_a_list_where_a_name_goes_is_a_listed_problem(
    tmp_path: Path, old: str, new: str, listed: str
) -> None:
    """One rate for two traffic types written as a TOML array (or a usage type or unit as one) is
    a schema problem listed with the rest, not `TypeError: unhashable type: 'list'`."""
    text = EXAMPLE.read_text().replace(old, new, 1)
    assert text != EXAMPLE.read_text()
    problems = _refused(tmp_path, text)
    assert any(listed in p for p in problems), problems


def test_a_tariff_file_not_in_utf8_is_refused_with_the_reason(tmp_path: Path) -> None:
    """A tariff saved in another encoding than TOML's UTF-8 (a "€" in a comment, as cp1252) is
    "not valid TOML" with the reason, as a syntax error is, not a UnicodeDecodeError traceback."""
    text = EXAMPLE.read_text().replace("# kvmeter tariff:", "# kvmeter tariff (prices in \u20ac):")
    problems = _refused(tmp_path, text.encode("cp1252"))
    assert len(problems) == 1
    assert "not valid TOML" in problems[0], problems
    assert "UTF-8" in problems[0], problems
