"""Tests for broadcaster.policy.decide: every branch, as plain sync calls."""

from __future__ import annotations

import pytest

from broadcaster.policy import Action, Overflow, decide

MAX_BYTES = 100
LAG_TIMEOUT = 10.0


def _decide(
    policy: Overflow,
    *,
    queue_empty: bool = False,
    size: int = 10,
    overflowing_for: float | None = None,
) -> Action:
    return decide(
        policy,
        queue_empty=queue_empty,
        size=size,
        max_bytes=MAX_BYTES,
        overflowing_for=overflowing_for,
        lag_timeout=LAG_TIMEOUT,
    )


@pytest.mark.parametrize("policy", list(Overflow))
@pytest.mark.parametrize("overflowing_for", [LAG_TIMEOUT, LAG_TIMEOUT + 0.001, 1e9])
def test_lag_disconnects_whatever_the_policy(policy: Overflow, overflowing_for: float) -> None:
    """An outbox overflowing for lag_timeout or longer is disconnected for lag under any policy."""
    assert _decide(policy, overflowing_for=overflowing_for) is Action.DISCONNECT_LAG


@pytest.mark.parametrize("policy", list(Overflow))
@pytest.mark.parametrize("queue_empty", [True, False])
@pytest.mark.parametrize("overflowing_for", [None, 0.0, LAG_TIMEOUT - 0.001, LAG_TIMEOUT, 1e9])
def test_an_oversized_message_is_dropped_whatever_the_policy(
    policy: Overflow, queue_empty: bool, overflowing_for: float | None
) -> None:
    """A message bigger than max_bytes is dropped as oversized, even on a lagging outbox."""
    action = _decide(
        policy, queue_empty=queue_empty, size=MAX_BYTES + 1, overflowing_for=overflowing_for
    )
    assert action is Action.DROP_OVERSIZED


@pytest.mark.parametrize("queue_empty", [True, False])
@pytest.mark.parametrize("overflowing_for", [None, 0.0, LAG_TIMEOUT - 0.001])
def test_disconnect_policy_disconnects_when_full(
    queue_empty: bool, overflowing_for: float | None
) -> None:
    """The disconnect policy cuts off an outbox that a fitting-size message does not fit."""
    action = _decide(Overflow.DISCONNECT, queue_empty=queue_empty, overflowing_for=overflowing_for)
    assert action is Action.DISCONNECT_FULL


@pytest.mark.parametrize("size", [1, MAX_BYTES])
@pytest.mark.parametrize("overflowing_for", [None, 0.0, LAG_TIMEOUT - 0.001])
def test_drop_oldest_evicts_when_something_is_queued(
    size: int, overflowing_for: float | None
) -> None:
    """The drop_oldest policy evicts the oldest message when there is one to evict."""
    action = _decide(
        Overflow.DROP_OLDEST, queue_empty=False, size=size, overflowing_for=overflowing_for
    )
    assert action is Action.EVICT_OLDEST


def test_drop_oldest_drops_the_new_message_when_nothing_is_queued() -> None:
    """The drop_oldest policy drops the new message when there is nothing left to evict."""
    assert _decide(Overflow.DROP_OLDEST, queue_empty=True) is Action.DROP_NEW


@pytest.mark.parametrize("queue_empty", [True, False])
@pytest.mark.parametrize("overflowing_for", [None, 0.0, LAG_TIMEOUT - 0.001])
def test_drop_newest_drops_the_new_message(
    queue_empty: bool, overflowing_for: float | None
) -> None:
    """The drop_newest policy always drops the message that does not fit."""
    action = _decide(Overflow.DROP_NEWEST, queue_empty=queue_empty, overflowing_for=overflowing_for)
    assert action is Action.DROP_NEW


def test_a_message_exactly_max_bytes_is_not_oversized() -> None:
    """A message of exactly max_bytes can fit after evictions, so it is not dropped outright."""
    assert _decide(Overflow.DISCONNECT, size=MAX_BYTES) is Action.DISCONNECT_FULL
