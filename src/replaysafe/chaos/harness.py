"""The chaos harness: producer, workers, nemesis, one run per (guarantee, effect, fault) cell.

For ``--broker memory`` the workers are supervised tasks in this process (the memory broker only
lives here): a crash is a failpoint ``kill`` (``SimulatedCrash``), after which the supervisor
starts a new worker, as ``demo.py`` does. For RabbitMQ, SQS and Kafka the workers are separate OS
processes (``python -m replaysafe.chaos.worker SPEC.json``) running the real runtime; a crash is
``os._exit`` at the failpoint (as SIGKILL: nothing settled), a pause is ``SIGSTOP`` then
``SIGCONT`` from here, a rebalance is a worker process joining and leaving the group.

A run: configure the sink, open the ledger, start the workers, publish (through the producer, or
through the outbox relay for ``relay_crash``), wait until every confirmed operation is resolved
and the system is quiet, run the second phase of faults that need one (``key_reuse``,
``redrive_applied``), stop everything it started, then count with the checker.
Every wait is bounded; every server binds 127.0.0.1; whatever a run starts, it stops.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from replaysafe.app import App
from replaysafe.brokers.base import RedeliveryKind
from replaysafe.chaos.app import (
    RecordingBroker,
    RunSpec,
    build_app,
    create_effects_table,
    mark_once,
    read_records,
)
from replaysafe.chaos.cells import (
    BROKERS,
    EFFECTS,
    FAULT_RATE,
    FAULTS,
    GUARANTEES,
    KAFKA_FAULTS,
    LEDGERS,
    PROCESS_FAULTS,
    SQS_OVERLAP_VISIBILITY,
    ChaosConfig,
    Matrix,
    applicable,
    default_cells,
    op_id,
    pick_targets,
)
from replaysafe.chaos.checker import Published, RunResult, check
from replaysafe.chaos.ledgers import (
    drop_ledger,
    effect_rows,
    ledger_from_spec,
    ledger_nemesis,
    open_ledger,
    quarantine_flags,
)
from replaysafe.chaos.procs import process_run
from replaysafe.chaos.publish import (
    broker_conf,
    broker_from_conf,
    envelopes_for,
    normalise_broker_url,
    produce,
)
from replaysafe.chaos.settle import (
    RunContext,
    ambiguity_windows,
    count_hits,
    second_phase,
    wait_settled,
)
from replaysafe.chaos.sink import EffectSink
from replaysafe.errors import ConfigurationError, SimulatedCrash
from replaysafe.failpoints import Failpoints
from replaysafe.runtime.worker import Worker

__all__ = [
    "BROKERS",
    "ChaosConfig",
    "EFFECTS",
    "FAULTS",
    "FAULT_RATE",
    "GUARANTEES",
    "KAFKA_FAULTS",
    "LEDGERS",
    "Matrix",
    "PROCESS_FAULTS",
    "RunContext",
    "SQS_OVERLAP_VISIBILITY",
    "ambiguity_windows",
    "applicable",
    "broker_conf",
    "broker_from_conf",
    "count_hits",
    "default_cells",
    "drop_ledger",
    "envelopes_for",
    "ledger_from_spec",
    "ledger_nemesis",
    "normalise_broker_url",
    "op_id",
    "open_ledger",
    "pick_targets",
    "produce",
    "run_cell",
    "run_matrix",
    "supervise_in_process",
    "second_phase",
    "wait_settled",
]


def _run_name(index: int, guarantee: str, effect: str, fault: str) -> str:
    """Readable and unique per invocation (server-side names never collide with an earlier
    run's leftovers)."""
    name = re.sub(r"[^a-z0-9]+", "-", f"r{index}-{guarantee}-{effect}-{fault}".lower())[:54]
    return f"{name}-{uuid.uuid4().hex[:4]}"


async def run_cell(
    cfg: ChaosConfig, sink: EffectSink, index: int, guarantee: str, effect: str, fault: str
) -> RunResult:
    started = time.monotonic()
    run = _run_name(index, guarantee, effect, fault)
    base = Path(cfg.workdir or tempfile.gettempdir())
    rundir = base / run
    _mkdirs(str(rundir))
    targets = [] if fault == "none" else pick_targets(cfg.ops, cfg.seed, fault)
    lease = cfg.lease
    if fault == "visibility_overlap" and cfg.broker == "sqs":
        # SQS visibility is whole seconds: the lease (and the slow first execution, 1.5 leases)
        # must outlast the 1 s visibility by enough that the copy is fetched while the first
        # execution still runs; at 1.5 s the copy had 0.2 s to be picked up and a loaded machine
        # missed it
        lease = max(lease, 4 * SQS_OVERLAP_VISIBILITY)
    spec = RunSpec(
        run=run,
        guarantee=guarantee,
        effect=effect,
        fault=fault,
        source=f"chaos-{run}",
        group=f"chaos-{run}-g",
        sink_url=sink.url,
        state_dir=str(rundir / "state"),
        record_dir=str(rundir / "records"),
        targets=targets,
        lease=lease,
        concurrency=cfg.concurrency,
        in_process=cfg.broker == "memory",
        # Kafka redelivers a stalled member's records only after its session timeout and a rejoin
        pause=(lease * 2.5 + (6.0 if cfg.broker == "kafka" else 0.0))
        if fault == "pause_beyond_lease"
        else 0.0,
        slow=lease * 1.5 if fault == "visibility_overlap" else 0.0,
        extend_visibility=fault != "visibility_overlap",
    )
    _mkdirs(spec.state_dir)
    sink.configure(
        run,
        keyed=effect == "keyed",
        slow={op: spec.slow for op in targets} if fault == "visibility_overlap" else None,
        response_lost=targets if fault == "response_lost" else (),
    )
    ledger, spec.ledger = await open_ledger(cfg, run, rundir)
    spec.broker = broker_conf(cfg, fault)
    history: list[Published] = []
    ctx = RunContext(cfg, sink, spec, ledger, history, rundir)
    try:
        if effect == "transactional":
            await create_effects_table(ledger, spec.ledger["kind"], spec.ledger.get("schema"))
        if cfg.broker == "memory":
            await _memory_run(ctx)
        else:
            await process_run(ctx)
        attempts = (
            await effect_rows(ledger, run, spec.ledger["kind"], spec.ledger.get("schema"))
            if effect == "transactional"
            else sink.attempts(run)
        )
        flags = await quarantine_flags(ledger)
    finally:
        await drop_ledger(ledger, spec.ledger)
    records = read_records(spec.record_dir)
    completed = [(r["op"], r["t"]) for r in records if r["e"] == "completed" and r["op"]]
    result = check(
        guarantee=guarantee,
        effect=effect,
        fault=fault,
        history=history,
        attempts=attempts,
        quarantine=flags,
        completed=completed,
        fault_hits=count_hits(spec, records, attempts, history),
    )
    result.windows = ambiguity_windows(attempts, completed)
    result.seconds = time.monotonic() - started
    result.evidence = _evidence(ctx, result, records)
    return result


def _evidence(ctx: RunContext, r: RunResult, records: list[dict[str, Any]]) -> list[str]:
    """For a run that lost operations: how its settle waits ended and what the broker records
    show of (up to 5 of) the lost ones, so that a failure in CI explains itself."""
    if not r.lost_ops:
        return []
    t0 = min((p.at for p in ctx.history), default=0.0)
    out = [f"settle: {'; '.join(ctx.settles) or 'none'}"]
    for op in r.lost_ops[:5]:
        seen = [f"{e['e']}@{e['t'] - t0:.2f}s/pid{e['pid']}" for e in records if e.get("op") == op]
        published = [f"{p.at - t0:.2f}s" for p in ctx.history if p.op == op and p.confirmed]
        out.append(f"lost {op}: published {published}, records {seen or 'none'}")
    return out


def _mkdirs(path: str) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------- memory broker


async def _memory_run(ctx: RunContext) -> None:
    from replaysafe.brokers.memory import MemoryBroker

    spec = ctx.spec
    failpoints = Failpoints()
    broker = MemoryBroker(failpoints=failpoints)
    mode = RedeliveryKind(spec.broker["mode"])
    broker.declare(
        spec.source,
        mode=mode,
        visibility_timeout=(spec.lease / 4 if spec.fault == "visibility_overlap" else spec.lease),
        partitions=4 if mode is RedeliveryKind.OFFSET_REWIND else 1,
    )
    recording = RecordingBroker(broker, spec.record_dir)
    app = build_app(spec, recording, ctx.ledger, failpoints)
    from replaysafe.chaos.app import arm

    arm(spec, failpoints)
    done = asyncio.Event()
    restarts = 0
    # a crash loop must end, but every targeted crash is a restart: poison crashes its worker
    # up to max_attempts + 2 times per target (the 10k-op run exhausted a fixed 500)
    budget = max(500, 2 * len(spec.targets) * (spec.max_attempts + 2))

    def crashed() -> None:
        nonlocal restarts
        restarts += 1

    def supervise(n: int, until: asyncio.Event) -> Coroutine[Any, Any, None]:
        return supervise_in_process(
            app, until, owner=lambda gen: f"w{n}.{gen}", drain_timeout=spec.pause + 5,
            may_start=lambda: restarts < budget, on_crash=crashed,
        )  # fmt: skip

    pool = [asyncio.create_task(supervise(n, done)) for n in range(ctx.cfg.workers)]
    nemesis: asyncio.Task[None] | None = None
    try:
        envelopes = envelopes_for(spec, ctx.cfg.ops, ctx.cfg.seed)
        if spec.fault == "rebalance":
            nemesis = asyncio.create_task(_memory_rebalance(spec, supervise))
        elif spec.fault == "ledger_restart":
            nemesis = asyncio.create_task(ledger_nemesis(spec))
        await produce(spec, broker, envelopes, ctx.history, failpoints,
                      outbox_path=ctx.rundir / "outbox.db")  # fmt: skip

        async def depth() -> int:
            return int(broker.depth(spec.source, spec.group))

        await wait_settled(ctx, depth=depth, authoritative=True)
        if nemesis is not None:
            await nemesis
        if await second_phase(ctx, broker, app):
            await wait_settled(ctx, depth=depth, authoritative=True)
    finally:
        done.set()
        if nemesis is not None:
            nemesis.cancel()
        async with asyncio.timeout(spec.pause + 30):
            await asyncio.gather(*pool, return_exceptions=True)
        await broker.close()


async def supervise_in_process(
    app: App,
    until: asyncio.Event,
    *,
    owner: Callable[[int], str],
    drain_timeout: float,
    may_start: Callable[[], bool] = lambda: True,
    on_worker: Callable[[Worker], None] = lambda worker: None,
    on_crash: Callable[[], None] = lambda: None,
) -> None:
    """One supervised worker slot in this process (the memory broker only lives here): run a
    :class:`~replaysafe.runtime.worker.Worker` of ``app`` until ``until`` is set, then stop it
    gracefully (drain up to ``drain_timeout``, settle what finished). A ``SimulatedCrash`` (the
    failpoint ``kill``) is the process dying with nothing settled: ``on_crash`` is told and a new
    worker (generation + 1, named by ``owner``) starts, as a process supervisor would, while
    ``may_start()`` allows (a crash loop must end). ``on_worker`` sees each worker started."""
    generation = 0
    while not until.is_set() and may_start():
        worker = Worker(app, owner=owner(generation))
        on_worker(worker)
        stopper = asyncio.ensure_future(until.wait())
        runner = asyncio.ensure_future(worker.run(drain_timeout=drain_timeout))
        try:
            await asyncio.wait({stopper, runner}, return_when=asyncio.FIRST_COMPLETED)
            if not runner.done():
                worker.stop()
            await runner
        except SimulatedCrash:
            on_crash()
            generation += 1
        finally:
            stopper.cancel()


async def _memory_rebalance(
    spec: RunSpec, supervise: Callable[[int, asyncio.Event], Coroutine[Any, Any, None]]
) -> None:
    """A consumer joins the group mid-run and leaves again, twice (each join and each leave
    rebalances the partitions while work is in flight)."""
    for round_ in range(2):
        await asyncio.sleep(0.05)
        leave = asyncio.Event()
        task = asyncio.create_task(supervise(100 + round_, leave))
        mark_once(spec.state_dir, spec.fault, f"join-{round_}")
        await asyncio.sleep(0.15)
        leave.set()
        await task
        mark_once(spec.state_dir, spec.fault, f"leave-{round_}")


# --------------------------------------------------------------------------- the matrix


async def run_matrix(
    cfg: ChaosConfig, *, progress: Callable[[RunResult], None] | None = None
) -> Matrix:
    """Run every cell of ``cfg`` one after the other against one shared sink."""
    started = time.monotonic()
    cells = cfg.matrix()
    if not cells:
        raise ConfigurationError(
            "no cell of the matrix applies to this broker/ledger/effect/guarantee/fault choice"
        )
    matrix = Matrix(cfg.broker, cfg.ledger, cfg.ops, cfg.seed)
    own_dir = None
    if cfg.workdir is None:
        own_dir = tempfile.TemporaryDirectory(prefix="replaysafe-chaos-")
        cfg.workdir = own_dir.name
    try:
        with EffectSink(Path(cfg.workdir) / "sink-journal.db") as sink:
            gate = asyncio.Semaphore(max(1, cfg.parallel))

            async def one(index: int, cell: tuple[str, str, str]) -> RunResult:
                async with gate:
                    result = await run_cell(cfg, sink, index, *cell)
                if progress is not None:
                    progress(result)
                return result

            matrix.runs = list(
                await asyncio.gather(*(one(i, cell) for i, cell in enumerate(cells)))
            )
    finally:
        if own_dir is not None:
            cfg.workdir = None
            own_dir.cleanup()
    matrix.seconds = time.monotonic() - started
    return matrix
