"""One load-generating process: its clients through the phases of a run, on its own loop.

The parent drives every worker over a pipe with the messages below. A worker connects its
clients and says :class:`Ready`. On :class:`Start` receivers begin counting and say
:class:`Started` (the publisher is started only once every receiver counts); the publisher
publishes and answers :class:`Published`, while slow receivers ration their reading, churn
ones come and go, and reconnecting ones drop their connection and resume on the next node.
On :class:`Finish` reconnecting clients caught between connections connect once more, and
receivers read freely until they have the last message of their topic, the connection ends
or the drain time runs out (``duration`` + ``drain`` seconds after the start, however late
Finish arrives), say :class:`Drained`, then close and answer :class:`Results`. Every wait is
bounded; a closed pipe means the parent is gone, and the worker stops.
"""

from __future__ import annotations

import logging
import random
import resource
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
from picows import WSError

from broadcaster.client import Tracker
from broadcaster.protocol import Mode
from broadcaster.stress.clients import (
    FREE_RECEIVE_BUFFER,
    HISTOGRAM_SIZE,
    Kind,
    Receiver,
    Tally,
    connect,
    subscribe,
)
from broadcaster.stress.messages import (
    ClientResult,
    ClientSpec,
    Command,
    Drained,
    Failed,
    Finish,
    KindProgress,
    KindTotals,
    Progress,
    Published,
    Ready,
    Results,
    Start,
    Started,
    WorkerPlan,
)
from broadcaster.stress.publisher import Publisher, Via
from broadcaster.stress.resume import Judge, Resumer

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

# Handshakes one worker has in flight at once, so that the server's backlog is not flooded.
CONNECT_CONCURRENCY = 100
# How often a slow client's reading allowance is topped up.
PACE_SECONDS = 0.05
# Bounds on a churn client: sessions per run, and the shortest stay.
MAX_CHURN_SESSIONS = 10_000
MIN_CHURN_STAY = 0.02
# Seconds the parent may take to say Start (other workers may still be connecting).
START_TIMEOUT = 600.0
# Seconds beyond the run's duration the parent may take to say Finish.
FINISH_SLACK = 60.0
# Seconds given to closing handshakes at the end.
CLOSE_SECONDS = 2.0


@dataclass(slots=True)
class _Client:
    """A receiver's state across its connection, or across a churn client's sessions."""

    spec: ClientSpec
    rng: random.Random
    number: int = 0
    tally: Tally = field(default_factory=Tally)
    judge: Judge | None = None
    receiver: Receiver | None = None
    closes: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    span: int = 0
    connect_failures: int = 0
    drained: bool = True
    error: str | None = None

    def note_end(self, receiver: Receiver) -> None:
        """Count how a connection ended, unless the client ended it itself."""
        if receiver.close_code is not None:
            label = f"{receiver.close_code} {receiver.close_reason}".strip()
        elif receiver.transport is not None and receiver.transport.is_disconnected:
            label = "no close frame" if not receiver.left else ""
        else:
            label = ""
        if label:
            self.closes[label] = self.closes.get(label, 0) + 1

    def result(self) -> ClientResult:
        """Freeze what this client saw."""
        receiver = self.receiver
        errors = receiver.errors if receiver is not None else []
        judge = self.judge
        return ClientResult(
            kind=self.spec.kind,
            topic=self.spec.topic,
            received=self.tally.received,
            span=self.span,
            gaps=self.tally.gaps,
            reordered=self.tally.reordered + (judge.out_of_order if judge else 0),
            unparsed=self.tally.unparsed,
            last_counter=self.tally.last_counter,
            closes=self.closes,
            sessions=self.sessions,
            connect_failures=self.connect_failures,
            drained=self.drained,
            error=self.error or (errors[0] if errors else None),
            duplicates=judge.duplicates if judge else 0,
            recovered=judge.recovered if judge else 0,
            not_recovered=judge.not_recovered if judge else 0,
            digest=judge.digest.hexdigest() if judge else None,
        )


def main(plan: WorkerPlan, pipe: Connection) -> None:
    """Run one worker process until its run is over; the process entry point.

    Args:
        plan: the clients (or publisher) to run.
        pipe: the worker's end of the pipe to the parent; the worker closes it.
    """
    raise_file_limit(len(plan.clients) + len(plan.publisher.topics if plan.publisher else ()))
    # Ctrl-C on a terminal reaches the whole process group; the parent stops its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # picows logs every disconnect it initiates; the report counts them instead.
    logging.getLogger("picows").setLevel(logging.ERROR)
    try:
        anyio.run(Worker(plan, pipe).run, backend="asyncio")
    except Exception:
        # The parent reports the traceback; printing it here too would say it twice.
        pipe.send(Failed(plan.index, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        pipe.close()


def raise_file_limit(connections: int) -> None:
    """Raise the limit on open files to fit ``connections``: the hard limit too where the
    process may (as root), else the soft one up to the hard. Processes started afterwards (a
    spawned server) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return
        except (ValueError, OSError):
            wanted = hard  # not permitted: as far as the hard limit goes
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


class Worker:
    """The clients of one :class:`WorkerPlan`, driven by the parent's commands.

    Args:
        plan: what to run.
        pipe: to the parent.
    """

    def __init__(self, plan: WorkerPlan, pipe: Connection) -> None:
        self.plan = plan
        self.pipe = pipe
        self.clients = [
            _Client(spec, random.Random(f"{plan.seed}:{plan.index}:{number}"), number)
            for number, spec in enumerate(plan.clients)
        ]
        for client in self.clients:
            if client.spec.kind is Kind.RECONNECT:
                client.judge = Judge(Tracker.of([client.spec.topic]))
        self.urls = (plan.base_url, *plan.other_urls)
        # time.time_ns() at the end of the drain, once started: receivers stop counting then.
        self.deadline_ns: int | None = None
        self.publisher = Publisher(plan.publisher) if plan.publisher else None
        # Receivers connected so far, to spread them over the plan's source addresses.
        self._opened = 0

    async def run(self) -> None:
        """Connect, wait for Start, run the phases, report."""
        async with anyio.create_task_group() as tg:
            if self.publisher is not None:
                try:
                    await self.publisher.open()
                except (OSError, WSError) as error:
                    url = self.publisher.plan.base_url
                    self.pipe.send(Failed(self.plan.index, f"cannot publish to {url}: {error!r}"))
                    return
            else:
                await self._connect_all()
            self.pipe.send(self._ready())
            with anyio.fail_after(START_TIMEOUT):
                start = await self._receive()
            if not isinstance(start, Start):
                tg.cancel_scope.cancel()
                return
            tg.start_soon(self._report_progress)
            if self.publisher is not None:
                result = await self.publisher.run(start.t0_ns, start.bin_ns, start.bin_count)
                self.pipe.send(Published(result))
                with anyio.move_on_after(CLOSE_SECONDS):
                    await self.publisher.aclose()
            else:
                await self._receive_run(start)
            tg.cancel_scope.cancel()

    def _ready(self) -> Ready:
        subscribed: dict[str, int] = {}
        plan = self.plan.publisher
        if plan is not None and plan.via is Via.WS and plan.mode is Mode.RAW:
            # Raw publishing sockets are subscribers of their topic too.
            subscribed = dict.fromkeys(plan.topics, 1)
        failed = 0
        for client in self.clients:
            if client.receiver is not None:
                subscribed[client.spec.topic] = subscribed.get(client.spec.topic, 0) + 1
            elif client.spec.kind is not Kind.CHURN:
                failed += 1
        return Ready(self.plan.index, subscribed, failed)

    async def _receive(self) -> Command | None:
        """Return the parent's next command; ``None`` once the parent has gone."""
        await anyio.wait_readable(self.pipe)
        try:
            command: Command = self.pipe.recv()
        except EOFError:
            return None
        return command

    async def _connect_all(self) -> None:
        limiter = anyio.CapacityLimiter(CONNECT_CONCURRENCY)
        async with anyio.create_task_group() as tg:
            for client in self.clients:
                if client.spec.kind is not Kind.CHURN:
                    tg.start_soon(self._connect, client, limiter)

    async def _connect(self, client: _Client, limiter: anyio.CapacityLimiter) -> None:
        async with limiter:
            try:
                receiver = await self._open(client)
            except (OSError, WSError) as error:
                client.connect_failures += 1
                client.error = f"cannot connect: {error!r}"
                return
        client.receiver = receiver
        if client.spec.kind is Kind.STALLED:
            receiver.pause()

    async def _open(self, client: _Client) -> Receiver:
        """Connect one receiver and subscribe it; slow and stalled ones get a small buffer.

        Receivers are spread over the nodes; a reconnecting client takes the next node at
        each session and subscribes each topic ``since`` where it left it.
        """
        plan, topic = self.plan, client.spec.topic
        raw = plan.mode is Mode.RAW
        base_url = self.urls[(client.number + client.sessions) % len(self.urls)]
        receiver: Receiver
        if client.judge is not None:
            receiver = Resumer(client.tally, client.judge, topic)
        else:
            receiver = Receiver(client.tally, raw=raw)
        small = client.spec.kind in (Kind.SLOW, Kind.STALLED)
        source = None
        if plan.source_addresses > 1:
            self._opened += 1
            source = f"127.0.0.{1 + self._opened % plan.source_addresses}"
        try:
            with anyio.fail_after(plan.connect_timeout):
                transport = await connect(
                    f"{base_url}/ws/{topic}" if raw else f"{base_url}/ws",
                    receiver,
                    receive_buffer=plan.receive_buffer if small else FREE_RECEIVE_BUFFER,
                    source=source,
                )
                if isinstance(receiver, Resumer):
                    receiver.resubscribe()
                    await receiver.subscribed.wait()
                elif not raw:
                    await subscribe(transport, receiver, topic)
        except BaseException:
            # Timed out or cancelled half-way: a connection left open would go on feeding this
            # client's counts (a reconnecting client's next connection resumes too, and both
            # would deliver the same messages).
            receiver.leave(reset=True)
            raise
        receiver.deadline_ns = self.deadline_ns
        return receiver

    async def _receive_run(self, start: Start) -> None:
        # Known from the start rather than from Finish, which an overloaded loop may read late.
        deadline_ns = start.t0_ns + int((self.plan.duration + self.plan.drain) * 1e9)
        self.deadline_ns = deadline_ns
        for client in self.clients:
            client.tally.begin(start.t0_ns, start.bin_ns, start.bin_count)
            if client.receiver is not None:
                client.receiver.deadline_ns = deadline_ns
        self.pipe.send(Started(self.plan.index))
        slow = [c.receiver for c in self.clients if c.spec.kind is Kind.SLOW and c.receiver]
        stalled = [c.receiver for c in self.clients if c.spec.kind is Kind.STALLED and c.receiver]
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pace, slow)
            if self.plan.stall_for is not None:
                tg.start_soon(self._resume_later, stalled, self.plan.stall_for)
            for client in self.clients:
                if client.spec.kind is Kind.CHURN:
                    tg.start_soon(self._churn, client)
                elif client.spec.kind is Kind.RECONNECT:
                    tg.start_soon(self._reconnect, client)
            with anyio.fail_after(self.plan.duration + FINISH_SLACK):
                finish = await self._receive()
            tg.cancel_scope.cancel()
        if not isinstance(finish, Finish):
            return
        await self._reconnect_for_the_drain()
        receivers = [
            (c.receiver, finish.published.get(c.spec.topic, 0))
            for c in self.clients
            if c.receiver is not None and c.spec.kind is not Kind.CHURN
        ]
        # Everyone reads freely now, to collect what the server still holds for them and,
        # for those it cut off, the close frame queued behind it.
        for receiver, last in receivers:
            receiver.budget = None
            receiver.resume()
            receiver.expect(last)
        with anyio.move_on_after(max(deadline_ns - time.time_ns(), 0) / 1e9):
            for receiver, _ in receivers:
                await receiver.finished.wait()
        self.pipe.send(Drained(self.plan.index))
        for client in self.clients:
            if client.receiver is not None and client.spec.kind is not Kind.CHURN:
                # A client that left itself did so at the deadline, before it caught up.
                receiver = client.receiver
                client.drained = receiver.finished.is_set() and not receiver.left
        await self._close_all()
        self.pipe.send(Results(self.plan.index, [c.result() for c in self.clients], self._totals()))

    async def _pace(self, receivers: list[Receiver]) -> None:
        """Let each slow client read ``slow_rate`` messages a second, by pausing its socket."""
        allowance = self.plan.slow_rate * PACE_SECONDS
        for receiver in receivers:
            receiver.budget = allowance
        while receivers:
            await anyio.sleep(PACE_SECONDS)
            for receiver in receivers:
                if receiver.budget is not None:
                    # Capped, so that a quiet spell does not save up for a burst.
                    receiver.budget = min(receiver.budget + allowance, 2 * allowance)
                    if receiver.budget > 0:
                        receiver.resume()

    async def _resume_later(self, receivers: list[Receiver], delay: float) -> None:
        await anyio.sleep(delay)
        for receiver in receivers:
            receiver.resume()

    async def _churn(self, client: _Client) -> None:
        """Connect, subscribe, stay a little, leave abruptly; again, until cancelled."""
        stay = max(self.plan.churn_stay, MIN_CHURN_STAY)
        for session in range(MAX_CHURN_SESSIONS):
            client.tally.last_seq = None
            try:
                receiver = await self._open(client)
            except (OSError, WSError) as error:
                client.connect_failures += 1
                client.error = client.error or f"cannot connect: {error!r}"
                await anyio.sleep(stay)
                continue
            client.receiver = receiver
            try:
                with anyio.move_on_after(client.rng.uniform(MIN_CHURN_STAY, stay)):
                    await receiver.finished.wait()
            finally:
                # Half leave with a close frame, half with a TCP reset and no close frame.
                receiver.leave(reset=session % 2 == 1)
                client.sessions += 1
                client.note_end(receiver)
                if client.tally.last_seq is not None:
                    client.span += client.tally.last_seq - client.tally.first_seq + 1

    async def _reconnect(self, client: _Client) -> None:
        """Stay a random while, drop the connection with a TCP reset and no close frame, and
        resume on the next node; again, until cancelled (which leaves it connected)."""
        low, high = self.plan.reconnect_every
        for _ in range(MAX_CHURN_SESSIONS):
            receiver = client.receiver
            if receiver is not None:
                with anyio.move_on_after(client.rng.uniform(low, high)):
                    await receiver.finished.wait()
                receiver.leave(reset=True)
                client.note_end(receiver)
                client.sessions += 1
            try:
                client.receiver = await self._open(client)
            except (OSError, WSError) as error:
                client.receiver = None
                client.connect_failures += 1
                client.error = client.error or f"cannot reconnect: {error!r}"
                await anyio.sleep(low)

    async def _reconnect_for_the_drain(self) -> None:
        """Connect the reconnecting clients that publishing's end caught between connections,
        so that they resume and collect the rest."""

        async def again(client: _Client) -> None:
            client.sessions += 1
            try:
                client.receiver = await self._open(client)
            except (OSError, WSError) as error:
                client.connect_failures += 1
                client.error = client.error or f"cannot reconnect: {error!r}"

        async with anyio.create_task_group() as tg:
            for client in self.clients:
                receiver = client.receiver
                if client.spec.kind is Kind.RECONNECT and (
                    receiver is None
                    or receiver.left
                    or receiver.transport is None
                    or receiver.transport.is_disconnected
                ):
                    tg.start_soon(again, client)

    async def _close_all(self) -> None:
        for client in self.clients:
            if client.receiver is not None and client.spec.kind is not Kind.CHURN:
                client.receiver.leave()
        with anyio.move_on_after(CLOSE_SECONDS):
            for client in self.clients:
                if client.receiver is not None and client.receiver.transport is not None:
                    await client.receiver.transport.wait_disconnected()
        for client in self.clients:
            if client.receiver is not None and client.spec.kind is not Kind.CHURN:
                client.note_end(client.receiver)

    async def _report_progress(self) -> None:
        while True:
            self.pipe.send(self._progress())
            await anyio.sleep(self.plan.progress_seconds)

    def _progress(self) -> Progress:
        kinds: dict[Kind, KindProgress] = {}
        for client in self.clients:
            receiver = client.receiver
            transport = receiver.transport if receiver is not None else None
            connected = transport is not None and not transport.is_disconnected
            closed = receiver is not None and receiver.close_code is not None
            old = kinds.get(client.spec.kind, KindProgress())
            kinds[client.spec.kind] = KindProgress(
                connected=old.connected + connected,
                received=old.received + client.tally.received,
                closed=old.closed + closed,
                sessions=old.sessions + client.sessions,
            )
        published = self.publisher.sent if self.publisher is not None else 0
        return Progress(self.plan.index, kinds, published)

    def _totals(self) -> dict[Kind, KindTotals]:
        totals: dict[Kind, KindTotals] = {}
        for client in self.clients:
            tally = client.tally
            old = totals.get(client.spec.kind)
            if old is None:
                old = KindTotals([0] * HISTOGRAM_SIZE, [0] * len(tally.bins), 0)
            totals[client.spec.kind] = KindTotals(
                [a + b for a, b in zip(old.histogram, tally.histogram, strict=True)],
                [a + b for a, b in zip(old.bins, tally.bins, strict=True)],
                max(old.max_latency_us, tally.max_latency_us),
            )
        return totals
