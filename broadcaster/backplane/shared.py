"""History shared by every node through the broker: what to read, and what a read means. No I/O.

With Redis and history on, the broker numbers each topic's messages (see
:mod:`broadcaster.backplane.redis_broker`). A subscribe that resumes (``since``) or rewinds
(``last``) reads a *slice* of the topic's stream there: its epoch, its seq at the moment of the
read, and the entries from some seq on, in one atomic step. :func:`read_start` says where a
read starts; :func:`judge` and :func:`judge_page` say what the slice is worth to the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from broadcaster.stream import Outcome

if TYPE_CHECKING:
    from collections.abc import Sequence

    from broadcaster.protocol import Position


MAX_START = 10**13


@dataclass(frozen=True, slots=True)
class Slice:
    """A topic's stream as one atomic read saw it.

    Args:
        epoch: the stream's epoch (created by the read if the stream had none).
        seq: the last seq given in that epoch, 0 if none.
        entries: ``(seq, message)`` from the read's start on, oldest first; ``message`` is
            :func:`broadcaster.backplane.encode`'s.
    """

    epoch: str
    seq: int
    entries: Sequence[tuple[int, bytes]]

    def retained(self, size: int) -> Slice:
        """The slice as if the stream kept exactly its latest ``size`` entries.

        ``XADD ... MAXLEN ~`` keeps at least that many, often more; a resume is answered as
        ``HISTORY_SIZE`` says, on every node alike, whatever Redis has trimmed so far.
        """
        oldest = self.seq - size
        if not self.entries or self.entries[0][0] > oldest:
            return self
        return Slice(self.epoch, self.seq, [entry for entry in self.entries if entry[0] > oldest])


def read_start(since: Position | None, last: int | None, limit: int) -> int:
    """Where a read starts: a seq (at least 1) after ``since``, or ``-K`` for the latest K.

    Args:
        since: resume after this position.
        last: otherwise, the latest ``last`` messages (at most ``limit``).
        limit: the most entries replayed (``RECOVERY_MAX``, or a page's size).
    """
    if since is not None:
        # Past any seq a stream reaches, and still an exact integer in Redis's Lua: a client's
        # far-off seq is judged invalid after the read rather than breaking it.
        return min(since.seq + 1, MAX_START)
    return -min(last or 0, limit)


def judge(
    since: Position | None, last: int | None, read: Slice, recovery_max: int
) -> tuple[Outcome | None, Sequence[tuple[int, bytes]]]:
    """What a subscribe gets from ``read``: its outcome (``None`` for a plain subscribe) and
    the entries to replay, following :class:`broadcaster.stream.History`'s rules."""
    entries = read.entries
    if since is not None:
        if since.epoch != read.epoch:
            return Outcome.NEW_EPOCH, ()
        missed = read.seq - since.seq
        if missed < 0:
            return Outcome.INVALID, ()
        if missed > recovery_max:
            return Outcome.OVER_LIMIT, ()
        if len(entries) != missed or (entries and entries[0][0] != since.seq + 1):
            return Outcome.NOT_RETAINED, ()
        return Outcome.RECOVERED, entries
    if last is not None:
        wanted = min(last, read.seq)
        if wanted > recovery_max:
            return Outcome.OVER_LIMIT, entries
        if len(entries) != wanted:
            return Outcome.NOT_RETAINED, entries
        return Outcome.RECOVERED, entries
    return None, ()


def judge_page(
    since: Position | None, read: Slice
) -> tuple[bool | None, Sequence[tuple[int, bytes]]]:
    """What ``GET /history`` answers from ``read``: whether the entries follow ``since`` with
    none missing (``None`` without ``since``), and the entries."""
    if since is None:
        return None, read.entries
    if since.epoch != read.epoch or since.seq > read.seq:
        return False, ()
    entries = read.entries
    if since.seq == read.seq or (entries and entries[0][0] == since.seq + 1):
        return True, entries
    return False, ()
