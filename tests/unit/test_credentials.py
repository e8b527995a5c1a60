"""The API's credentials: the config's [api] and a credentials file, every problem at once, the
file's mode, reloads that keep what is in force; which addresses are loopback."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from kvmeter.collector import config
from kvmeter.collector.api_auth import is_loopback
from kvmeter.collector.credentials import CredentialsError, CredentialSource, Grant, load_file

GOOD = """
[[credentials]]
name = "tenant"
token = "tenant-token-0123456789"
accounts = ["acct-1", "acct-2"]
[[credentials]]
name = "domain"
api_key = "key-1"
secret_key = "secret-1"
domains = ["dom-1"]
"""


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_every_bad_credential_key_is_reported_at_once(tmp_path: Path) -> None:
    write(tmp_path / "open.toml", GOOD, mode=0o644)
    doc = {
        "api": {
            "cloudstack_api_key": "alone",
            "credentials_file": "open.toml",
            "credentials": [
                {"name": "no kind"},
                {"name": "two kinds", "token": "a-token-of-16-chars", "api_key": "k", "secret_key": "s"},
                {"name": "short", "token": "short"},
                {"name": "empty scope", "token": "another-token-0123", "accounts": []},
                {"name": "bad digest", "token_sha256": "abc"},
                {"name": "unknown key", "token": "third-token-012345", "role": "admin"},
                {"name": "dup 1", "token": "same-token-0123456789"},
                {"name": "dup 2", "token_sha256": hashlib.sha256(b"same-token-0123456789").hexdigest()},
            ],
        }
    }
    with pytest.raises(config.ConfigError) as caught:
        config.from_dict(doc, base=tmp_path)
    text = "\n".join(caught.value.problems)
    for expected in (
        "cloudstack_api_key and cloudstack_secret_key go together",
        "api.credentials_file:",
        "mode 0644",
        "api.credentials[0] (no kind): give exactly one of",
        "api.credentials[1] (two kinds): give exactly one of",
        "api.credentials.2.token: must be at least 16 characters long",
        "api.credentials.3.accounts: [] should be non-empty",
        "api.credentials.4.token_sha256: must match",
        "api.credentials.5.role: unknown key",
        "api.credentials[7] (dup 2): the same token as dup 1",
    ):
        assert expected in text, text


def test_config_and_file_credentials_with_their_scopes(tmp_path: Path) -> None:
    write(tmp_path / "creds.toml", GOOD)
    cfg = config.from_dict(
        {"api": {"token": "operator-token-0123", "credentials_file": "creds.toml"}}, base=tmp_path
    )
    source = CredentialSource(cfg.api.credentials, cfg.api.credentials_file)
    assert source.current.by_token("operator-token-0123") == Grant("operator token")
    assert source.current.by_token("tenant-token-0123456789") == Grant(
        "tenant", frozenset({"acct-1", "acct-2"})
    )
    assert source.current.by_api_key("key-1") == (
        "secret-1",
        Grant("domain", frozenset(), frozenset({"dom-1"})),
    )
    assert source.current.by_token("nope") is None


def test_a_token_in_the_config_and_the_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "creds.toml", GOOD)
    with pytest.raises(config.ConfigError, match="configured twice"):
        config.from_dict(
            {"api": {"token": "tenant-token-0123456789", "credentials_file": "creds.toml"}}, base=tmp_path
        )


def test_reload_swaps_a_good_file_and_keeps_the_old_on_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "creds.toml", GOOD)
    source = CredentialSource(path=path)
    write(path, GOOD.replace("tenant-token-0123456789", "tenant-token-second-0123"))
    assert source.reload()
    assert source.current.by_token("tenant-token-0123456789") is None
    assert source.current.by_token("tenant-token-second-0123") is not None
    in_force = source.current
    for text, mode, why in (
        ("[[credentials]\n", 0o600, "not valid TOML"),
        (GOOD, 0o604, "mode 0604"),
        ('[[credentials]]\nname = "x"\n', 0o600, "give exactly one of"),
    ):
        write(path, text, mode)
        with caplog.at_level(logging.ERROR):
            assert not source.reload()
        assert source.current is in_force
        assert why in caplog.text
    path.unlink()
    assert not source.reload()
    assert source.current is in_force


def test_load_file_names_its_problems(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read"):
        load_file(tmp_path / "missing.toml")
    path = write(tmp_path / "c.toml", '[[credentials]]\nname = "n"\ntoken = "t0123456789abcdef"\nextra = 1\n')
    with pytest.raises(CredentialsError, match=r"credentials\.0\.extra: unknown key"):
        load_file(path)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("collector.example", False), ("", False)],
)  # fmt: skip
def test_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
