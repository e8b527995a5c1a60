"""One way to read a daemon's TOML config and check it against its JSON schema (agent,
collector, all-in-one): every problem is reported at once, each naming its key."""

from __future__ import annotations

import pickle
import subprocess
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def read_toml(path: str | Path, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """A TOML file as a dict, or `error` saying why not (a missing file is an error: the
    operator named it)."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(source, ["file not found (cannot read it)"]) from None
    except OSError as exc:
        raise error(source, [f"cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise error(source, [f"not valid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8: a "€" in a comment saved as cp1252, say
        raise error(source, [f"not valid TOML: not UTF-8 ({exc.reason} at byte {exc.start})"]) from None


def where(path: Any) -> str:
    """A key's dotted path in the document, for messages."""
    return ".".join(str(p) for p in path) or "(top level)"


def schema_problems(schema: Mapping[str, Any], doc: Any) -> list[str]:
    """Every way `doc` breaks `schema`, in key order; an unknown key names the allowed ones."""
    from jsonschema import Draft7Validator  # here: a process that checks apart never loads it

    problems = []
    for error in sorted(Draft7Validator(schema).iter_errors(doc), key=lambda e: list(map(str, e.path))):
        if error.validator == "additionalProperties":
            allowed = sorted(error.schema.get("properties", {}))
            extra = sorted(set(error.instance) - set(allowed))
            for key in extra:
                problems.append(
                    f"{where([*error.path, key])}: unknown key (allowed here: {', '.join(allowed)})"
                )
        elif error.path and is_secret_key(str(error.path[-1])):  # its message quotes the value
            problems.append(f"{where(error.path)}: {_rule(error)} (a secret: its value is not shown)")
        else:
            problems.append(f"{where(error.path)}: {error.message}")
    return problems


# A Kafka topic's legal name (the broker refuses any other: a producer's batches would wait in
# the spool, a consumer would read nothing, with only a log line to say why).
KAFKA_TOPIC: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 249,
    "pattern": "^[A-Za-z0-9._-]+$",
}

# Keys whose values are secrets: a problem with one (in a log, on stderr) names the rule it
# breaks, never the value (a token one character short is the operator's token all the same).
SECRET_KEYS = frozenset({"token", "token_sha256", "secret_key", "cloudstack_secret_key", "password"})
# librdkafka's secret properties in [kafka.properties]: "sasl.password", "ssl.key.password",
# "ssl.keystore.password", "sasl.oauthbearer.client.secret", and the private key "ssl.key.pem".
_SECRET_WORDS = frozenset({"password", "secret"})


def is_secret_key(key: str) -> bool:
    return key in SECRET_KEYS or key.rsplit(".", 1)[-1] in _SECRET_WORDS or key == "ssl.key.pem"


def url_userinfo_problems(url: Any, at: str) -> list[str]:
    """A URL with a user or password in it is refused, never quoted: it would be logged and shown
    (in /health, the start line), and urllib sends no such credentials anyway."""
    netloc = urllib.parse.urlsplit(url).netloc if isinstance(url, str) else ""
    if "@" not in netloc:
        return []
    return [f"{at}: a user or password in the URL is refused (it is not sent, and the URL is logged)"]


def _rule(error: Any) -> str:
    value = error.validator_value
    rules = {
        "type": f"must be of type {value!r}",
        "minLength": f"must be at least {value} characters long",
        "maxLength": f"must be at most {value} characters long",
        "pattern": f"must match {value!r}",
    }
    return rules.get(str(error.validator), f"breaks the schema's {error.validator!r}")


def schema_problems_apart(schema: Mapping[str, Any], doc: Any, timeout: float = 60.0) -> list[str]:
    """`schema_problems`, checked by the same validator in a short-lived child interpreter. For a
    daemon that stays up for months on every hypervisor (the agent) and checks its config only
    at start and at a reload: jsonschema and what it imports stay resident once imported (about
    6 MB, measured; dropping the modules frees none of it), the child takes them away with it."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "kvmeter.tomlconfig"],
            input=pickle.dumps((dict(schema), doc)),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"the config check could not run: {exc}") from exc
    if done.returncode != 0:
        raise RuntimeError(f"the config check failed: {done.stderr.decode(errors='replace')[-2000:]}")
    problems = pickle.loads(done.stdout)  # our own child's answer, over a pipe
    if not (isinstance(problems, list) and all(isinstance(p, str) for p in problems)):
        raise RuntimeError("the config check answered something else than a list of problems")
    return problems


if __name__ == "__main__":  # the child of schema_problems_apart: (schema, doc) in, problems out
    schema, doc = pickle.loads(sys.stdin.buffer.read())
    sys.stdout.buffer.write(pickle.dumps(schema_problems(schema, doc)))
