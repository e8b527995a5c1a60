"""One way to read a daemon's TOML config and check it against its JSON schema (agent,
collector, all-in-one): every problem is reported at once, each naming its key."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft7Validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # EL9's Python 3.9
    import tomli as tomllib


class ConfigError(ValueError):
    """The config is wrong; ``problems`` lists every problem found, each naming its key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict, or ConfigError saying why not (a missing file is an error: the
    operator named it)."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(source, ["file not found (cannot read it)"]) from None
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None


def where(path: Any) -> str:
    """A key's dotted path in the document, for messages."""
    return ".".join(str(p) for p in path) or "(top level)"


def schema_problems(schema: Mapping[str, Any], doc: Any) -> list[str]:
    """Every way `doc` breaks `schema`, in key order; an unknown key names the allowed ones."""
    problems = []
    for error in sorted(Draft7Validator(schema).iter_errors(doc), key=lambda e: list(map(str, e.path))):
        if error.validator == "additionalProperties":
            allowed = sorted(error.schema.get("properties", {}))
            extra = sorted(set(error.instance) - set(allowed))
            for key in extra:
                problems.append(
                    f"{where([*error.path, key])}: unknown key (allowed here: {', '.join(allowed)})"
                )
        else:
            problems.append(f"{where(error.path)}: {error.message}")
    return problems
