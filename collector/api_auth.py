"""Who is asking: bearer tokens and CloudStack's signed requests, turned into a Principal.

A Principal is operator-wide (accounts is None) or scoped to accounts or domains; every endpoint
narrows what it reads to what the principal may see.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flask import g


@dataclass(frozen=True)
class Principal:
    """name: what logs and errors call the caller; accounts: None for operator-wide access,
    else the account uuids it may read (a domain-scoped credential is resolved to its domain's
    accounts when the request comes in, so readers only ever look at `accounts`)."""

    name: str
    accounts: frozenset[str] | None = None
    domains: frozenset[str] = frozenset()

    @property
    def operator(self) -> bool:
        return self.accounts is None and not self.domains


OPERATOR = Principal("operator")


class NoCredentials(ValueError):
    """The API would listen beyond this machine with no credential: anyone reaching it would
    read every account's usage."""


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (brackets allowed): reachable from this machine only."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_credentials(host: str, *, has_credentials: bool) -> None:
    if not has_credentials and not is_loopback(host):
        raise NoCredentials(
            f"the API listens on {host or 'every address'} but no credential is configured: "
            "set [api] token, a CloudStack key pair or a credentials file, or listen on loopback"
        )


def current_principal() -> Principal:
    """The caller of the request being served (operator-wide when the API has no credentials)."""
    return g.get("principal", OPERATOR)


def cloudstack_signature(params: Iterable[tuple[str, str]], secret: str) -> str:
    """CloudStack's request signature: URL-encode each value (Java's URLEncoder, spaces as
    %20), sort the pairs by lower-cased field, join with &, lower-case, HMAC-SHA1, base64."""
    pairs = sorted(
        (k.lower(), f"{k}={_java_quote(v)}".lower()) for k, v in params if k.lower() != "signature"
    )
    message = "&".join(text for _, text in pairs)
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def cloudstack_signature_problem(
    params: Iterable[tuple[str, str]], keys: Mapping[str, str], now_s: float
) -> str | None:
    """None when the request is signed by a known key (and, signature version 3, not expired)."""
    items = list(params)
    args = {k.lower(): v for k, v in items}
    secret = keys.get(args.get("apikey", ""))
    if secret is None:
        return "unknown or missing apikey"
    if not hmac.compare_digest(cloudstack_signature(items, secret), args.get("signature", "")):
        return "signature mismatch"
    if args.get("signatureversion") == "3":
        try:
            expires = dt.datetime.strptime(args.get("expires", ""), "%Y-%m-%dT%H:%M:%S%z")
        except ValueError:
            return "signature version 3 needs expires as yyyy-MM-ddTHH:mm:ssZ"
        if expires.timestamp() < now_s:
            return "request expired"
    return None


def _java_quote(value: str) -> str:
    return urllib.parse.quote(value, safe="*-._").replace("~", "%7E")
