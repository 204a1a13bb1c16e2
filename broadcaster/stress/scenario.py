"""A stress run: its settings, and the parent process that drives the workers through it.

The parent starts the server (with ``spawn``), one process per ``procs`` for the receivers and
one for the publisher (``multiprocessing`` with the spawn context, each on its own asyncio
loop), and steps them through the phases: connect, publish for ``duration``, drain, report.
It waits on the workers' pipes, and between messages samples the server and the workers and
reports progress. Every phase has a deadline; a worker that dies or fails ends the run with
:class:`StressError`. The server's CPU time is taken just before the publisher starts and
again once every receiving worker says :class:`Drained`, just after the last receipt.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import secrets
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

from broadcaster.protocol import Mode
from broadcaster.stress.clients import Kind
from broadcaster.stress.messages import (
    ClientSpec,
    Drained,
    Failed,
    Finish,
    KindProgress,
    Progress,
    Published,
    Ready,
    Results,
    Snapshot,
    Start,
    Started,
    WorkerPlan,
)
from broadcaster.stress.publisher import PublisherPlan, PublisherResult, Via
from broadcaster.stress.registry import RegistryRefused, leftover, wait_listed
from broadcaster.stress.report import Outcome, Report, summarise
from broadcaster.stress.spawned import (
    Sample,
    Sampler,
    ServerFailed,
    SpawnedServer,
    can_pin,
    pin,
    server_environment,
)
from broadcaster.stress.worker import main, raise_file_limit

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from multiprocessing.process import BaseProcess

# Seconds between two samples of the server and the workers, and progress reports.
TICK_SECONDS = 0.25
# Time bins for "delivered over time": about this many over the run, none under 0.25 s.
BINS = 100
# Deadlines: the spawned server's start, each connecting worker (plus a second per 50
# clients), the extra beyond duration and drain for the later phases, the server's stop.
STARTUP_SECONDS = 30.0
CONNECT_SECONDS = 30.0
PHASE_SLACK_SECONDS = 30.0
STOP_SECONDS = 30.0
# How long to wait for the server to drop this run's topics after every client has left.
LEFTOVER_SECONDS = 5.0
# A message's data holds its counter and a 19-digit timestamp.
MIN_SIZE = 32
# The server's default BROADCASTER_MAX_MESSAGE_BYTES, assumed for a server given with --url.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
MAX_MESSAGE_VARIABLE = "BROADCASTER_MAX_MESSAGE_BYTES"


class StressError(Exception):
    """The run could not be carried out: the server did not start, a worker failed."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """Who connects, what is published, for how long, against which server.

    Args:
        url: ``ws://host:port`` of a running server; ``None`` spawns one.
        other_urls: further running nodes sharing a backplane with ``url``'s: receivers are
            spread over every node, reconnecting clients move to the next node at each
            reconnect, and the publisher sends to each node in turn.
        publish_url: ``ws://host:port`` of another node sharing a backplane with ``url``'s,
            for the publisher, so that every message crosses the broker; ``None`` publishes to
            the receivers' server.
        server_env: ``BROADCASTER_*`` variables for a spawned server.
        admin_token: the server's ``BROADCASTER_ADMIN_TOKEN``, for ``GET /topics``; a spawned
            server's own when ``None``. A server on this machine answers without one.
        server_command: the Python arguments that start a spawned server; whatever it runs
            must log ``server_starting`` with its ``port`` as a JSON line on stderr, as
            ``broadcaster serve`` does (the benchmarks' baseline server does too).
        mode: receivers on raw ``/ws/{topic}`` or multiplexed ``/ws``.
        via: the publisher's WebSocket (in ``mode``) or ``POST /publish/{topic}``.
        fast: clients that read everything, spread over the topics in turn (as are the
            other kinds).
        slow: clients that read ``slow_rate`` messages a second.
        stalled: clients that stop reading.
        churn: clients that connect, stay up to ``churn_stay`` seconds and leave, again and
            again.
        reconnect: clients that drop their connection now and then and resume.
        reconnect_every: the shortest and longest a reconnecting client stays connected
            before it drops the connection (a TCP reset, no close frame) and resumes.
        slow_rate: messages a second a slow client reads.
        stall_for: seconds stalled clients stay stalled; ``None`` until publishing ends.
        churn_stay: the longest a churn session lasts.
        rate: messages a second over all topics; 0 publishes flat out.
        size: bytes of each message's data.
        topics: how many topics.
        duration: seconds of publishing.
        drain: seconds, after publishing, for clients to collect what is still coming.
        procs: processes for the receivers (the publisher has one more).
        seed: seeds every random choice (churn stays).
        receive_buffer: ``SO_RCVBUF`` of slow and stalled clients.
        connect_timeout: seconds one connection and subscription may take.
        server_cpus: cores a spawned server is kept on; empty leaves it where it runs.
        load_cpus: cores the worker processes are kept on; empty leaves them where they run.
        source_addresses: receivers connect from 127.0.0.1 to 127.0.0.N in turn, to get past
            the ephemeral ports of one address (about 28,000 on Linux) to a server on this
            machine; 1 lets the kernel choose.
    """

    url: str | None = None
    other_urls: tuple[str, ...] = ()
    publish_url: str | None = None
    server_env: Mapping[str, str] = field(default_factory=dict)
    admin_token: str | None = None
    server_command: tuple[str, ...] = ("-m", "broadcaster", "serve", "--port", "0")
    mode: Mode = Mode.MUX
    via: Via = Via.WS
    fast: int = 10
    slow: int = 0
    stalled: int = 0
    churn: int = 0
    reconnect: int = 0
    reconnect_every: tuple[float, float] = (0.5, 2.0)
    slow_rate: float = 50.0
    stall_for: float | None = None
    churn_stay: float = 0.5
    rate: float = 100.0
    size: int = 256
    topics: int = 1
    duration: float = 10.0
    drain: float = 5.0
    procs: int = 1
    seed: int = 0
    receive_buffer: int = 8192
    connect_timeout: float = 10.0
    server_cpus: tuple[int, ...] = ()
    load_cpus: tuple[int, ...] = ()
    source_addresses: int = 1

    def counts(self) -> dict[Kind, int]:
        """Clients of each kind."""
        return {
            Kind.FAST: self.fast,
            Kind.SLOW: self.slow,
            Kind.STALLED: self.stalled,
            Kind.CHURN: self.churn,
            Kind.RECONNECT: self.reconnect,
        }

    def urls(self) -> tuple[str, ...]:
        """Every running node given; empty for a spawned server."""
        return (self.url, *self.other_urls) if self.url is not None else ()

    def message_limit(self) -> int:
        """The largest publish the server accepts: ``BROADCASTER_MAX_MESSAGE_BYTES`` of a
        spawned server, the server's default for one given with ``url``."""
        if self.url is not None:
            return DEFAULT_MAX_MESSAGE_BYTES
        value = server_environment(self.server_env).get(MAX_MESSAGE_VARIABLE, "")
        return int(value) if value.isdigit() else DEFAULT_MAX_MESSAGE_BYTES

    def publish_bytes(self) -> int:
        """The size of the publisher's largest message as the server counts it: the data,
        inside a publish frame on the multiplexed endpoint."""
        if self.via is Via.HTTP or self.mode is Mode.RAW:
            return self.size
        topic = f"stress-{'0' * 6}-{max(self.topics - 1, 0)}"
        return len(f'{{"op":"publish","topic":"{topic}","data":""}}') + self.size

    def problems(self) -> list[str]:
        """Say what is wrong with these settings; an empty list when nothing is."""
        problems = [f"--{kind} must be 0 or more" for kind, n in self.counts().items() if n < 0]
        if sum(self.counts().values()) <= 0:
            problems.append(
                "at least one client is needed (--fast, --slow, --stalled, --churn, --reconnecting)"
            )
        problems += [
            f"--url must start with ws:// or wss://, not {url!r}"
            for url in self.urls()
            if not url.startswith(("ws://", "wss://"))
        ]
        if self.other_urls and self.url is None:
            problems.append("further nodes need --url for the first one")
        if self.mode is Mode.RAW and (self.other_urls or self.reconnect):
            problems.append("--url more than once and --reconnecting need --mode mux")
        low, high = self.reconnect_every
        if not 0 < low <= high:
            problems.append("--reconnect-every is MIN,MAX seconds with 0 < MIN <= MAX")
        if self.size >= MIN_SIZE and self.publish_bytes() > self.message_limit():
            problems.append(
                f"--size {self.size}: a message is {self.publish_bytes()} bytes once enveloped "
                f"for publishing, over the server's {MAX_MESSAGE_VARIABLE} "
                f"({self.message_limit()}"
                + (", its default, assumed for --url)" if self.url is not None else ")")
            )
        if self.publish_url is not None and not self.publish_url.startswith(("ws://", "wss://")):
            problems.append(f"the publisher's URL must start with ws://, not {self.publish_url!r}")
        if self.url is not None and self.server_env:
            problems.append("--env applies to a spawned server only (--spawn)")
        problems += [
            f"--env {key}: only BROADCASTER_* variables are passed"
            for key in self.server_env
            if not key.startswith("BROADCASTER_")
        ]
        checks = [
            (self.size >= MIN_SIZE, f"--size must be at least {MIN_SIZE}"),
            (self.rate >= 0, "--rate must be 0 (flat out) or more"),
            (1 <= self.topics <= 10_000, "--topics must be from 1 to 10000"),
            (self.duration > 0, "--duration must be more than 0"),
            (self.drain >= 0, "--drain must be 0 or more"),
            (self.procs >= 1, "--procs must be 1 or more"),
            (self.slow_rate > 0, "--slow-rate must be more than 0"),
            (self.stall_for is None or self.stall_for >= 0, "--stall-for must be 0 or more"),
            (self.churn_stay > 0, "--churn-stay must be more than 0"),
            (self.receive_buffer >= 1024, "--receive-buffer must be at least 1024"),
            (self.connect_timeout > 0, "--connect-timeout must be more than 0"),
            (1 <= self.source_addresses <= 254, "source addresses must be from 1 to 254"),
        ]
        return problems + [message for ok, message in checks if not ok] + self._cpu_problems()

    def _cpu_problems(self) -> list[str]:
        if not (self.server_cpus or self.load_cpus):
            return []
        if not can_pin():
            return ["--server-cpus and --load-cpus need os.sched_setaffinity (Linux)"]
        cores = os.cpu_count() or 1
        problems = [
            f"--{name} {','.join(map(str, cpus))}: this machine has cores 0 to {cores - 1}"
            for name, cpus in (("server-cpus", self.server_cpus), ("load-cpus", self.load_cpus))
            if not set(cpus) <= set(range(cores))
        ]
        if self.server_cpus and self.url is not None:
            problems.append("--server-cpus applies to a spawned server only (--spawn)")
        return problems


@dataclass(slots=True)
class _Handle:
    """The parent's side of one worker process."""

    plan: WorkerPlan
    process: BaseProcess
    pipe: Connection
    sampler: Sampler
    ready: Ready | None = None
    started: bool = False
    drained: bool = False
    done: bool = False
    closed: bool = False


def run_scenario(
    scenario: Scenario, on_progress: Callable[[Snapshot], None] | None = None
) -> Report:
    """Run ``scenario`` to the end and return its report.

    Args:
        scenario: the run.
        on_progress: called about four times a second with a :class:`Snapshot`.

    Raises:
        ValueError: the scenario has :meth:`Scenario.problems`.
        StressError: the server did not start, a worker failed, or a phase overran.
    """
    problems = scenario.problems()
    if problems:
        raise ValueError("; ".join(problems))
    raise_file_limit(sum(scenario.counts().values()) + scenario.topics)
    if scenario.url is not None:
        runner = _Runner(scenario, scenario.url.rstrip("/"), None, on_progress)
        try:
            runner.run()
        except RegistryRefused as error:
            raise StressError(str(error)) from None
        return summarise(runner.outcome())
    server = SpawnedServer(scenario.server_env, scenario.server_command)
    try:
        url = server.start(STARTUP_SECONDS)
        if scenario.server_cpus:
            assert server.pid is not None  # set by start()
            pin(server.pid, scenario.server_cpus)
        runner = _Runner(scenario, url, server, on_progress)
        runner.run()
    except (ServerFailed, RegistryRefused) as error:
        raise StressError(str(error)) from None
    finally:
        server.stop(STOP_SECONDS)
    return summarise(runner.outcome())


class _Runner:
    """Drives the workers of one run through its phases."""

    def __init__(
        self,
        scenario: Scenario,
        base_url: str,
        server: SpawnedServer | None,
        on_progress: Callable[[Snapshot], None] | None,
    ) -> None:
        self.scenario = scenario
        self.base_url = base_url
        self.admin_token = scenario.admin_token or scenario.server_env.get(
            "BROADCASTER_ADMIN_TOKEN"
        )
        self.server = server
        self.on_progress = on_progress
        # Unique per run, not drawn from the seed: a topic that an earlier run left on a
        # shared server would start at a seq other than 1.
        run_id = secrets.token_hex(3)
        self.topics = tuple(f"stress-{run_id}-{i}" for i in range(scenario.topics))
        self.bin_seconds = max(0.25, scenario.duration / BINS)
        self.phase = "connecting"
        self.t0 = 0.0
        self.publish_end = 0.0
        # The server's CPU seconds just before the first publish and after the last receipt.
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None
        self.drained_at = 0.0
        self.progress: dict[int, Progress] = {}
        self.published: PublisherResult | None = None
        self.results: list[Results] = []
        self.leftover: int | None = None
        self.last_sample: Sample | None = None
        self.next_tick = 0.0
        self.handles: list[_Handle] = []

    def run(self) -> None:
        """Start the workers and step them through the run; stop them whatever happens."""
        context = multiprocessing.get_context("spawn")
        try:
            for plan in self._plans():
                parent, child = context.Pipe()
                process = context.Process(target=main, args=(plan, child), daemon=True)
                process.start()
                child.close()
                assert process.pid is not None  # set by start()
                if self.scenario.load_cpus:
                    pin(process.pid, self.scenario.load_cpus)
                self.handles.append(_Handle(plan, process, parent, Sampler(process.pid)))
            self._steps()
        finally:
            for handle in self.handles:
                handle.process.join(CONNECT_SECONDS if handle.done else 0)
                if handle.process.is_alive():
                    handle.process.kill()
                    handle.process.join()
                handle.pipe.close()

    def outcome(self) -> Outcome:
        """What the run measured."""
        assert self.published is not None
        server = self.server
        return Outcome(
            scenario=self.scenario,
            base_url=self.base_url,
            topics=self.topics,
            publisher=self.published,
            clients=[client for results in self.results for client in results.clients],
            totals=[results.totals for results in self.results],
            bin_seconds=self.bin_seconds,
            t0=self.t0,
            publish_end=self.publish_end,
            drained_at=self.drained_at,
            server_cpu_seconds=(
                self.cpu_end - self.cpu_start
                if self.cpu_start is not None and self.cpu_end is not None
                else None
            ),
            server_cpus=self.scenario.server_cpus if server else (),
            samples=list(server.sampler.samples) if server and server.sampler else [],
            receiver_samples=[h.sampler.samples for h in self.handles if not h.plan.publisher],
            publisher_samples=next(h.sampler.samples for h in self.handles if h.plan.publisher),
            server_pid=server.pid if server else None,
            exit_status=server.exit_status if server else None,
            error_count=server.error_count if server else 0,
            errors=list(server.errors) if server else [],
            leftover=self.leftover,
        )

    def _steps(self) -> None:
        scenario = self.scenario
        receivers = [h for h in self.handles if h.plan.publisher is None]
        clients = sum(scenario.counts().values())
        self._pump(
            lambda: all(h.ready for h in self.handles),
            CONNECT_SECONDS + clients / 50,
            "while clients connected",
        )
        if scenario.mode is Mode.RAW and not self._wait_subscribed():
            raise StressError("the server did not list every raw connection in /topics")
        self._tick()
        bin_count = math.ceil(scenario.duration / self.bin_seconds) + 1
        start = Start(time.time_ns(), int(self.bin_seconds * 1e9), bin_count)
        # Receivers first: a message that reached a receiver before it started counting
        # would be counted in no time bin.
        for handle in receivers:
            handle.pipe.send(start)
        self._pump(
            lambda: all(h.started for h in receivers), CONNECT_SECONDS, "while receivers started"
        )
        self.cpu_start = self._server_cpu()
        self.t0 = time.monotonic()
        self.phase = "publishing"
        for handle in self.handles:
            if handle.plan.publisher is not None:
                handle.pipe.send(start)
        self._pump(
            lambda: self.published is not None,
            scenario.duration + PHASE_SLACK_SECONDS,
            "while publishing",
        )
        assert self.published is not None
        self.publish_end = time.monotonic()
        self.phase = "draining"
        for handle in receivers:
            handle.pipe.send(Finish(self.published.published))
        self._pump(
            lambda: all(h.done for h in self.handles),
            scenario.drain + PHASE_SLACK_SECONDS,
            "while clients drained",
        )
        left = [
            leftover(url.rstrip("/"), self.topics, LEFTOVER_SECONDS, self.admin_token)
            for url in (self.base_url, *self.scenario.other_urls)
        ]
        self.leftover = None if None in left else sum(n for n in left if n is not None)

    def _plans(self) -> list[WorkerPlan]:
        scenario, topics = self.scenario, self.topics
        specs = [
            ClientSpec(kind, topics[i % len(topics)])
            for kind, count in scenario.counts().items()
            for i in range(count)
        ]
        shares = [tuple(specs[i :: scenario.procs]) for i in range(scenario.procs)]
        nodes = () if scenario.publish_url else tuple(u.rstrip("/") for u in scenario.other_urls)
        publisher = PublisherPlan(
            base_url=(scenario.publish_url or self.base_url).rstrip("/"),
            other_urls=nodes,
            mode=scenario.mode,
            via=scenario.via,
            topics=topics,
            size=scenario.size,
            rate=scenario.rate,
            duration=scenario.duration,
            connect_timeout=scenario.connect_timeout,
        )
        groups: list[tuple[tuple[ClientSpec, ...], PublisherPlan | None]] = [
            (share, None) for share in shares if share
        ]
        groups.append(((), publisher))
        return [
            WorkerPlan(
                index=index,
                base_url=self.base_url,
                mode=scenario.mode,
                clients=share,
                publisher=plan,
                seed=scenario.seed,
                duration=scenario.duration,
                drain=scenario.drain,
                slow_rate=scenario.slow_rate,
                stall_for=scenario.stall_for,
                churn_stay=scenario.churn_stay,
                receive_buffer=scenario.receive_buffer,
                connect_timeout=scenario.connect_timeout,
                progress_seconds=TICK_SECONDS,
                source_addresses=scenario.source_addresses,
                other_urls=tuple(url.rstrip("/") for url in scenario.other_urls),
                reconnect_every=scenario.reconnect_every,
            )
            for index, (share, plan) in enumerate(groups)
        ]

    def _pump(self, until: Callable[[], bool], timeout: float, what: str) -> None:
        """Handle the workers' messages until ``until()`` holds, ticking in between.

        Raises:
            StressError: a worker failed or exited early, or ``timeout`` seconds passed.
        """
        deadline = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            if now >= deadline:
                raise StressError(f"timed out after {timeout:.0f} s {what}")
            if now >= self.next_tick:
                self._tick()
            open_pipes = {h.pipe: h for h in self.handles if not h.closed}
            if not open_pipes:
                raise StressError(f"every worker has exited {what}")
            for pipe in wait(list(open_pipes), min(deadline, self.next_tick) - now):
                assert isinstance(pipe, Connection)
                self._read(open_pipes[pipe])

    def _read(self, handle: _Handle) -> None:
        try:
            message = handle.pipe.recv()
        except EOFError:
            message = None
            handle.closed = True
        if message is None and not handle.done:
            handle.process.join(CONNECT_SECONDS)
            status = handle.process.exitcode
            raise StressError(f"worker {handle.plan.index} exited with status {status}")
        if isinstance(message, Failed):
            raise StressError(f"worker {message.worker} failed:\n{message.error}")
        if isinstance(message, Ready):
            handle.ready = message
        elif isinstance(message, Started):
            handle.started = True
        elif isinstance(message, Drained):
            handle.drained = True
            receivers = [h for h in self.handles if h.plan.publisher is None]
            if all(h.drained for h in receivers):
                self.cpu_end = self._server_cpu()
                self.drained_at = time.monotonic()
        elif isinstance(message, Progress):
            self.progress[message.worker] = message
        elif isinstance(message, Published):
            self.published = message.result
            handle.done = True
        elif isinstance(message, Results):
            self.results.append(message)
            handle.done = True

    def _tick(self) -> None:
        self.next_tick = time.monotonic() + TICK_SECONDS
        for handle in self.handles:
            handle.sampler.sample()
        if self.server is not None and self.server.sampler is not None:
            self.last_sample = self.server.sampler.sample() or self.last_sample
        if self.on_progress is None:
            return
        kinds: dict[Kind, KindProgress] = {}
        for progress in self.progress.values():
            for kind, part in progress.kinds.items():
                old = kinds.get(kind, KindProgress())
                kinds[kind] = KindProgress(
                    old.connected + part.connected,
                    old.received + part.received,
                    old.closed + part.closed,
                    old.sessions + part.sessions,
                )
        self.on_progress(
            Snapshot(
                phase=self.phase,
                elapsed=time.monotonic() - self.t0 if self.t0 else 0.0,
                duration=self.scenario.duration,
                published=sum(p.published for p in self.progress.values()),
                kinds=kinds,
                clients=self.scenario.counts(),
                server=self.last_sample,
            )
        )

    def _server_cpu(self) -> float | None:
        sampler = self.server.sampler if self.server is not None else None
        return sampler.cpu_seconds() if sampler is not None else None

    def _wait_subscribed(self) -> bool:
        """Wait until the server lists every raw connection; a raw socket has no ack."""
        wanted: dict[str, int] = {}
        for handle in self.handles:
            assert handle.ready is not None
            for topic, count in handle.ready.subscribed.items():
                wanted[topic] = wanted.get(topic, 0) + count
        return wait_listed(self.base_url, wanted, CONNECT_SECONDS, self.admin_token)
