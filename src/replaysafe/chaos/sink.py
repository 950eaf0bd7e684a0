"""The effect sink: a loopback HTTP downstream that journals every attempt, the harness's ground
truth.

Workers (in-process tasks or separate OS processes) apply their business effect by calling
``POST /effect`` on the sink. The sink records every attempt in its own SQLite journal — run,
operation id, payload fingerprint, fencing token, idempotency key, pid, start, end, outcome — so
the checker counts effects from what the downstream saw, never from the runtime's opinion of
itself.

Behaviour per run (``EffectSink.configure``):

- ``keyed``: a repeated ``Idempotency-Key`` with the same payload is answered from the first
  effect (outcome ``replayed``, no new effect); with a different payload it is refused with 409
  (outcome ``conflict``).
- ``unkeyed``: every call is a new effect (keys are ignored), like plain SMTP.
- ``slow``: the listed operations' *first* call waits ``seconds`` before committing (a tail beyond
  the lease or the visibility timeout).
- ``response_lost``: the listed operations' first call commits, then the connection is dropped
  without a response (the caller cannot tell whether it happened).

Fencing, in every mode: the sink remembers the highest ``X-Fence-Token`` seen per operation and
refuses a lower one with 412 (outcome ``fenced``, no effect). A zombie that resumes after its lease
was taken over is stopped here. Calls without a token (at-most-once, at-least-once) are never
fenced.

Outcomes: ``applied`` (a new effect), ``applied_response_lost`` (a new effect whose response was
dropped), ``replayed``, ``conflict``, ``fenced``. Only the first two are effects.

The server runs on 127.0.0.1 in a thread with its own event loop, so it serves in-process workers
sharing the harness's loop and worker processes alike; ``stop()`` (or the context manager) ends
it. Only the standard library is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

APPLIED = "applied"
APPLIED_RESPONSE_LOST = "applied_response_lost"
REPLAYED = "replayed"
CONFLICT = "conflict"
FENCED = "fenced"
#: outcomes that are business effects
EFFECT_OUTCOMES = frozenset({APPLIED, APPLIED_RESPONSE_LOST})

#: a request larger than this is refused (the sink is for small test payloads)
MAX_BODY = 64 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts (
    seq INTEGER PRIMARY KEY,
    run TEXT NOT NULL,
    op TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    token INTEGER,
    key TEXT,
    pid INTEGER,
    started REAL NOT NULL,
    ended REAL NOT NULL,
    outcome TEXT NOT NULL
)"""


@dataclass(frozen=True, slots=True)
class Attempt:
    """One call the downstream saw (or, for a transactional effect, one committed effect row)."""

    run: str
    op: str
    fingerprint: str
    token: int | None
    key: str | None
    pid: int | None
    started: float
    ended: float
    outcome: str

    @property
    def effect(self) -> bool:
        return self.outcome in EFFECT_OUTCOMES


@dataclass(slots=True)
class RunPlan:
    """How the sink behaves for one run."""

    keyed: bool = True
    #: operation id -> seconds its first call waits before committing
    slow: dict[str, float] = field(default_factory=dict)
    #: operations whose first call commits and then loses its response
    response_lost: set[str] = field(default_factory=set)
    #: faults already used, per operation (each plan entry fires once)
    used: set[tuple[str, str]] = field(default_factory=set)
    #: idempotency key -> (fingerprint, effect number)
    keys: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: operation -> highest fencing token seen
    fence: dict[str, int] = field(default_factory=dict)
    effects: int = 0


class SinkError(Exception):
    """The sink refused the call or its outcome is unknown."""


class EffectOutcomeUnknown(SinkError, ConnectionError):
    """The connection dropped before a response: the effect may or may not have happened."""


class Fenced(SinkError):
    """412: the fencing token is older than one the sink already saw for this operation."""


class KeyConflict(SinkError):
    """409: the idempotency key came back with a different payload."""


def payload_fingerprint(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


class EffectSink:
    """The loopback downstream (see the module docstring). Use as a context manager or call
    :meth:`start` / :meth:`stop`; ``url`` is valid once started."""

    def __init__(self, journal: str | os.PathLike[str], *, host: str = "127.0.0.1") -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the effect sink binds loopback only")
        self.journal_path = Path(journal)
        self.host = host
        self.port = 0
        self._plans: dict[str, RunPlan] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._db: sqlite3.Connection | None = None
        self._startup_error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> EffectSink:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._serve, name="effect-sink", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the effect sink did not start within 10 s")
        if self._startup_error is not None:
            raise RuntimeError(f"the effect sink failed to start: {self._startup_error!r}")
        return self

    def stop(self) -> None:
        """Stop serving and close the journal. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> EffectSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            self._db = sqlite3.connect(self.journal_path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle, self.host, 0, limit=MAX_BODY * 2)
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:  # reported to start()
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            # connections still open (a slow call during shutdown) are abandoned with the loop
            pending = asyncio.all_tasks(loop)
            for t in pending:
                t.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()
            self._db.close()
            self._db = None

    # ------------------------------------------------------------------ configuration

    def configure(
        self,
        run: str,
        *,
        keyed: bool,
        slow: dict[str, float] | None = None,
        response_lost: Iterable[str] = (),
    ) -> None:
        """Set how the sink behaves for ``run`` (call before the run's workers start)."""
        with self._lock:
            self._plans[run] = RunPlan(keyed, dict(slow or {}), set(response_lost))

    def _plan(self, run: str) -> RunPlan:
        with self._lock:
            plan = self._plans.get(run)
            if plan is None:
                plan = self._plans[run] = RunPlan()
            return plan

    # ------------------------------------------------------------------ reading the journal

    def attempts(self, run: str | None = None) -> list[Attempt]:
        """The journal (of one run, or all), in arrival order of completion."""
        return read_journal(self.journal_path, run)

    # ------------------------------------------------------------------ HTTP

    @staticmethod
    def _stale(plan: RunPlan, op: str, token: int) -> bool:
        """True when a newer token was seen for ``op``; otherwise ``token`` becomes the highest."""
        highest = plan.fence.get(op)
        if highest is not None and token < highest:
            return True
        plan.fence[op] = token
        return False

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode("latin-1").strip()
        headers: dict[str, str] = {}
        while True:
            line = (await reader.readline()).decode("latin-1")
            if line in ("\r\n", "\n", ""):
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        # an execution is in flight at the sink from the moment its request arrives, not from the
        # TCP accept: a caller stopped between connect and send has shown the sink nothing (no
        # operation, no token), and an older holder's call that lands meanwhile is, to the sink,
        # the only one in flight
        started = time.time()
        length = int(headers.get("content-length", "0"))
        if length > MAX_BODY or not request_line.startswith("POST /effect "):
            await _respond(writer, 400, {"error": "POST /effect with a small JSON body"})
            return
        run = headers.get("x-chaos-run", "")
        op = headers.get("x-operation-id", "")
        key = headers.get("idempotency-key") or None
        token_text = headers.get("x-fence-token")
        token = int(token_text) if token_text else None
        pid_text = headers.get("x-worker-pid")
        pid = int(pid_text) if pid_text else None
        plan = self._plan(run)
        # the token counts from the moment the request arrives: a holder stalled mid-request
        # (SIGSTOP between headers and body) has still shown its newer token to the store
        stale = token is not None and self._stale(plan, op, token)
        body = await reader.readexactly(length)
        fp = payload_fingerprint(body)

        def record(outcome: str) -> None:
            assert self._db is not None
            self._db.execute(
                "INSERT INTO attempts (run, op, fingerprint, token, key, pid, started, ended, "
                "outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run, op, fp, token, key, pid, started, time.time(), outcome),
            )

        delay = plan.slow.get(op)
        if not stale and delay is not None and (op, "slow") not in plan.used:
            plan.used.add((op, "slow"))
            await asyncio.sleep(delay)
        # judged again at commit: a call that waited may meet a newer token that arrived meanwhile
        if stale or (token is not None and self._stale(plan, op, token)):
            record(FENCED)
            await _respond(writer, 412, {"error": f"token {token} < {plan.fence.get(op)}"})
            return
        if plan.keyed and key is not None:
            prev = plan.keys.get(key)
            if prev is not None:
                if prev[0] != fp:
                    record(CONFLICT)
                    await _respond(writer, 409, {"error": "idempotency key reused"})
                    return
                record(REPLAYED)
                await _respond(writer, 200, {"effect": prev[1], "replayed": True})
                return
        lose = op in plan.response_lost and (op, "response_lost") not in plan.used
        if lose:
            plan.used.add((op, "response_lost"))
        record(APPLIED_RESPONSE_LOST if lose else APPLIED)
        plan.effects += 1
        number = plan.effects
        if plan.keyed and key is not None:
            plan.keys[key] = (fp, number)
        if lose:
            # committed; now the response is lost on the way back
            writer.transport.abort()
            return
        await _respond(writer, 200, {"effect": number, "replayed": False})


async def _respond(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 409: "Conflict", 412: "Precondition Failed"}[status]
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    await writer.drain()


def read_journal(path: str | os.PathLike[str], run: str | None = None) -> list[Attempt]:
    """Read attempts from a sink journal file (works while the sink runs: WAL readers)."""
    if not Path(path).exists():
        return []
    with contextlib.closing(sqlite3.connect(path)) as db:
        sql = "SELECT run, op, fingerprint, token, key, pid, started, ended, outcome FROM attempts"
        rows = (
            db.execute(sql + " ORDER BY seq").fetchall()
            if run is None
            else db.execute(sql + " WHERE run = ? ORDER BY seq", (run,)).fetchall()
        )
    return [Attempt(*row) for row in rows]


# --------------------------------------------------------------------------- client


async def call_sink(
    url: str,
    *,
    run: str,
    operation_id: str,
    body: bytes,
    idempotency_key: str | None = None,
    token: int | None = None,
    wait: float = 30.0,
) -> dict[str, Any]:
    """Apply one effect at the sink (``POST /effect``). Returns the JSON answer.

    Raises :class:`Fenced` (412), :class:`KeyConflict` (409), :class:`EffectOutcomeUnknown` when
    the connection drops before a response (the effect may have happened), ``TimeoutError``
    after ``wait`` seconds.
    """
    host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
    headers = {
        "Host": f"{host}:{port}",
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
        "X-Chaos-Run": run,
        "X-Operation-Id": operation_id,
        "X-Worker-Pid": str(os.getpid()),
    }
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    if token is not None:
        headers["X-Fence-Token"] = str(token)
    head = "POST /effect HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    async with asyncio.timeout(wait):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(head.encode("utf-8") + b"\r\n" + body)
            await writer.drain()
            status_line = await reader.readline()
            if not status_line:
                raise EffectOutcomeUnknown(
                    f"the sink dropped the connection for {operation_id} before answering; the "
                    "effect may or may not have happened"
                )
            status = int(status_line.split()[1])
            raw = await reader.read()
        except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
            raise EffectOutcomeUnknown(
                f"connection to the sink lost for {operation_id}: {exc!r}; the effect may or may "
                "not have happened"
            ) from exc
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    _, _, payload = raw.partition(b"\r\n\r\n")
    answer: dict[str, Any] = json.loads(payload or b"{}")
    if status == 412:
        raise Fenced(f"the sink fenced {operation_id}: {answer.get('error')}")
    if status == 409:
        raise KeyConflict(f"the sink refused {operation_id}: {answer.get('error')}")
    if status != 200:
        raise SinkError(f"the sink answered {status} for {operation_id}: {answer}")
    return answer


def iter_effects(attempts: Iterable[Attempt]) -> Iterator[Attempt]:
    return (a for a in attempts if a.effect)
