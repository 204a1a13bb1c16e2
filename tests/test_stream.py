"""Tests for broadcaster.stream: positions, history bounds, expiry, eviction. No I/O."""

from __future__ import annotations

from typing import Any

import pytest

from broadcaster.protocol import Payload, Position
from broadcaster.stream import ENTRY_OVERHEAD, STREAM_OVERHEAD, Entry, History, Outcome, Stream


def make_history(**options: Any) -> History:
    """A history with a fixed epoch prefix, and small bounds unless told otherwise."""
    settings: dict[str, Any] = {
        "size": 10,
        "max_bytes": 100_000,
        "ttl": 60.0,
        "total_bytes": 1_000_000,
        "recovery_max": 5,
        "epoch_prefix": "p",
    }
    return History(**{**settings, **options})


def publish(history: History, name: str, data: str, now: float = 0.0) -> Stream:
    """Publish ``data`` to ``name`` at ``now``, keeping it, as the hub does."""
    stream = history.publish(name, now)
    history.append(name, stream, Entry(stream.seq, Payload(data), None, None))
    return stream


def seqs(entries: Any) -> list[int]:
    """The seqs of some entries."""
    return [entry.seq for entry in entries]


def test_seq_rises_by_one_per_publish_within_one_epoch() -> None:
    """Each publish takes the next seq; the epoch stays; other topics count on their own."""
    history = make_history()
    first = publish(history, "a", "x")
    assert (first.epoch, first.seq) == ("p-1", 1)
    assert publish(history, "a", "y").seq == 2
    assert publish(history, "b", "z").epoch == "p-2"
    assert history.get("a", 0.0) is first
    assert first.seq == 2


def test_the_count_bound_keeps_the_latest_entries() -> None:
    """Past ``size`` entries, the oldest go first."""
    history = make_history(size=3)
    for n in range(5):
        stream = publish(history, "t", str(n))
    assert seqs(stream.entries) == [3, 4, 5]
    assert history.statistics().messages == 3


def test_the_byte_bound_keeps_the_latest_entries() -> None:
    """Past ``max_bytes`` per topic, the oldest entries go first."""
    entry_size = ENTRY_OVERHEAD + 100
    history = make_history(max_bytes=2 * entry_size)
    for _ in range(4):
        stream = publish(history, "t", "x" * 100)
    assert seqs(stream.entries) == [3, 4]
    assert stream.bytes == 2 * entry_size
    assert history.statistics().bytes == STREAM_OVERHEAD + 2 * entry_size


def test_a_message_larger_than_max_bytes_is_not_kept_but_still_numbered() -> None:
    """An entry over the topic's byte bound is dropped at once; its seq is still taken."""
    history = make_history(max_bytes=ENTRY_OVERHEAD + 10)
    stream = publish(history, "t", "x" * 11)
    assert (stream.seq, len(stream.entries)) == (1, 0)
    assert history.since(stream, stream.epoch, 0).outcome is Outcome.NOT_RETAINED


def test_an_idle_topic_is_forgotten_after_its_ttl_and_gets_a_new_epoch() -> None:
    """A topic nobody published to for ttl seconds is forgotten; publishing again starts over."""
    history = make_history(ttl=10.0)
    old = publish(history, "t", "x", now=0.0)
    publish(history, "t", "y", now=5.0)
    history.expire(15.0)
    assert history.get("t", 15.0) is old
    history.expire(15.1)
    assert history.get("t", 15.1) is None
    assert history.statistics() == history.statistics().__class__(
        streams=0, messages=0, bytes=0, evicted=0, expired=1
    )
    new = publish(history, "t", "z", now=16.0)
    assert (new.epoch, new.seq) != (old.epoch, 1)
    assert new.seq == 1


def test_get_forgets_an_expired_topic_even_before_a_sweep() -> None:
    """A stream past its TTL is not handed out, whether or not expire() ran."""
    history = make_history(ttl=10.0)
    old = publish(history, "t", "x", now=0.0)
    assert history.open("t", 11.0).epoch != old.epoch
    assert history.statistics().expired == 1


def test_a_topic_with_subscribers_keeps_its_position_past_its_ttl() -> None:
    """A pinned stream loses its entries at its TTL but keeps its epoch and seq."""
    history = make_history(ttl=10.0)
    stream = publish(history, "t", "x", now=0.0)
    history.pin("t", 1.0)
    history.expire(20.0)
    assert history.get("t", 20.0) is stream
    assert (stream.seq, len(stream.entries)) == (1, 0)
    assert publish(history, "t", "y", now=21.0) is stream
    assert seqs(stream.entries) == [2]
    history.unpin("t", 22.0)
    history.expire(31.1)
    assert history.get("t", 31.1) is None


def test_unpinning_a_long_idle_topic_forgets_it() -> None:
    """A topic whose last subscriber leaves after its TTL is forgotten at once."""
    history = make_history(ttl=10.0)
    history.pin("t", 0.0)
    history.expire(11.0)
    history.unpin("t", 11.0)
    assert history.statistics().streams == 0


def test_the_total_budget_forgets_the_least_recently_published_topics_first() -> None:
    """Past total_bytes, the topics published longest ago are evicted first, and counted."""
    per_topic = STREAM_OVERHEAD + ENTRY_OVERHEAD + 10
    history = make_history(total_bytes=3 * per_topic)
    for name in ("a", "b", "c"):
        publish(history, name, "x" * 10)
    publish(history, "a", "")  # a is now the most recently published
    history.settle("a", history.open("a", 0.0))
    assert history.get("b", 0.0) is None
    assert history.get("a", 0.0) is not None
    assert history.get("c", 0.0) is not None
    stats = history.statistics()
    assert stats.evicted == 1
    assert stats.bytes <= 3 * per_topic


def test_the_budget_spares_pinned_positions_but_not_their_entries() -> None:
    """A pinned topic at the front of the eviction order loses its entries, not its position."""
    per_topic = STREAM_OVERHEAD + ENTRY_OVERHEAD + 10
    history = make_history(total_bytes=2 * per_topic)
    pinned = publish(history, "a", "x" * 10)
    history.pin("a", 0.0)
    publish(history, "b", "x" * 10)
    publish(history, "c", "x" * 10)
    assert history.get("a", 0.0) is pinned
    assert (pinned.seq, len(pinned.entries)) == (1, 0)
    assert history.statistics().bytes <= 2 * per_topic


def test_a_hundred_thousand_topics_stay_within_the_total_budget() -> None:
    """Publishing to 100,000 distinct topics keeps the history's bytes within the budget."""
    budget = 1024 * 1024
    history = make_history(total_bytes=budget)
    for n in range(100_000):
        publish(history, f"topic-{n}", "x" * 20, now=n / 1000)
        assert history.statistics().bytes <= budget
    stats = history.statistics()
    assert stats.streams <= budget // STREAM_OVERHEAD
    assert stats.evicted == 100_000 - stats.streams
    assert history.get("topic-99999", 100.0) is not None


def test_since_recovers_what_was_missed_in_order() -> None:
    """A position in the current epoch with every later entry kept is recovered in order."""
    history = make_history()
    for n in range(4):
        stream = publish(history, "t", str(n))
    recovery = history.since(stream, stream.epoch, 1)
    assert recovery.recovered
    assert seqs(recovery.entries) == [2, 3, 4]
    assert history.since(stream, stream.epoch, 4).recovered
    assert history.since(stream, stream.epoch, 4).entries == []


@pytest.mark.parametrize(
    ("epoch", "seq", "outcome"),
    [
        ("other", 8, Outcome.NEW_EPOCH),
        ("p-1", 9, Outcome.INVALID),  # a seq the epoch never reached
        ("p-1", 1, Outcome.OVER_LIMIT),  # 7 missed, recovery_max is 5
        ("p-1", 0, Outcome.OVER_LIMIT),
    ],
)
def test_since_says_why_it_cannot_recover(epoch: str, seq: int, outcome: Outcome) -> None:
    """Another epoch, a future seq and too many missed messages are not recovered."""
    history = make_history(recovery_max=5)
    for n in range(8):
        stream = publish(history, "t", str(n))
    recovery = history.since(stream, epoch, seq)
    assert (recovery.outcome, recovery.recovered, recovery.entries) == (outcome, False, ())


def test_since_past_the_kept_entries_is_not_retained() -> None:
    """Missed entries that the history no longer keeps make the resume unrecovered."""
    history = make_history(size=2, recovery_max=100)
    for n in range(5):
        stream = publish(history, "t", str(n))
    assert history.since(stream, stream.epoch, 2).outcome is Outcome.NOT_RETAINED
    assert seqs(history.since(stream, stream.epoch, 3).entries) == [4, 5]


def test_with_history_off_positions_remain_and_nothing_is_kept() -> None:
    """size 0 keeps no entries; a client that missed nothing still resumes."""
    history = make_history(size=0)
    for n in range(3):
        stream = publish(history, "t", str(n))
    assert (stream.seq, len(stream.entries)) == (3, 0)
    assert history.since(stream, stream.epoch, 3).recovered
    assert history.since(stream, stream.epoch, 2).outcome is Outcome.NOT_RETAINED
    assert history.statistics().messages == 0


def test_last_replays_the_latest_entries_up_to_the_cap() -> None:
    """last K gives the latest K entries, all there are if fewer, at most recovery_max."""
    history = make_history(recovery_max=3)
    for n in range(5):
        stream = publish(history, "t", str(n))
    assert seqs(history.last(stream, 2).entries) == [4, 5]
    assert history.last(stream, 2).recovered
    capped = history.last(stream, 4)
    assert (capped.outcome, seqs(capped.entries)) == (Outcome.OVER_LIMIT, [3, 4, 5])
    assert history.last(stream, 0).entries == []
    fresh = history.open("new", 0.0)
    assert history.last(fresh, 10).recovered  # nothing was ever published: nothing missed


def test_page_pages_forward_from_since() -> None:
    """page gives at most limit entries after since, or the latest ones without since."""
    history = make_history()
    for n in range(6):
        stream = publish(history, "t", str(n))
    assert seqs(history.page(stream, Position(stream.epoch, 1), 2).entries) == [2, 3]
    assert seqs(history.page(stream, None, 2).entries) == [5, 6]
    assert history.page(stream, Position("nope", 1), 2).outcome is Outcome.NEW_EPOCH
    assert history.page(stream, Position(stream.epoch, 7), 2).outcome is Outcome.INVALID


def test_frames_are_encoded_once_and_counted() -> None:
    """A replay's frame is encoded on first use, kept, and its bytes counted in the budget."""
    history = make_history()
    stream = publish(history, "t", "hello")
    before = history.statistics().bytes
    [entry] = stream.entries
    mux = history.mux_frame("t", stream, entry)
    assert history.mux_frame("t", stream, entry) is mux
    raw = history.raw_frame(stream, entry)
    assert history.raw_frame(stream, entry) is raw
    assert mux.data == '{"topic":"t","seq":1,"data":"hello"}'
    assert raw.data == "hello"
    grown = mux.size + len(mux.data) + raw.size
    assert history.statistics().bytes == before + grown
    assert stream.bytes == entry.size
