"""What the processes of a stress run say to each other, and what the run shows as it goes.

Every message is a frozen dataclass, pickled over a ``multiprocessing`` pipe; see
:mod:`broadcaster.stress.worker` for the order they come in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broadcaster.protocol import Mode
    from broadcaster.stress.clients import Kind
    from broadcaster.stress.publisher import PublisherPlan, PublisherResult
    from broadcaster.stress.spawned import Sample


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """One fake client: how it reads and what it subscribes to."""

    kind: Kind
    topic: str


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """Everything one worker process needs; pickled to the process.

    Args:
        index: the worker's number.
        base_url: the server's ``ws://host:port``.
        mode: raw (``/ws/{topic}``) or multiplexed (``/ws``) receivers.
        clients: the receivers this worker runs.
        publisher: set for the publisher's worker, which has no receivers.
        seed: the run's seed; each client draws from its own generator derived from it.
        duration: seconds the publisher publishes.
        drain: seconds receivers get after publishing to read what is still coming.
        slow_rate: messages a second a slow client reads.
        stall_for: seconds a stalled client stays stalled; ``None`` until publishing ends.
        churn_stay: the longest a churn session lasts, in seconds.
        receive_buffer: ``SO_RCVBUF`` of slow and stalled clients.
        connect_timeout: seconds one connection and subscription may take.
        progress_seconds: how often the worker reports progress.
        source_addresses: receivers connect from 127.0.0.1 to 127.0.0.N in turn, each with
            its own range of ephemeral ports; 1 leaves the choice to the kernel.
        other_urls: further nodes (sharing a backplane with ``base_url``'s): receivers are
            spread over all of them, and reconnecting clients move to the next at each
            reconnect.
        reconnect_every: the shortest and longest time a reconnecting client stays connected
            before it drops the connection.
    """

    index: int
    base_url: str
    mode: Mode
    clients: tuple[ClientSpec, ...]
    publisher: PublisherPlan | None
    seed: int
    duration: float
    drain: float
    slow_rate: float
    stall_for: float | None
    churn_stay: float
    receive_buffer: int
    connect_timeout: float
    progress_seconds: float
    source_addresses: int = 1
    other_urls: tuple[str, ...] = ()
    reconnect_every: tuple[float, float] = (0.5, 2.0)


@dataclass(frozen=True, slots=True)
class Start:
    """Parent to worker: begin; time bins count from ``t0_ns`` (``time.time_ns()``)."""

    t0_ns: int
    bin_ns: int
    bin_count: int


@dataclass(frozen=True, slots=True)
class Finish:
    """Parent to worker: publishing is over; ``published`` is the last counter per topic."""

    published: dict[str, int]


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker to parent: every client has connected and subscribed, or failed to.

    ``subscribed`` counts the worker's connections subscribed to each topic.
    """

    worker: int
    subscribed: dict[str, int]
    failed: int


@dataclass(frozen=True, slots=True)
class Started:
    """Receivers' worker to parent: counting from Start's ``t0_ns``; the publisher may begin."""

    worker: int


@dataclass(frozen=True, slots=True)
class KindProgress:
    """Counts for one kind of client in one worker, as the run goes."""

    connected: int = 0
    received: int = 0
    closed: int = 0
    sessions: int = 0


@dataclass(frozen=True, slots=True)
class Progress:
    """Worker to parent: counts so far."""

    worker: int
    kinds: dict[Kind, KindProgress]
    published: int


@dataclass(frozen=True, slots=True)
class Published:
    """Publisher's worker to parent: what was published."""

    result: PublisherResult


@dataclass(frozen=True, slots=True)
class Drained:
    """Receivers' worker to parent: each receiver has had everything published, or its drain
    time ran out; sent before the clients close, so that the parent can take the server's CPU
    time just after the last receipt."""

    worker: int


@dataclass(frozen=True, slots=True)
class ClientResult:
    """What one client (all sessions of a churn client) saw.

    ``span`` counts, for churn clients, the messages from the first to the last ``seq``
    seen in each session; other clients' expected counts come from the publisher.
    ``closes`` counts how connections ended when the client did not end them itself.
    ``drained`` is false for a client still receiving when the drain time ran out.
    Reconnecting clients also count what the server sent that the resume logic had to
    skip (``duplicates``, ``reordered``), the answers to their resumes (``recovered``,
    ``not_recovered``), and ``digest`` every ``(epoch, seq, data)`` they delivered.
    """

    kind: Kind
    topic: str
    received: int
    span: int
    gaps: int
    reordered: int
    unparsed: int
    last_counter: int
    closes: dict[str, int]
    sessions: int
    connect_failures: int
    drained: bool
    error: str | None
    duplicates: int = 0
    recovered: int = 0
    not_recovered: int = 0
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class KindTotals:
    """One worker's latency histogram and arrivals per time bin, for one kind of client."""

    histogram: list[int]
    bins: list[int]
    max_latency_us: int


@dataclass(frozen=True, slots=True)
class Results:
    """Worker to parent: every client's result and the totals per kind."""

    worker: int
    clients: list[ClientResult]
    totals: dict[Kind, KindTotals]


@dataclass(frozen=True, slots=True)
class Failed:
    """Worker to parent: the worker could not go on."""

    worker: int
    error: str


Command = Start | Finish


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Progress of a run, for a live display.

    Args:
        phase: ``connecting``, ``publishing`` or ``draining``.
        elapsed: seconds since publishing started (0 before).
        duration: seconds publishing lasts.
        published: messages published so far.
        kinds: counts per kind of client, over every worker.
        clients: clients of each kind in the scenario.
        server: the spawned server's latest sample.
    """

    phase: str
    elapsed: float
    duration: float
    published: int
    kinds: dict[Kind, KindProgress]
    clients: dict[Kind, int]
    server: Sample | None
