"""The `[cloudstack]` section of the collector's (and the all-in-one's) TOML: the reconciler's
access to CloudStack's API.

    [cloudstack]
    endpoint = "https://cloud.example.com/client/api"
    api_key = "..."            # an operator (root admin) key pair: a pass lists the whole cloud
    secret_key = "..."
    # key_file = "cloudstack-keys.toml"   # instead: a TOML file with api_key and secret_key
    period_seconds = 300       # one pass every 5 minutes
    timeout_seconds = 30       # per API request

No section: no reconciler; billing goes on from events alone.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLOUDSTACK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["endpoint"],
    "properties": {
        "endpoint": {"type": "string", "pattern": "^https?://"},
        "api_key": {"type": "string", "minLength": 1},
        "secret_key": {"type": "string", "minLength": 1},
        "key_file": {"type": "string", "minLength": 1},
        "period_seconds": {"type": "number", "exclusiveMinimum": 0},
        "timeout_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": 600},
    },
}


@dataclass(frozen=True)
class CloudStackConfig:
    endpoint: str
    api_key: str
    secret_key: str
    period_s: float = 300.0
    timeout_s: float = 30.0


def cloudstack_config(section: Any, base: Path | None, problems: list[str]) -> CloudStackConfig | None:
    """The section as a CloudStackConfig (None when absent); problems are appended to `problems`
    (the schema has already reported shapes)."""
    if not isinstance(section, dict) or not isinstance(section.get("endpoint"), str):
        return None
    api_key, secret = section.get("api_key"), section.get("secret_key")
    key_file = section.get("key_file")
    if isinstance(key_file, str):
        if api_key is not None or secret is not None:
            problems.append("cloudstack: key_file or api_key / secret_key, not both")
            return None
        path = Path(key_file) if base is None else base / key_file
        try:
            keys = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"cloudstack.key_file: cannot read {key_file}: {exc}")
            return None
        api_key, secret = keys.get("api_key"), keys.get("secret_key")
    if not (isinstance(api_key, str) and api_key and isinstance(secret, str) and secret):
        problems.append("cloudstack: an operator key pair is required (api_key and secret_key, or key_file)")
        return None
    return CloudStackConfig(
        endpoint=section["endpoint"],
        api_key=api_key,
        secret_key=secret,
        period_s=float(section.get("period_seconds", 300.0)),
        timeout_s=float(section.get("timeout_seconds", 30.0)),
    )
