"""Pure decisions: what happens to a message that does not fit an outbox, and rate limits.

No I/O, no ``await`` and no clock here: callers pass the time in, so every rule is a plain
function of its inputs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum, StrEnum


class Overflow(StrEnum):
    """What an outbox does with a message that does not fit."""

    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    DISCONNECT = "disconnect"


class Action(Enum):
    """What becomes of a message that does not fit an outbox."""

    DROP_OVERSIZED = "drop_oversized"
    EVICT_OLDEST = "evict_oldest"
    DROP_NEW = "drop_new"
    DISCONNECT_FULL = "disconnect_full"
    DISCONNECT_LAG = "disconnect_lag"


def decide(
    policy: Overflow,
    *,
    queue_empty: bool,
    size: int,
    max_bytes: int,
    overflowing_for: float | None,
    lag_timeout: float,
) -> Action:
    """Decide what to do with a message that does not fit an outbox as it stands.

    Args:
        policy: the server's overflow policy.
        queue_empty: nothing droppable is queued, so evicting cannot make room.
        size: the message's size in bytes.
        max_bytes: the outbox's byte bound.
        overflowing_for: seconds since the outbox last overflowed without catching up since,
            or ``None`` when it is not overflowing.
        lag_timeout: how long an outbox may keep overflowing before its connection is cut off.
    """
    if size > max_bytes:
        # No amount of evicting makes room for it: drop it whatever the policy says. It says
        # nothing about the consumer, so it neither starts an overflow episode nor ends one.
        return Action.DROP_OVERSIZED
    if overflowing_for is not None and overflowing_for >= lag_timeout:
        return Action.DISCONNECT_LAG
    if policy is Overflow.DISCONNECT:
        return Action.DISCONNECT_FULL
    if policy is Overflow.DROP_OLDEST and not queue_empty:
        return Action.EVICT_OLDEST
    return Action.DROP_NEW


@dataclass(slots=True)
class TokenBucket:
    """A rate limit: ``rate`` tokens a second, at most ``capacity`` saved up for a burst.

    Args:
        rate: tokens added a second.
        capacity: the most tokens it holds; it starts full.
        now: the time it starts at, in seconds on any monotonic clock.
    """

    rate: float
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        """Return a bucket that allows a whole burst at once."""
        return cls(rate, capacity, capacity, now)

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if the bucket holds them at ``now``; say whether it did."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = now
        if amount > self.tokens:
            return False
        self.tokens -= amount
        return True


class AddressLimiter:
    """One token bucket per client address, for at most ``max_addresses`` addresses.

    When a new address would exceed the bound, the least recently seen one is forgotten, so a
    flood from many (or spoofed) addresses cannot grow the table; a forgotten address starts
    again with a full bucket.

    Args:
        rate: requests a second allowed per address, ``rate`` of them in a burst (at least 1).
        max_addresses: how many addresses are remembered.
    """

    def __init__(self, rate: float, max_addresses: int) -> None:
        self._rate = rate
        self._capacity = max(1.0, rate)
        self._max_addresses = max_addresses
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, address: str, now: float) -> bool:
        """Count one request from ``address`` at ``now``; say whether it is within the limit."""
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= self._max_addresses:
                self._buckets.popitem(last=False)
            bucket = self._buckets[address] = TokenBucket.full(self._rate, self._capacity, now)
        else:
            self._buckets.move_to_end(address)
        return bucket.take(1, now)

    def __len__(self) -> int:
        return len(self._buckets)


class PenaltyBox:
    """Client addresses refused for a while, at most ``max_addresses`` of them.

    When a new address would exceed the bound, the one whose penalty ends first is let go.

    Args:
        seconds: how long an address stays refused after :meth:`punish`; 0 refuses none.
        max_addresses: how many addresses are remembered.
    """

    def __init__(self, seconds: float, max_addresses: int) -> None:
        self.seconds = seconds
        self._max_addresses = max_addresses
        # Address to the end of its penalty; insertion order is the order penalties end.
        self._until: OrderedDict[str, float] = OrderedDict()

    def punish(self, address: str, now: float) -> None:
        """Refuse ``address`` from ``now`` for the penalty's length."""
        if self.seconds <= 0:
            return
        self._until.pop(address, None)
        if len(self._until) >= self._max_addresses:
            self._until.popitem(last=False)
        self._until[address] = now + self.seconds

    def refuses(self, address: str, now: float) -> bool:
        """Whether ``address`` is serving a penalty at ``now``."""
        until = self._until.get(address)
        if until is None:
            return False
        if now < until:
            return True
        del self._until[address]
        return False

    def __len__(self) -> int:
        return len(self._until)
