"""The reload seam: asked for by a signal, run at the daemon's safe point, each item on its own."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from kvmeter.reload import Reloads


def test_a_bad_item_is_refused_alone_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []
    failures: list[str] = []
    reloads = Reloads(failures.append)

    def broken() -> str:
        raise ValueError("rules.toml: line 3: not valid TOML")

    reloads.add("first", lambda: done.append("first") or "ok")
    reloads.add("broken", broken)
    reloads.add("last", lambda: done.append("last") or "ok")
    assert reloads.run_pending() == []  # nobody asked
    assert done == []
    with caplog.at_level(logging.INFO, "kvmeter.reload"):
        reloads.request()
        assert reloads.run_pending() == ["broken"]
    assert done == ["first", "last"]
    assert failures == ["broken"]
    assert (
        "reload of broken refused, the one in force stays: rules.toml: line 3: not valid TOML" in caplog.text
    )
    assert "reloaded last: ok" in caplog.text
    assert reloads.run_pending() == []  # once per request
    assert done == ["first", "last"]


def test_the_signal_only_asks() -> None:
    ran: list[str] = []
    woken: list[bool] = []
    reloads = Reloads()
    reloads.add("thing", lambda: ran.append("thing") or "ok")
    previous = signal.getsignal(signal.SIGHUP)
    try:
        reloads.install(then=lambda: woken.append(reloads.pending))  # the loop's wakeup
        os.kill(os.getpid(), signal.SIGHUP)
        assert reloads.pending
        assert woken == [True]  # after asking
        assert ran == []  # not in the handler: at the loop's safe point
        reloads.run_pending()
        assert ran == ["thing"]
    finally:
        signal.signal(signal.SIGHUP, previous)
