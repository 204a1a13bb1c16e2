"""Pure decisions: what happens to a message that does not fit an outbox.

No I/O and no ``await`` here, so every rule is a plain function of its inputs.
"""

from __future__ import annotations

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
