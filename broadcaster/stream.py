"""Each topic's stream: its position (epoch and seq) and a bounded history. No I/O.

The hub owns one :class:`History` and is its only caller, so nothing here locks or awaits;
the time is passed in. A topic's *stream* exists from its first publish or subscription. Its
``seq`` rises by exactly 1 per publish; its ``epoch`` names the life of that numbering and is
new whenever the stream is created again after it was forgotten.

Bounds (see :class:`History`): each stream keeps at most ``size`` entries and ``max_bytes``
bytes; a stream nobody published to for ``ttl`` seconds is forgotten; past ``total_bytes``
over all streams, the least recently published streams are forgotten first. A stream with
subscribers is never forgotten (its subscribers hold positions in its epoch, and live ``seq``
must never go back): it loses its entries instead, and keeps its position.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import StrEnum
from itertools import islice
from typing import TYPE_CHECKING

from broadcaster.protocol import Frame

if TYPE_CHECKING:
    from collections.abc import Sequence

    from broadcaster.protocol import Payload, Position

# Bytes charged per stream and per entry beyond the messages themselves: the Python objects
# that hold them (measured with tracemalloc, rounded up), so that the budget bounds memory
# even for many small topics.
STREAM_OVERHEAD = 1280
ENTRY_OVERHEAD = 448


class Outcome(StrEnum):
    """What became of a resume (``since``), as the metrics count it."""

    RECOVERED = "recovered"
    NEW_EPOCH = "new_epoch"
    NOT_RETAINED = "not_retained"
    OVER_LIMIT = "over_limit"
    INVALID = "invalid_position"


class Entry:
    """One published message kept in history, with the frames encoded for it so far.

    A frame is encoded at most once per entry: the live fan-out's frame is kept, and replays
    reuse it.
    """

    __slots__ = ("mux", "payload", "raw", "seq", "size")

    def __init__(self, seq: int, payload: Payload, raw: Frame | None, mux: Frame | None) -> None:
        self.seq = seq
        self.payload = payload
        self.raw = raw
        self.mux = mux
        self.size = ENTRY_OVERHEAD + len(payload.raw) + len(payload.json or "")
        if raw is not None:
            self.size += raw.size
        if mux is not None:
            self.size += mux.size + len(mux.data)


class Stream:
    """One topic's position and retained entries; :class:`History` changes it."""

    __slots__ = ("bytes", "entries", "epoch", "pinned", "published_at", "seq")

    def __init__(self, epoch: str, now: float) -> None:
        self.epoch = epoch
        self.seq = 0
        self.entries: deque[Entry] = deque()
        self.bytes = 0
        self.published_at = now
        # Whether the topic has local subscribers: then the stream is never forgotten.
        self.pinned = False


@dataclass(frozen=True, slots=True)
class Recovery:
    """The answer to a resume or a rewind: whether it is complete, and what to replay."""

    outcome: Outcome
    entries: Sequence[Entry]

    @property
    def recovered(self) -> bool:
        """Whether the client misses nothing between its position and the live messages."""
        return self.outcome is Outcome.RECOVERED


@dataclass(frozen=True, slots=True)
class HistoryStatistics:
    """A snapshot of every stream's history."""

    streams: int
    messages: int
    bytes: int
    evicted: int
    expired: int


class History:
    """Every topic's stream, within the history bounds.

    Args:
        size: entries kept per topic; 0 keeps positions only.
        max_bytes: bytes kept per topic.
        ttl: seconds after a topic's last publish when it is forgotten, epoch included.
        total_bytes: bytes kept over all topics, per-stream overhead included; past it the
            least recently published topics are forgotten first.
        recovery_max: the most entries one resume or rewind replays.
        epoch_prefix: the part of every epoch that names this process's life; random unless
            a test gives one.
    """

    def __init__(
        self,
        *,
        size: int = 1000,
        max_bytes: int = 1024 * 1024,
        ttl: float = 120.0,
        total_bytes: int = 64 * 1024 * 1024,
        recovery_max: int = 1000,
        epoch_prefix: str | None = None,
    ) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.total_bytes = total_bytes
        self.recovery_max = recovery_max
        self._prefix = secrets.token_hex(4) if epoch_prefix is None else epoch_prefix
        self._created = 0
        self._streams: dict[str, Stream] = {}
        # Streams that may be forgotten or trimmed, least recently published first: all but
        # the pinned ones without entries, which cost nothing here and are never forgotten.
        self._order: OrderedDict[str, Stream] = OrderedDict()
        self._bytes = 0
        self._messages = 0
        self._evicted = 0
        self._expired = 0

    def get(self, name: str, now: float) -> Stream | None:
        """Return ``name``'s stream, or ``None`` if it has none (or it has expired)."""
        stream = self._streams.get(name)
        if stream is not None and self._stale(stream, now):
            self._forget(name, stream)
            self._expired += 1
            return None
        return stream

    def open(self, name: str, now: float) -> Stream:
        """Return ``name``'s stream, creating it (with a new epoch) if it has none."""
        stream = self.get(name, now)
        if stream is None:
            self._created += 1
            stream = self._streams[name] = Stream(f"{self._prefix}-{self._created:x}", now)
            self._order[name] = stream
            self._bytes += STREAM_OVERHEAD
            self._evict(keep=name)
        return stream

    def publish(self, name: str, now: float) -> Stream:
        """Give the next position of ``name``: its seq rises by 1."""
        stream = self._streams.get(name)
        if stream is None or self._stale(stream, now):
            stream = self.open(name, now)
        stream.seq += 1
        stream.published_at = now
        try:
            self._order.move_to_end(name)
        except KeyError:
            self._order[name] = stream
            self._bytes += STREAM_OVERHEAD
        return stream

    def append(self, name: str, stream: Stream, entry: Entry) -> None:
        """Keep ``entry`` (the message at ``stream.seq``) within the bounds.

        Call after :meth:`publish`, once the live frames are encoded, so that they are kept.
        """
        if self.size == 0:
            return
        entries = stream.entries
        entries.append(entry)
        stream.bytes += entry.size
        self._bytes += entry.size
        self._messages += 1
        if len(entries) > self.size or stream.bytes > self.max_bytes:
            self._trim(stream)
        if self._bytes > self.total_bytes:
            self._evict(keep=name)

    def pin(self, name: str, now: float) -> Stream:
        """``name`` has subscribers: keep its stream, whatever the bounds."""
        stream = self.open(name, now)
        stream.pinned = True
        return stream

    def unpin(self, name: str, now: float) -> None:
        """``name`` has lost its last subscriber: its stream may be forgotten again."""
        stream = self._streams.get(name)
        if stream is None:
            return
        stream.pinned = False
        if name not in self._order:
            if now - stream.published_at > self.ttl:
                self._forget(name, stream)
                self._expired += 1
            else:
                # Its place by publish time is lost; it is forgotten a little late, if at all.
                self._order[name] = stream
                self._bytes += STREAM_OVERHEAD
                self._evict(keep=name)

    def expire(self, now: float) -> None:
        """Forget the streams (drop the entries of pinned ones) past their TTL."""
        while self._order:
            name, stream = next(iter(self._order.items()))
            if now - stream.published_at <= self.ttl:
                return
            self._forget(name, stream)
            self._expired += 1

    def since(self, stream: Stream, epoch: str, seq: int) -> Recovery:
        """What a client at ``(epoch, seq)`` has missed, if the history has it all."""
        if epoch != stream.epoch:
            return Recovery(Outcome.NEW_EPOCH, ())
        missed = stream.seq - seq
        if missed < 0:
            return Recovery(Outcome.INVALID, ())
        if missed > self.recovery_max:
            return Recovery(Outcome.OVER_LIMIT, ())
        if missed > len(stream.entries):
            return Recovery(Outcome.NOT_RETAINED, ())
        return Recovery(Outcome.RECOVERED, _latest(stream, missed))

    def last(self, stream: Stream, count: int) -> Recovery:
        """The latest ``count`` entries (at most ``recovery_max``); recovered if all exist."""
        wanted = min(count, stream.seq)
        taken = min(wanted, self.recovery_max, len(stream.entries))
        if taken == wanted:
            outcome = Outcome.RECOVERED
        else:
            outcome = Outcome.OVER_LIMIT if wanted > self.recovery_max else Outcome.NOT_RETAINED
        return Recovery(outcome, _latest(stream, taken))

    def page(self, stream: Stream, since: Position | None, limit: int) -> Recovery:
        """Up to ``limit`` entries for ``GET /history``: the latest ones, or the first ones
        after ``since`` (recovered unless some of those are no longer kept)."""
        if since is None:
            return Recovery(Outcome.RECOVERED, _latest(stream, min(limit, len(stream.entries))))
        if since.epoch != stream.epoch:
            return Recovery(Outcome.NEW_EPOCH, ())
        missed = stream.seq - since.seq
        if missed < 0:
            return Recovery(Outcome.INVALID, ())
        if missed > len(stream.entries):
            return Recovery(Outcome.NOT_RETAINED, ())
        start = len(stream.entries) - missed
        return Recovery(Outcome.RECOVERED, list(islice(stream.entries, start, start + limit)))

    def raw_frame(self, stream: Stream, entry: Entry) -> Frame:
        """The raw-mode frame of ``entry``, encoded on first use and kept."""
        if entry.raw is None:
            entry.raw = Frame.of(entry.payload.raw)
            self._grow(stream, entry, entry.raw.size)
        return entry.raw

    def mux_frame(self, name: str, stream: Stream, entry: Entry) -> Frame:
        """The multiplexed envelope of ``entry``, encoded on first use and kept."""
        if entry.mux is None:
            entry.mux = entry.payload.envelope(name, entry.seq)
            self._grow(stream, entry, entry.mux.size + len(entry.mux.data))
        return entry.mux

    def settle(self, name: str, stream: Stream) -> None:
        """Apply the bounds again after frames were encoded for a replay."""
        self._trim(stream)
        self._evict(keep=name)

    def statistics(self) -> HistoryStatistics:
        """Return how much is kept, and how many streams were forgotten and why."""
        return HistoryStatistics(
            streams=len(self._streams),
            messages=self._messages,
            bytes=self._bytes,
            evicted=self._evicted,
            expired=self._expired,
        )

    def _stale(self, stream: Stream, now: float) -> bool:
        return not stream.pinned and now - stream.published_at > self.ttl

    def _grow(self, stream: Stream, entry: Entry, size: int) -> None:
        entry.size += size
        # Entries are contiguous up to stream.seq: this one is still kept if it is that recent.
        if stream.seq - len(stream.entries) < entry.seq <= stream.seq:
            stream.bytes += size
            self._bytes += size

    def _trim(self, stream: Stream) -> None:
        entries = stream.entries
        while entries and (len(entries) > self.size or stream.bytes > self.max_bytes):
            freed = entries.popleft().size
            stream.bytes -= freed
            self._bytes -= freed
            self._messages -= 1

    def _evict(self, keep: str) -> None:
        # The stream being written is evicted last: forgetting it would forget the position
        # just handed out. The budget is at least one topic's max bytes (see the settings).
        order = self._order
        while self._bytes > self.total_bytes and order:
            name, stream = next(iter(order.items()))
            if name == keep:
                if len(order) == 1:
                    return
                order.move_to_end(name)
                continue
            self._forget(name, stream)
            self._evicted += 1

    def _forget(self, name: str, stream: Stream) -> None:
        """Drop the stream's entries; forget it altogether unless it has subscribers."""
        # stream.bytes is what its entries take.
        self._bytes -= stream.bytes
        self._messages -= len(stream.entries)
        stream.bytes = 0
        stream.entries.clear()
        if self._order.pop(name, None) is not None:
            self._bytes -= STREAM_OVERHEAD
        if not stream.pinned:
            del self._streams[name]


def _latest(stream: Stream, count: int) -> list[Entry]:
    """The last ``count`` entries, oldest first."""
    if count <= 0:
        return []
    latest = list(islice(reversed(stream.entries), count))
    latest.reverse()
    return latest
