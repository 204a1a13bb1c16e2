"""A broadcaster server started for one stress run, watched while it runs.

``python -m broadcaster serve --port 0`` (or another command that announces itself the same
way) with the given ``BROADCASTER_*`` variables and JSON logs. The port comes from its first
log line (``server_starting``); a thread reads its stderr for as long as it runs, so that a
full pipe never blocks it, and counts the lines logged at error level. A :class:`Sampler`
(psutil) samples its memory and CPU, as it does the load generator's own processes; at the
end the server gets SIGTERM, and its exit status is kept. :func:`pin` keeps a process, every
thread of it, on chosen cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence
    from typing import IO

# Error-level lines kept word for word for the report; the rest are only counted.
KEPT_ERRORS = 20
# Last lines kept to explain a server that exits before it serves.
KEPT_TAIL = 20
ERROR_LEVELS = frozenset({"error", "critical", "exception"})
MIB = 1024 * 1024


class ServerFailed(Exception):
    """The spawned server did not start; the message has its last lines."""


@dataclass(frozen=True, slots=True)
class Sample:
    """The server's resident memory and CPU use at one moment.

    Args:
        at: seconds on ``time.monotonic()``.
        rss_mib: resident set size.
        cpu_percent: CPU time used since the previous sample, per wall time (100 = a core).
        cpu_seconds: CPU time (user and system) the process has used since it started.
    """

    at: float
    rss_mib: float
    cpu_percent: float
    cpu_seconds: float = 0.0


class Sampler:
    """Samples one process's resident memory and CPU use; ``samples`` keeps them all.

    Args:
        pid: the process to watch.
    """

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._last_cpu: tuple[float, float] | None = None
        self.samples: list[Sample] = []

    def sample(self) -> Sample | None:
        """Measure the process now; ``None`` once it has gone."""
        try:
            with self._process.oneshot():
                rss = self._process.memory_info().rss
                times = self._process.cpu_times()
        except psutil.Error:
            return None
        now, cpu = time.monotonic(), times.user + times.system
        percent = 0.0
        if self._last_cpu is not None and now > self._last_cpu[0]:
            percent = 100 * (cpu - self._last_cpu[1]) / (now - self._last_cpu[0])
        self._last_cpu = (now, cpu)
        sample = Sample(now, rss / MIB, percent, cpu)
        self.samples.append(sample)
        return sample

    def cpu_seconds(self) -> float | None:
        """Return the CPU time (user and system) the process has used; ``None`` once gone."""
        try:
            times = self._process.cpu_times()
        except psutil.Error:
            return None
        return float(times.user + times.system)


def can_pin() -> bool:
    """Say whether this platform can keep a process on chosen cores (Linux can)."""
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def pin(pid: int, cpus: Collection[int]) -> None:
    """Keep process ``pid`` on ``cpus``: each of its threads now, and so every later thread.

    ``os.sched_setaffinity`` on a process id moves only its main thread; threads already
    running keep their own affinity, so each is moved. Threads started later inherit it.

    Raises:
        OSError: a core is not available, or the process has gone.
    """
    try:
        threads = [thread.id for thread in psutil.Process(pid).threads()]
    except psutil.Error as error:
        raise ProcessLookupError(f"process {pid}: {error}") from None
    for thread in threads:
        try:
            os.sched_setaffinity(thread, cpus)
        except ProcessLookupError:
            if thread == pid:
                raise
            # A thread that ended meanwhile needs no affinity.


# Every fake client comes from this machine's one address, and the publisher sends as fast
# as it is asked to: per-client limits would measure themselves, not the server. Lifted for a
# spawned server unless the environment or ``--env`` sets them.
LOAD_LIMITS = {
    "BROADCASTER_MAX_CONNECTIONS": "1000000",
    "BROADCASTER_MAX_HANDSHAKES_PER_SECOND": "1000000",
    "BROADCASTER_MAX_HTTP_CONNECTIONS": "1000000",
    "BROADCASTER_MAX_HTTP_CONNECTIONS_PER_ADDRESS": "1000000",
    "BROADCASTER_MAX_MESSAGES_PER_SECOND": "1000000000",
    "BROADCASTER_MAX_BYTES_PER_SECOND": str(1 << 40),
}


def server_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Return the environment a spawned server gets: the load limits lifted, this process's
    environment (as a shell would give it), then ``env``, with JSON logs."""
    return {**LOAD_LIMITS, **os.environ, **env, "BROADCASTER_LOG_FORMAT": "json"}


class SpawnedServer:
    """A ``broadcaster serve`` child process.

    Args:
        env: ``BROADCASTER_*`` variables set on top of this process's environment.
        command: the arguments after the Python executable.

    :meth:`start` starts it and returns its URL; :meth:`stop` stops it (callers must call it,
    in a ``finally``).
    """

    def __init__(self, env: Mapping[str, str], command: Sequence[str]) -> None:
        self._env = server_environment(env)
        self._command = [sys.executable, *command]
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._announced = threading.Event()
        self._address: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._tail: deque[str] = deque(maxlen=KEPT_TAIL)
        self.error_count = 0
        self.errors: list[str] = []
        self.exit_status: int | None = None
        self.sampler: Sampler | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id, once started."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float) -> str:
        """Start the server and return its ``ws://host:port``.

        Raises:
            ServerFailed: it exited, or did not announce its port within ``timeout`` seconds.
        """
        self._process = subprocess.Popen(
            self._command,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(
            target=self._read_stderr, args=(self._process.stderr,), daemon=True
        )
        self._reader.start()
        self._announced.wait(timeout)
        if self._address is None:
            status = self._process.poll()
            tail = "\n".join(self._tail)
            what = f"exited with status {status}" if status is not None else "did not start"
            raise ServerFailed(f"the server {what}:\n{tail}".rstrip())
        self.sampler = Sampler(self._process.pid)
        host, port = self._address
        return f"ws://{host}:{port}"

    def stop(self, timeout: float) -> int | None:
        """Send SIGTERM, wait up to ``timeout`` seconds (then kill), and return the status."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(timeout)
            if not self._reader.is_alive() and process.stderr is not None:
                process.stderr.close()
        self.exit_status = process.returncode
        return self.exit_status

    def _read_stderr(self, stream: IO[str]) -> None:
        # Ends when the child closes stderr, that is when it exits.
        for line in stream:
            self._note(line.rstrip("\n"))
        self._announced.set()

    def _note(self, line: str) -> None:
        self._tail.append(line)
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            # Not a log event: something wrote to stderr directly, like a crash's traceback.
            is_error = line.startswith("Traceback")
        else:
            port = event.get("port")
            if event.get("event") == "server_starting" and isinstance(port, int):
                self._address = (_connectable(str(event.get("host"))), port)
                self._announced.set()
            is_error = event.get("level") in ERROR_LEVELS
        if is_error:
            with self._lock:
                self.error_count += 1
                if len(self.errors) < KEPT_ERRORS:
                    self.errors.append(line)


def _connectable(host: str) -> str:
    """Return an address to reach a server bound to ``host``: loopback for a wildcard."""
    if host in ("", "0.0.0.0", "None"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
