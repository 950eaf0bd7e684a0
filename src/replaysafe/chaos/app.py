"""The chaos app: one handler whose business effect lands at the effect sink (keyed or unkeyed)
or in the ledger's own database (transactional), the fault arming, and the recording broker.

The same code runs in-process (``--broker memory``: supervised worker tasks, failpoint ``kill``
raises ``SimulatedCrash``) and in worker processes (``python -m replaysafe.chaos.worker``:
failpoint ``exit`` is ``os._exit``, a pause is a real ``SIGSTOP`` the harness ends with
``SIGCONT``). Every fault that fires leaves a marker file, so hits survive the process they
killed: the harness counts the markers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from replaysafe import failpoints as fp
from replaysafe.app import App, Context, RetryPolicy
from replaysafe.brokers.base import (
    Broker,
    Capabilities,
    Delivery,
    SourceFacts,
    Subscription,
)
from replaysafe.brokers.rabbitmq import AMQP_PORT
from replaysafe.chaos.sink import EffectOutcomeUnknown, call_sink
from replaysafe.envelope import HEADER_FINGERPRINT, HEADER_OPERATION_ID, Envelope
from replaysafe.errors import OutcomeUnknown
from replaysafe.failpoints import Failpoints
from replaysafe.guarantees import Effect, Guarantee
from replaysafe.ledger.base import LedgerBackend
from replaysafe.testing.netcut import CutRelay

SOURCE_PREFIX = "chaos"
HANDLER = "apply"
EFFECTS_TABLE = "chaos_effects"

#: fault name -> the worker-side failpoint that injects it (others are injected elsewhere)
WORKER_FAILPOINT = {
    # at-most-once: after_ack (see arm())
    "crash_after_effect": fp.AFTER_EFFECT_BEFORE_LEDGER,
    "crash_after_claim": fp.AFTER_CLAIM,
    "poison": fp.BEFORE_EFFECT,
    "pause_beyond_lease": fp.BEFORE_EFFECT,
    # at-least-once: after_effect_before_ledger (see _arm_broker_restart())
    "broker_restart": fp.AFTER_LEDGER_BEFORE_ACK,
}


class Rejected(Exception):
    """The handler refuses this operation for now (non-retryable: it is quarantined at once).
    Used by ``redrive_applied``: the operation is quarantined, then redriven and applied."""


@dataclass(slots=True)
class RunSpec:
    """Everything a worker needs to run one cell of the matrix (JSON-serialisable)."""

    run: str
    guarantee: str
    effect: str
    fault: str
    source: str
    group: str
    sink_url: str
    #: directory of marker files: fault hits, the redrive gate
    state_dir: str
    #: recording journal of deliveries and completions (JSON lines, one file per process)
    record_dir: str
    targets: list[str] = field(default_factory=list)
    lease: float = 2.0
    concurrency: int = 8
    max_attempts: int = 4
    horizon: float = 3600.0
    pause: float = 0.0
    slow: float = 0.0
    extend_visibility: bool = True
    in_process: bool = True
    broker: dict[str, Any] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls(**json.loads(text))


# --------------------------------------------------------------------------- markers


def mark_once(state_dir: str, fault: str, op: str, limit: int = 1) -> bool:
    """Create one hit marker for ``(fault, op)`` unless ``limit`` exist already (atomic across
    processes: O_EXCL). True when this call may fire."""
    (Path(state_dir) / "hits" / fault).mkdir(parents=True, exist_ok=True)
    for n in range(limit):
        try:
            fd = os.open(_marker(state_dir, fault, op, n), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, f"{os.getpid()} {time.time()}\n".encode())
        os.close(fd)
        return True
    return False


def _marker(state_dir: str, fault: str, op: str, n: int) -> Path:
    return Path(state_dir) / "hits" / fault / f"{op.replace('/', '%2F')}#{n}"


def restamp(state_dir: str, fault: str, op: str, at: float) -> None:
    """Move the first hit marker of ``(fault, op)`` to ``at`` (a fault that fires later than its
    marker, e.g. a stop that waits for its turn). Replaced whole (write, then rename), so the
    supervisor, which reads markers while workers write them, never sees a half-written one."""
    path = _marker(state_dir, fault, op, 0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()} {at}\n")
    os.replace(tmp, path)


def hits(state_dir: str, fault: str) -> list[tuple[str, int, float]]:
    """The markers of ``fault``: (operation, pid, time) per hit. A marker read while
    :func:`mark_once` is still writing it shows pid 0 and time 0."""
    d = Path(state_dir) / "hits" / fault
    out: list[tuple[str, int, float]] = []
    if not d.is_dir():
        return out
    for f in sorted(d.iterdir()):
        if f.name.startswith("."):  # restamp()'s file before its rename
            continue
        pid, _, at = f.read_text().strip().partition(" ")
        out.append((f.name.rsplit("#", 1)[0].replace("%2F", "/"), int(pid or 0), float(at or 0)))
    return out


def redrive_gate_open(state_dir: str) -> bool:
    return (Path(state_dir) / "redrive-gate").exists()


def open_redrive_gate(state_dir: str) -> None:
    (Path(state_dir) / "redrive-gate").touch()


# --------------------------------------------------------------------------- recording broker


class _Recorder:
    """Appends JSON lines with unbuffered ``os.write``: a line written survives ``os._exit``."""

    def __init__(self, record_dir: str) -> None:
        Path(record_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(record_dir) / f"{os.getpid()}-{id(self):x}.jsonl"
        self._fd = os.open(self.path, os.O_CREAT | os.O_APPEND | os.O_WRONLY)

    def write(self, event: str, op: str | None, fingerprint: str | None) -> None:
        line = json.dumps(
            {"e": event, "op": op, "fp": fingerprint, "t": time.time(), "pid": os.getpid()}
        )
        os.write(self._fd, line.encode() + b"\n")


def read_records(record_dir: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    d = Path(record_dir)
    if not d.is_dir():
        return out
    for f in d.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    out.sort(key=lambda r: r["t"])
    return out


class _RecordedDelivery(Delivery):
    def __init__(self, inner: Delivery, recorder: _Recorder) -> None:
        self._inner = inner
        self._rec = recorder
        self.body = inner.body
        self.headers = inner.headers
        self.content_type = inner.content_type
        self.key = inner.key
        self.broker_timestamp = inner.broker_timestamp
        self.delivery_id = inner.delivery_id
        self.attempt = inner.attempt
        self.redelivered = inner.redelivered
        self.received_at = inner.received_at
        self.settle_deadline = inner.settle_deadline
        self._op = inner.headers.get(HEADER_OPERATION_ID)
        recorder.write("delivered", self._op, inner.headers.get(HEADER_FINGERPRINT))

    @property
    def settled(self) -> bool:
        return self._inner.settled

    async def ack(self) -> None:
        await self._completing(self._inner.ack)

    async def ack_confirmed(self) -> None:
        await self._completing(self._inner.ack_confirmed)

    async def _completing(self, settle: Callable[[], Awaitable[None]]) -> None:
        already = self._inner.settled
        await settle()
        if not already:
            # recorded after the broker has it: a crash in between undercounts, never invents
            self._rec.write("completed", self._op, self.headers.get(HEADER_FINGERPRINT))

    async def nack(self, delay: float | None = None) -> None:
        await self._inner.nack(delay)

    async def reject(self, reason: str) -> None:
        await self._inner.reject(reason)

    async def extend(self, seconds: float) -> None:
        await self._inner.extend(seconds)
        self.settle_deadline = self._inner.settle_deadline


class _RecordedSubscription(Subscription):
    def __init__(self, inner: Subscription, recorder: _Recorder) -> None:
        self._inner = inner
        self._rec = recorder

    async def __anext__(self) -> Delivery:
        return _RecordedDelivery(await self._inner.__anext__(), self._rec)

    async def next_batch(self, max_items: int) -> list[Delivery]:
        return [_RecordedDelivery(d, self._rec) for d in await self._inner.next_batch(max_items)]

    async def close(self, *, abandon: bool = False) -> None:
        await self._inner.close(abandon=abandon)


class RecordingBroker(Broker):
    """Wraps a broker so every delivery and every completion (ack) is journaled: the checker's
    ``acked_unapplied`` and the ambiguity window come from here, not from the runtime."""

    def __init__(self, inner: Broker, record_dir: str) -> None:
        self.inner = inner
        self._rec = _Recorder(record_dir)

    async def publish(self, destination: str, envelopes: Sequence[Envelope]) -> None:
        await self.inner.publish(destination, envelopes)

    async def subscribe(self, source: str, group: str, *, prefetch: int = 16) -> Subscription:
        return _RecordedSubscription(
            await self.inner.subscribe(source, group, prefetch=prefetch), self._rec
        )

    def capabilities(self, source: str) -> Capabilities:
        return self.inner.capabilities(source)

    async def describe(self, source: str) -> SourceFacts:
        return await self.inner.describe(source)

    async def close(self) -> None:
        await self.inner.close()


# --------------------------------------------------------------------------- the app


def effect_of(spec: RunSpec) -> Effect:
    if spec.effect == "transactional":
        return Effect.transactional()
    if spec.effect == "keyed":
        return Effect.keyed("effect-sink")
    # Rejected is raised before the sink is called: proof that nothing was applied
    return Effect.unkeyed("effect-sink", not_applied_on=(Rejected,))


def build_app(spec: RunSpec, broker: Broker, ledger: LedgerBackend, failpoints: Failpoints) -> App:
    """The chaos app for one run: handler ``apply`` on ``spec.source``.

    Keyed effects send the operation id as ``Idempotency-Key`` under every guarantee (the
    downstream dedupes, whatever the runtime does); every call carries the claim's fencing token
    when there is one (effectively-once). An unkeyed effect under effectively-once declares an
    unknown outcome at the sink (response lost) is raised as :class:`~replaysafe.OutcomeUnknown`:
    the runtime quarantines it (risk ``outcome_unknown``) instead of re-running it.
    """
    app = App(
        f"chaos-{spec.run}",
        broker=broker,
        ledger=ledger,
        horizon=spec.horizon,
        failpoints=failpoints,
    )
    give_up: tuple[type[BaseException], ...] = (Rejected,)
    redrive_targets = set(spec.targets) if spec.fault == "redrive_applied" else set()
    slow_targets = set(spec.targets) if spec.fault == "visibility_overlap" else set()
    slowed: set[str] = set()
    guarantee = Guarantee(spec.guarantee)
    effect = effect_of(spec)
    table = effects_table(spec.ledger.get("kind", ""), spec.ledger.get("schema"))

    @app.handler(
        spec.source,
        guarantee=guarantee,
        effect=effect
        if guarantee is Guarantee.EFFECTIVELY_ONCE or spec.effect == "keyed"
        else None,
        name=HANDLER,
        group=spec.group,
        lease=spec.lease,
        concurrency=spec.concurrency,
        retry=RetryPolicy(
            max_attempts=spec.max_attempts, base_delay=0.05, max_delay=0.3, give_up_on=give_up
        ),
        extend_visibility=spec.extend_visibility,
    )
    async def apply(ctx: Context) -> Any:
        op = ctx.operation_id
        if op in redrive_targets and not redrive_gate_open(spec.state_dir):
            raise Rejected(f"{op} is refused until the redrive gate opens")
        if spec.effect == "transactional":
            assert ctx.tx is not None
            started = time.time()
            if op in slow_targets and op not in slowed:
                slowed.add(op)
                await asyncio.sleep(spec.slow)
            placeholder = "%s" if spec.ledger.get("kind") == "postgres" else "?"
            marks = ", ".join([placeholder] * 7)
            await ctx.tx.execute(
                f"INSERT INTO {table} (run, op, fingerprint, token, pid, started, ended) "
                f"VALUES ({marks})",
                (spec.run, op, ctx.envelope.fingerprint, ctx.token, os.getpid(), started,
                 time.time()),
            )  # fmt: skip
            return None
        key = (ctx.idempotency_key or op) if spec.effect == "keyed" else None
        try:
            return await call_sink(
                spec.sink_url,
                run=spec.run,
                operation_id=op,
                body=ctx.envelope.payload,
                idempotency_key=key,
                token=ctx.token,
                wait=max(30.0, spec.slow * 4),
            )
        except EffectOutcomeUnknown as exc:
            # the runtime decides by guarantee and effect: a keyed call is retried, an unkeyed
            # one under effectively-once is quarantined outcome_unknown (never re-run blindly)
            raise OutcomeUnknown(f"the sink's answer for {op} was lost: {exc}") from exc

    return app


def effects_table(kind: str, schema: str | None) -> str:
    """The effect table's name: in the run's own PostgreSQL schema (dropped with it), never in
    whatever ``search_path`` happens to say."""
    if kind == "postgres" and schema is not None:
        if not schema.replace("_", "").isalnum():
            raise ValueError(f"unexpected schema name {schema!r}")
        return f'"{schema}".{EFFECTS_TABLE}'
    return EFFECTS_TABLE


async def create_effects_table(ledger: LedgerBackend, kind: str, schema: str | None = None) -> None:
    """The transactional effect's table, in the ledger's own database (no unique constraint: a
    duplicate effect must be able to show up)."""
    from replaysafe.ledger.base import TransactionalLedger

    assert isinstance(ledger, TransactionalLedger)
    real = "DOUBLE PRECISION" if kind == "postgres" else "REAL"
    async with ledger.transaction() as tx:
        await tx.execute(
            f"CREATE TABLE IF NOT EXISTS {effects_table(kind, schema)} (run TEXT, op TEXT, "
            "fingerprint TEXT, "
            f"token BIGINT, pid INTEGER, started {real}, ended {real})"
        )


def arm(
    spec: RunSpec,
    failpoints: Failpoints,
    ledger: LedgerBackend | None = None,
    relay: CutRelay | None = None,
) -> None:
    """Arm the worker-side failpoint of ``spec.fault`` for its target operations.

    Each firing first leaves a marker (the hit count survives the process it kills). Crashes fire
    once per operation; ``poison`` fires on every attempt (bounded), so the operation can only
    end in quarantine; a pause stops the process itself (``SIGSTOP``, ended by the harness's
    ``SIGCONT``) or, in-process, sleeps without heartbeats. With a SQLite ``ledger`` the process
    stops only while that ledger is idle: stopped inside one of its transactions it would hold
    the file's write lock and stall every other worker, so nobody could take over (measured:
    the other worker fetched nothing for the whole pause, and 0-2 of 4 pauses hit their window).
    """
    point = WORKER_FAILPOINT.get(spec.fault)
    if point is None:
        return
    targets = set(spec.targets)
    fault = spec.fault
    eo = spec.guarantee == Guarantee.EFFECTIVELY_ONCE.value
    if point == fp.AFTER_CLAIM and not eo:
        point = fp.BEFORE_EFFECT  # no claim without a ledger: the closest window
    if fault == "crash_after_effect" and spec.guarantee == Guarantee.AT_MOST_ONCE.value:
        # at-most-once completes *before* the effect: its window between the two boundaries is
        # after the completion and before the effect, and that is where the same kill lands
        point = fp.AFTER_ACK
    limit = spec.max_attempts + 2 if fault == "poison" else 1

    def when(ctx: Mapping[str, Any]) -> bool:
        op = ctx.get("operation_id")
        return op in targets and mark_once(spec.state_dir, fault, str(op), limit)

    async def stop_self(ctx: Mapping[str, Any]) -> None:
        from replaysafe.ledger.sqlite import SQLiteLedger

        # one stopped worker at a time: two overlapping stops (two workers) left nobody to take
        # either operation over. The process waits here, heartbeats running, until no other is
        # stopped, and the marker gets the time the stop really starts (the window is judged
        # from it); a wait past the handler's deadline cuts the handler, and that target is
        # then never stopped (it is not counted as a hit)
        op = str(ctx.get("operation_id"))
        # not stopped yet: the supervisor resumes a stop `pause` after its marker, so until the
        # stop starts the marker says never
        restamp(spec.state_dir, fault, op, math.inf)
        turn = Path(spec.state_dir) / "stopped"
        give_up = time.monotonic() + 3 * spec.pause  # a holder that died stopped frees nobody
        fd = -1
        while fd < 0:
            try:
                fd = os.open(turn, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if time.monotonic() > give_up:
                    break
                await asyncio.sleep(0.05)
        try:
            restamp(spec.state_dir, fault, op, time.time())
            held = ledger.idle() if isinstance(ledger, SQLiteLedger) else contextlib.nullcontext()
            async with held:
                os.kill(os.getpid(), signal.SIGSTOP)  # the harness sends SIGCONT after the pause
        finally:
            if fd >= 0:
                os.close(fd)
                os.unlink(turn)

    if fault == "broker_restart":
        _arm_broker_restart(spec, failpoints, targets, eo, relay)
        return
    if fault == "pause_beyond_lease" and not spec.in_process:
        failpoints.enable(point, "call", when=when, fn=stop_self)
    elif fault == "pause_beyond_lease":
        failpoints.enable(point, "sleep", when=when, seconds=spec.pause)
    else:
        failpoints.enable(point, "kill" if spec.in_process else "exit", when=when)


#: how long a worker holds its ack back after the cut: long enough for the client to read the
#: reset of its socket, so the ack goes to a channel it knows is dead
BROKER_RESTART_WAIT = 1.0


async def relayed(url: str) -> tuple[CutRelay, str]:
    """A started :class:`CutRelay` toward the RabbitMQ ``url`` and the URL that goes through it:
    a worker whose connections a fault will cut opens them all on that URL."""
    relay = CutRelay.for_url(url, default_port=AMQP_PORT)
    await relay.start()
    return relay, relay.url(url)


def cut_own_connections(relay: CutRelay | None, state_dir: str, fault: str, op: str) -> bool:
    """Cut every connection of this worker's ``relay``; leave ``fault``'s hit marker for ``op``
    only when a connection was cut (an unhit fault then shows as 0 hits, never as a false one)."""
    if relay is not None and relay.cut():
        mark_once(state_dir, fault, op)
        return True
    print(f"{fault}: {op}: no connection of this process to cut", flush=True)
    return False


async def close_quietly(*resources: Any) -> None:
    """Close a worker process's broker, ledger, relay (``None`` skipped), each even when an
    earlier close failed: at the end of a process nothing more can be done about a failure."""
    for resource in resources:
        if resource is not None:
            with contextlib.suppress(Exception):
                await resource.close()


def _arm_broker_restart(
    spec: RunSpec, failpoints: Failpoints, targets: set[str], eo: bool, relay: CutRelay | None
) -> None:
    """``broker_restart`` (RabbitMQ): after the effect is recorded and before the ack, every
    connection between this worker and the server is cut (the worker's :class:`CutRelay`), so
    the ack that follows goes to a dead channel. The server requeues every delivery the
    connection held unacked; the worker reconnects through the relay. Each cut that dropped a
    connection is a hit."""
    point = fp.AFTER_LEDGER_BEFORE_ACK if eo else fp.AFTER_EFFECT_BEFORE_LEDGER
    if relay is None:
        raise RuntimeError("broker_restart needs the worker's broker connections on a CutRelay")

    def when(ctx: Mapping[str, Any]) -> bool:
        op = ctx.get("operation_id")
        if op not in targets or not mark_once(spec.state_dir, "broker_restart-armed", str(op)):
            return False
        cut_own_connections(relay, spec.state_dir, "broker_restart", str(op))
        return True  # the failpoint's sleep: the reset is read before the ack

    failpoints.enable(point, "sleep", when=when, seconds=BROKER_RESTART_WAIT)
