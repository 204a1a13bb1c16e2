"""Tests for broadcaster.policy: overflow decisions and rate limits, as plain sync calls."""

from __future__ import annotations

import pytest

from broadcaster.policy import Action, AddressLimiter, Overflow, PenaltyBox, TokenBucket, decide

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


def test_a_bucket_allows_a_burst_then_refuses_until_it_refills() -> None:
    """A full bucket gives its capacity at once, then only what time has added since."""
    bucket = TokenBucket.full(rate=10, capacity=5, now=0.0)
    assert [bucket.take(1, now=0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.take(1, now=0.05)
    assert bucket.take(1, now=0.1)
    assert not bucket.take(1, now=0.1)


def test_a_bucket_never_saves_more_than_its_capacity() -> None:
    """However long it is left alone, a bucket holds at most its capacity."""
    bucket = TokenBucket.full(rate=100, capacity=10, now=0.0)
    assert bucket.take(10, now=0.0)
    assert not bucket.take(11, now=1000.0)
    assert bucket.take(10, now=1000.0)


def test_a_bucket_refuses_an_amount_above_what_it_holds_and_keeps_it() -> None:
    """A refused take leaves the tokens for a smaller one; a clock going back adds nothing."""
    bucket = TokenBucket.full(rate=1, capacity=100, now=5.0)
    assert not bucket.take(101, now=5.0)
    assert bucket.take(100, now=4.0)
    assert not bucket.take(1, now=4.5)


def test_addresses_are_limited_separately() -> None:
    """One address running out of handshakes does not hold back another."""
    limiter = AddressLimiter(rate=2, max_addresses=10)
    assert [limiter.allow("a", now=0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("b", now=0.0)
    assert limiter.allow("a", now=0.5)


def test_a_rate_below_one_still_allows_one_request() -> None:
    """With less than one handshake a second, a new address may still make one."""
    limiter = AddressLimiter(rate=0.5, max_addresses=10)
    assert [limiter.allow("a", now=0.0) for _ in range(2)] == [True, False]
    assert limiter.allow("a", now=2.0)


def test_the_address_table_stays_within_its_bound_forgetting_the_least_recent() -> None:
    """A flood from many addresses never grows the table past its bound."""
    limiter = AddressLimiter(rate=1, max_addresses=3)
    for n in range(1000):
        limiter.allow(f"10.0.{n // 256}.{n % 256}", now=0.0)
        assert len(limiter) <= 3
    assert [limiter.allow("a", now=1.0), limiter.allow("a", now=1.0)] == [True, False]
    limiter.allow("b", now=1.0)
    limiter.allow("a", now=1.0)  # "a" is now the most recently seen
    limiter.allow("c", now=1.0)
    limiter.allow("d", now=1.0)  # forgets "b", the least recently seen
    assert not limiter.allow("a", now=1.0)
    assert len(limiter) == 3


def test_a_penalty_refuses_an_address_until_it_ends() -> None:
    """A punished address is refused for the penalty's length, others never."""
    box = PenaltyBox(seconds=10, max_addresses=100)
    box.punish("a", now=0)
    assert (box.refuses("a", 9.9), box.refuses("b", 1), box.refuses("a", 10)) == (
        True,
        False,
        False,
    )
    assert len(box) == 0


def test_the_penalty_box_is_bounded_and_can_be_off() -> None:
    """Past its bound the penalty that ends first is let go; a zero penalty refuses nobody."""
    box = PenaltyBox(seconds=10, max_addresses=2)
    for n, address in enumerate("abc"):
        box.punish(address, now=n)
    assert (len(box), box.refuses("a", 3), box.refuses("c", 3)) == (2, False, True)
    off = PenaltyBox(seconds=0, max_addresses=2)
    off.punish("a", now=0)
    assert not off.refuses("a", 0)
