"""Who is asking: bearer tokens and CloudStack's signed requests, turned into a Principal.

A Principal is operator-wide (accounts is None) or scoped to accounts or domains; every endpoint
narrows what it reads to what the principal may see. The Authenticator finds a request's
credential among the configured ones (credentials.CredentialSource) and the minted ones
(store.credentials, read per request: a revocation holds from the next request on), and
resolves a domain-scoped one to the domain's accounts.

With no credential at all the API answers everyone as the operator, and only on loopback
(require_credentials refuses to start otherwise).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flask import g

from kvmeter.collector.credentials import CredentialSource, Grant
from kvmeter.collector.store.credentials import MintedCredentials


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
MAX_API_KEY = 128  # characters (api_credentials.lookup)
NOBODY = Principal("nobody", frozenset())  # outside an authenticated request: sees nothing
SIGNATURE_MISMATCH = "signature mismatch"
BAD_SIGNED = "unknown or revoked apikey, or signature mismatch"
_NO_SECRET = "\x00no secret: an unknown apikey"  # an HMAC all the same: the same time either way


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
    """The caller of the request being served (set by the API's before_request)."""
    return g.get("principal", NOBODY)


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused (401)."""

    reason: str


class Authenticator:
    """A request's credential -> its Principal, or a Refusal."""

    DOMAIN_CACHE_S = 5.0  # a domain's accounts are read again after this long

    def __init__(
        self,
        configured: CredentialSource,
        minted: MintedCredentials,
        *,
        anonymous: bool,
        clock: Callable[[], float] = time.time,
    ):
        """anonymous: answer requests without a credential as the operator while no credential
        exists at all (loopback only)."""
        self.configured = configured
        self.minted = minted
        self.anonymous = anonymous
        self.clock = clock
        self._domains: dict[frozenset[str], tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def has_credentials(self) -> bool:
        return bool(self.configured.current) or self.minted.any_active()

    def authenticate(
        self, path: str, authorization: str, params: Iterable[tuple[str, str]]
    ) -> Principal | Refusal:
        """path: the request's; authorization: its Authorization header; params: its query and
        form fields (a CloudStack signature covers both)."""
        scheme, _, token = authorization.partition(" ")
        if authorization:
            if scheme.lower() != "bearer" or not token.strip():
                return Refusal("the Authorization header must be `Bearer <token>`")
            grant = self.configured.current.by_token(token.strip()) or self.minted.by_token(token.strip())
            return Refusal("unknown or revoked bearer token") if grant is None else self.principal(grant)
        items = list(params)
        api_key = next((v for k, v in items if k.lower() == "apikey"), None)
        if path == "/client/api" and api_key is not None:
            found = None
            if api_key.isprintable() and len(api_key) <= MAX_API_KEY:  # e.g. no NUL for the DB
                found = self.configured.current.by_api_key(api_key) or self.minted.by_api_key(api_key)
            # One answer for an unknown key and a bad signature (as CloudStack's): a refusal
            # must not tell whether a key exists, or is still in force.
            secret = _NO_SECRET if found is None else found[0]
            problem = cloudstack_signature_problem(items, secret, self.clock())
            if found is None or problem == SIGNATURE_MISMATCH:
                return Refusal(BAD_SIGNED)
            return Refusal(problem) if problem else self.principal(found[1])
        if self.anonymous and not self.has_credentials():
            return OPERATOR
        return Refusal("a credential is needed: `Authorization: Bearer <token>`, or a signed request")

    def principal(self, grant: Grant) -> Principal:
        if grant.operator:
            return Principal(grant.name)
        accounts = grant.accounts or frozenset()
        if grant.domains:
            accounts |= self.domain_accounts(grant.domains)
        return Principal(grant.name, accounts, grant.domains)

    def domain_accounts(self, domains: frozenset[str]) -> frozenset[str]:
        now = time.monotonic()
        cached = self._domains.get(domains)
        if cached is not None and cached[0] > now:
            return cached[1]
        accounts = self.minted.domain_accounts(domains)
        with self._lock:
            if len(self._domains) > 1000:
                self._domains.clear()
            self._domains[domains] = (now + self.DOMAIN_CACHE_S, accounts)
        return accounts


def cloudstack_signature(params: Iterable[tuple[str, str]], secret: str) -> str:
    """CloudStack's request signature (ApiServer.verifyRequest): sort the fields by name as
    sent, URL-encode each value (Java's URLEncoder, spaces as %20), join with &, lower-case the
    whole, HMAC-SHA1, base64. Sorting before lower-casing matters when names differ in case."""
    pairs = sorted((k, f"{k}={_java_quote(v)}") for k, v in params if k.lower() != "signature")
    message = "&".join(text for _, text in pairs).lower()
    digest = hmac.new(secret.encode(), message.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def cloudstack_signature_problem(params: Iterable[tuple[str, str]], secret: str, now_s: float) -> str | None:
    """None when the request is signed with this secret key (and, signature version 3, not
    expired)."""
    items = list(params)
    args = {k.lower(): v for k, v in items}
    given = args.get("signature", "").encode()  # as bytes: any text compares, ASCII or not
    if not hmac.compare_digest(cloudstack_signature(items, secret).encode(), given):
        return SIGNATURE_MISMATCH
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
