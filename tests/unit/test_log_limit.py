"""RateLimit: one line per distinct message per interval, then how many were held back."""

from __future__ import annotations

import logging

import pytest

from kvmeter.log_limit import RateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged() -> tuple[logging.Logger, list[str], Clock]:
    clock = Clock()
    logger = logging.Logger("t", logging.DEBUG)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger.addHandler(Keep())
    logger.addFilter(RateLimit(60, max_kinds=3, monotonic=clock))
    return logger, lines, clock


def test_a_storm_of_one_error_is_one_line_a_minute(logged: tuple[logging.Logger, list[str], Clock]) -> None:
    logger, lines, clock = logged
    for i in range(1200):  # 20 a second for a minute, numbers varying
        logger.error("%s [%s] %s", "FAIL", "rdkafka#consumer-1", f"Connect failed (after {i % 7}ms)")
        clock.now += 0.05
    assert lines == ["FAIL [rdkafka#consumer-1] Connect failed (after 0ms)"]
    clock.now += 1
    logger.error("%s [%s] %s", "FAIL", "rdkafka#consumer-1", "Connect failed (after 3ms)")
    assert lines[-1] == (
        "FAIL [rdkafka#consumer-1] Connect failed (after 3ms) (1199 more like this in the last 60 s)"
    )


def test_distinct_messages_and_levels_each_pass(logged: tuple[logging.Logger, list[str], Clock]) -> None:
    logger, lines, _ = logged
    logger.error("broker down")
    logger.warning("broker down")
    logger.error("group rebalanced")
    logger.error("broker down")
    assert lines == ["broker down", "broker down", "group rebalanced"]
    logger.error("a fourth kind")  # past max_kinds: the oldest kind is forgotten, not the new one
    logger.error("broker down")
    assert lines[-2:] == ["a fourth kind", "broker down"]
