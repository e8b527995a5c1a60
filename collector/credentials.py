"""The API's credentials from configuration: bearer tokens and CloudStack key pairs, each
operator-wide or scoped to accounts and/or CloudStack domains.

They come from [api] (`token`, `cloudstack_api_key` + `cloudstack_secret_key`, and
`[[api.credentials]]` entries) and from an optional credentials file (`[[credentials]]` entries,
mode 0600, re-read on SIGHUP by CredentialSource). Credentials minted with
`kvmeter credentials create` live in the store instead (store.credentials).

A token is kept as its SHA-256 only (entries may give `token_sha256` and never hold the token);
a CloudStack secret key is kept as it is: verifying a request's HMAC needs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import signal
import stat
import threading
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmeter.tomlconfig import schema_problems

log = logging.getLogger(__name__)

TOKEN_MIN = 16  # characters of a bearer token: a guessable one is no credential
_IDS = {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"type": "string", "minLength": 1}}
ENTRY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 128},
        "token": {"type": "string", "minLength": TOKEN_MIN},
        "token_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "api_key": {"type": "string", "minLength": 1, "maxLength": 128},
        "secret_key": {"type": "string", "minLength": 1},
        "accounts": _IDS,
        "domains": _IDS,
    },
}
FILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"credentials": {"type": "array", "items": ENTRY_SCHEMA}},
}


class CredentialsError(ValueError):
    def __init__(self, source: str, problems: list[str]):
        super().__init__(f"{source}: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Grant:
    """What a credential lets its holder read. accounts None and no domains: operator-wide;
    else the listed accounts plus the accounts of the listed CloudStack domains (uuids)."""

    name: str
    accounts: frozenset[str] | None = None
    domains: frozenset[str] = frozenset()

    @property
    def operator(self) -> bool:
        return self.accounts is None and not self.domains

    def describe(self) -> str:
        if self.operator:
            return "operator-wide"
        parts = [f"account {a}" for a in sorted(self.accounts or ())]
        return ", ".join(parts + [f"domain {d}" for d in sorted(self.domains)])


def scoped(name: str, accounts: Iterable[str] = (), domains: Iterable[str] = ()) -> Grant:
    """A grant for the given accounts and domains; operator-wide when both are empty."""
    accounts, domains = frozenset(accounts), frozenset(domains)
    if not accounts and not domains:
        return Grant(name)
    return Grant(name, accounts, domains)


def token_digest(token: str) -> str:
    """What is kept of a bearer token. Tokens are long random strings (or an operator's choice
    kept out of the config file via token_sha256), so one SHA-256 suffices: no slow hash."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "kvm_" + secrets.token_urlsafe(32)


def new_key_pair() -> tuple[str, str]:
    """An API key and secret key, as long as CloudStack's own (base64url of 64 bytes)."""
    return secrets.token_urlsafe(64), secrets.token_urlsafe(64)


@dataclass(frozen=True)
class Credentials:
    """Credentials from configuration: token digest -> grant; API key -> (secret key, grant)."""

    tokens: Mapping[str, Grant] = field(default_factory=dict)
    keys: Mapping[str, tuple[str, Grant]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.tokens or self.keys)

    def by_token(self, token: str) -> Grant | None:
        return self.tokens.get(token_digest(token))

    def by_api_key(self, api_key: str) -> tuple[str, Grant] | None:
        return self.keys.get(api_key)

    def merged(self, other: Credentials, source: str) -> Credentials:
        """Both sets; a token or API key in both is a CredentialsError."""
        twice = [g.name for d, g in other.tokens.items() if d in self.tokens]
        problems = [f"{name}: its token is configured twice" for name in twice]
        problems += [f"api key {k!r} is configured twice" for k in other.keys if k in self.keys]
        if problems:
            raise CredentialsError(source, problems)
        return Credentials({**self.tokens, **other.tokens}, {**self.keys, **other.keys})


def operator_credentials(token: str = "", cloudstack_keys: Mapping[str, str] | None = None) -> Credentials:
    """[api] token and cloudstack_api_key / cloudstack_secret_key: operator-wide."""
    tokens = {token_digest(token): Grant("operator token")} if token else {}
    keys = {k: (s, Grant(f"operator key {k[:8]}")) for k, s in (cloudstack_keys or {}).items()}
    return Credentials(tokens, keys)


def from_entries(entries: list[Any], where: str) -> tuple[Credentials, list[str]]:
    """[[credentials]] entries (already schema-checked) -> Credentials and the problems found
    (named `where[i]`: a kind missing or doubled, a token or API key given twice)."""
    tokens: dict[str, Grant] = {}
    keys: dict[str, tuple[str, Grant]] = {}
    problems: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not _well_typed(entry):
            continue  # the schema reported it
        at = f"{where}[{i}] ({entry['name']})"
        grant = scoped(entry["name"], entry.get("accounts", ()), entry.get("domains", ()))
        kinds = [k for k in ("token", "token_sha256", "api_key") if k in entry]
        if len(kinds) != 1 or ("api_key" in entry) != ("secret_key" in entry):
            problems.append(f"{at}: give exactly one of token, token_sha256 or api_key with secret_key")
            continue
        if "api_key" in entry:
            if entry["api_key"] in keys:
                problems.append(f"{at}: api key {entry['api_key']!r} is given twice")
            keys[entry["api_key"]] = (entry["secret_key"], grant)
            continue
        digest = entry.get("token_sha256") or token_digest(entry["token"])
        if digest in tokens:
            problems.append(f"{at}: the same token as {tokens[digest].name}")
        tokens[digest] = grant
    return Credentials(tokens, keys), problems


def _well_typed(entry: dict[str, Any]) -> bool:
    """The entry's values have the schema's types (a token not quoted is a problem the schema
    names, never a crash here)."""
    texts = all(
        isinstance(entry.get(k, ""), str) for k in ("name", "token", "token_sha256", "api_key", "secret_key")
    )
    ids = all(
        isinstance(entry.get(k, []), list) and all(isinstance(x, str) for x in entry.get(k, []))
        for k in ("accounts", "domains")
    )
    return "name" in entry and texts and ids


API_PROPERTIES: dict[str, Any] = {
    "token": {"type": "string", "minLength": TOKEN_MIN},  # the operator's: as any credential's
    "token_file": {"type": "string", "minLength": 1},
    "cloudstack_api_key": {"type": "string", "minLength": 1},
    "cloudstack_secret_key": {"type": "string", "minLength": 1},
    "credentials": {"type": "array", "items": ENTRY_SCHEMA},
    "credentials_file": {"type": "string", "minLength": 1},
}  # the [api] keys of this module (the collector's schema holds them)


def from_api_section(api: Mapping[str, Any], base: Path | None) -> tuple[Credentials, Path | None, list[str]]:
    """[api] (already schema-checked) -> its own credentials, the credentials file (loaded once
    here so that its problems are reported with the config's) and every problem found."""
    problems: list[str] = []
    token = api.get("token", "")
    token_file = api.get("token_file", "")
    if token and token_file:
        problems.append("api: token and token_file exclude each other")
    elif isinstance(token_file, str) and token_file:
        try:
            token = (Path(token_file) if base is None else base / token_file).read_text().strip()
        except OSError as exc:
            problems.append(f"api.token_file: cannot read {token_file}: {exc.strerror}")
        else:
            if not token:  # never "no token": with no other credential, loopback would be open
                problems.append(f"api.token_file: {token_file} is empty")
            elif len(token) < TOKEN_MIN:
                problems.append(
                    f"api.token_file: the token in {token_file} is shorter than {TOKEN_MIN} characters"
                )
    keys: dict[str, str] = {}
    api_key, secret = api.get("cloudstack_api_key"), api.get("cloudstack_secret_key")
    if (api_key is None) != (secret is None):
        problems.append("api: cloudstack_api_key and cloudstack_secret_key go together")
    elif isinstance(api_key, str) and isinstance(secret, str):
        keys[api_key] = secret
    credentials = operator_credentials(token if isinstance(token, str) else "", keys)
    entries = api.get("credentials", [])
    listed, more = from_entries(entries if isinstance(entries, list) else [], "api.credentials")
    problems += more
    try:
        credentials = credentials.merged(listed, "api")
    except CredentialsError as exc:
        problems += [f"api: {p}" for p in exc.problems]
    path = None
    file_name = api.get("credentials_file")
    if isinstance(file_name, str) and file_name:
        path = Path(file_name) if base is None else base / file_name
        try:
            credentials.merged(load_file(path), str(path))
        except CredentialsError as exc:
            problems += [f"api.credentials_file: {exc}"]
    return credentials, path, problems


def load_file(path: Path) -> Credentials:
    """A credentials file: `[[credentials]]` entries. Refused when others than its owner may read
    it (it holds secrets) or when any entry is bad; CredentialsError lists every problem."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read().decode()
    except OSError as exc:
        raise CredentialsError(str(path), [f"cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise CredentialsError(str(path), [f"not UTF-8: {exc}"]) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(
            str(path),
            [f"group or others may read it (mode {stat.S_IMODE(mode):04o}); it holds secrets: chmod 600 it"],
        )
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CredentialsError(str(path), [f"not valid TOML: {exc}"]) from None
    problems = schema_problems(FILE_SCHEMA, doc)
    entries = doc.get("credentials", [])
    credentials, more = from_entries(entries if isinstance(entries, list) else [], "credentials")
    if problems or more:
        raise CredentialsError(str(path), problems + more)
    return credentials


class CredentialSource:
    """The configured credentials: those of the config file itself plus a credentials file's,
    which reload() reads again (SIGHUP). A file that fails to load on reload changes nothing:
    the credentials in force stay, and the log says why."""

    def __init__(self, inline: Credentials = Credentials(), path: Path | None = None):
        self.inline = inline
        self.path = path
        self._lock = threading.Lock()
        self.current = inline if path is None else inline.merged(load_file(path), str(path))

    def replace(self, inline: Credentials, path: Path | None) -> Credentials:
        """The config file's credentials and credentials file as they are now (SIGHUP re-reads
        the config file too); CredentialsError, and nothing changed, when they do not load."""
        with self._lock:
            current = inline if path is None else inline.merged(load_file(path), str(path))
            self.inline, self.path, self.current = inline, path, current
        return current

    def reload(self) -> bool:
        if self.path is None:
            return True
        with self._lock:
            try:
                current = self.inline.merged(load_file(self.path), str(self.path))
            except CredentialsError as exc:
                log.error("credentials file not reloaded, the credentials in force stay: %s", exc)
                return False
            self.current = current  # one reference: a request sees the old set or the new one
        tokens, keys = len(current.tokens), len(current.keys)
        log.info("credentials reloaded from %s: %d token(s), %d key pair(s)", self.path, tokens, keys)
        return True


def reload_on_sighup(source: CredentialSource) -> None:
    """Re-read the credentials file on SIGHUP (call from the main thread)."""
    signal.signal(signal.SIGHUP, lambda _signum, _frame: source.reload())
