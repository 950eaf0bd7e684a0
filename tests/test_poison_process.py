"""A poison message that SIGKILLs its worker process every time is quarantined after max_attempts.

Real worker OS processes (`replaysafe run tests.apps.poison_app:app`) on RabbitMQ and on SQS
(moto), a SQLite ledger shared through its file. The poison's handler runs, then failpoint
``after_effect_before_ledger`` (action ``sigkill``) kills the process with a real SIGKILL: nothing
is settled, released or completed. A loop restarts the worker (bounded in count and time), as a
process supervisor would. Because the ledger counts attempts *before* the handler runs, the claim
after the ``max_attempts``-th killed run quarantines the poison as ``max_attempts`` with risk
``outcome_unknown`` (each killed run may have had its effect); the neighbours are applied once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from replaysafe import EffectRisk, Envelope, QuarantineReason
from replaysafe.brokers.base import Broker
from replaysafe.errors import ConfigurationError
from replaysafe.failpoints import Failpoints
from replaysafe.ledger import OpKey, SQLiteLedger, State

from .broker_fixtures import rabbit_source, sqs_queue
from .conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
HANDLER = "work"
MAX_ATTEMPTS = 3
GROUP = "poison-group"
POISON = "job:poison"
NEIGHBOURS = [f"job:{i}" for i in range(6)]
#: bounds of the restart loop: kills expected = MAX_ATTEMPTS, anything far beyond is a failure
MAX_STARTS = MAX_ATTEMPTS + 4
DEADLINE = 100.0


def envelopes() -> list[Envelope]:
    now = time.time()
    ops = [*NEIGHBOURS[:3], POISON, *NEIGHBOURS[3:]]
    return [Envelope.of(op, {"op": op}, published_at=now) for op in ops]


class Supervisor:
    """Starts `replaysafe run` again whenever it dies, until ``done()`` or a bound is hit."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.exits: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.errors: list[bytes] = []

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "replaysafe.cli", "run", "tests.apps.poison_app:app",
             "--drain-timeout", "5"],
            env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    async def run_until(self, done: Callable[[], Awaitable[bool]]) -> None:
        deadline = time.monotonic() + DEADLINE
        self.proc = self._start()
        while not await done():
            assert time.monotonic() < deadline, f"not done after {DEADLINE}s; exits {self.exits}"
            code = self.proc.poll()
            if code is not None:
                self.exits.append(code)
                self.errors.append(self.proc.stderr.read() if self.proc.stderr else b"")
                assert len(self.exits) < MAX_STARTS, (self.exits, self.errors[-1][-2000:])
                self.proc = self._start()
            await asyncio.sleep(0.2)

    async def stop(self) -> int | None:
        """SIGTERM the live worker (graceful drain); its exit status, or None if none ran."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr is not None:
            self.errors.append(proc.stderr.read())
            proc.stderr.close()
        return proc.returncode


async def poison_is_quarantined_and_the_rest_done(
    ledger: SQLiteLedger, broker_empty: Callable[[], Awaitable[bool]]
) -> bool:
    entries = await ledger.quarantined()
    if not any(e.operation_id == POISON for e in entries):
        return False
    for op in NEIGHBOURS:
        rec = await ledger.get(OpKey(HANDLER, op))
        if rec is None or rec.state is not State.COMPLETED:
            return False
    return await broker_empty()


async def run_case(
    tmp_path: Path, env: dict[str, str], broker: Broker, broker_empty: Callable[[], Awaitable[bool]]
) -> None:
    source = env["POISON_SOURCE"]
    await broker.publish(source, envelopes())
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    sup = Supervisor(env)
    try:
        await sup.run_until(lambda: poison_is_quarantined_and_the_rest_done(ledger, broker_empty))
        graceful = await sup.stop()
        [entry] = await ledger.quarantined()
        record = await ledger.get(OpKey(HANDLER, POISON))
    finally:
        with contextlib.suppress(Exception):
            await sup.stop()
        await ledger.close()
    assert graceful == 0, sup.errors[-1][-2000:]  # the last worker kept running, then drained
    # every death was a real SIGKILL, one per run of the poison
    assert sup.exits == [-signal.SIGKILL] * MAX_ATTEMPTS, sup.exits
    runs = [line.split() for line in (tmp_path / "runs.txt").read_text().splitlines()]
    poison_runs = [int(attempt) for op, attempt in runs if op == POISON]
    assert poison_runs == list(range(1, MAX_ATTEMPTS + 1))  # attempts 1, 2, 3
    # neighbours: each ran (applied) exactly once, whatever the kills around them
    assert Counter(op for op, _ in runs if op != POISON) == {op: 1 for op in NEIGHBOURS}
    assert entry.operation_id == POISON
    assert entry.reason is QuarantineReason.MAX_ATTEMPTS
    assert entry.risk is EffectRisk.OUTCOME_UNKNOWN  # every killed run may have had its effect
    assert entry.attempts == MAX_ATTEMPTS + 1  # the claim that decided, never run
    assert record is not None and record.state is State.QUARANTINED
    assert await broker_empty()


def base_env(tmp_path: Path, source: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REPLAYSAFE_FAILPOINTS"}
    return subprocess_env(env, POISON_DIR=str(tmp_path), POISON_SOURCE=source, POISON_OP=POISON,
                          POISON_GROUP=GROUP, POISON_MAX_ATTEMPTS=str(MAX_ATTEMPTS))  # fmt: skip


# --------------------------------------------------------------------------- brokers


@pytest.fixture
async def rabbit(amqp_url: str) -> AsyncIterator[tuple[Any, str]]:
    async with rabbit_source(amqp_url, "rs-poison", [GROUP]) as got:
        yield got


async def test_poison_that_sigkills_its_worker_is_quarantined_on_rabbitmq(
    rabbit: tuple[Any, str], amqp_url: str, tmp_path: Path
) -> None:
    broker, source = rabbit
    env = {**base_env(tmp_path, source), "POISON_BROKER": "rabbitmq", "POISON_URL": amqp_url}

    async def empty() -> bool:
        depths = await broker.queue_depths(source, GROUP)
        return bool(sum(depths.values()) == 0)  # ready nowhere: main, retry bands, dead letters

    await run_case(tmp_path, env, broker, empty)


async def test_a_poison_does_not_take_its_in_flight_neighbours_with_it(
    rabbit: tuple[Any, str], amqp_url: str, tmp_path: Path
) -> None:
    """The six neighbours are claimed and in flight (concurrency 8, each waits 1 s) every time the
    poison kills the process, and all of them come back together after each kill: without
    isolation each kill charged them an attempt, and they reached the budget with the poison
    (chaos runs quarantined 54-124 operations for 20 poison ones). A redelivered copy whose
    operation the ledger still holds IN_FLIGHT is claimed and run alone, so after the first kill
    only the poison is charged: it alone is quarantined and each neighbour runs once."""
    broker, source = rabbit
    env = {**base_env(tmp_path, source), "POISON_BROKER": "rabbitmq", "POISON_URL": amqp_url,
           "POISON_CONCURRENCY": "8", "POISON_SLOW": "1.0"}  # fmt: skip

    async def empty() -> bool:
        depths = await broker.queue_depths(source, GROUP)
        return bool(sum(depths.values()) == 0)

    await run_case(tmp_path, env, broker, empty)


@pytest.fixture
async def sqs(sqs_endpoint: str) -> AsyncIterator[tuple[Any, str]]:
    # short visibility: SQS redelivers a dead worker's message only when its timer runs out
    async with sqs_queue(sqs_endpoint, "rs-poison", visibility_timeout=1) as q:
        yield q


async def test_poison_that_sigkills_its_worker_is_quarantined_on_sqs(
    sqs: tuple[Any, str], sqs_endpoint: str, tmp_path: Path
) -> None:
    broker, queue = sqs
    env = {**base_env(tmp_path, queue), "POISON_BROKER": "sqs", "POISON_URL": sqs_endpoint}

    async def empty() -> bool:
        depth = await broker.approximate_depth(queue)
        return bool(depth["visible"] + depth["in_flight"] + depth["delayed"] == 0)

    await run_case(tmp_path, env, broker, empty)


# --------------------------------------------------------------------------- the action


def test_sigkill_action_kills_the_process_with_a_real_sigkill() -> None:
    code = (
        "import asyncio\n"
        "from replaysafe import Failpoints\n"
        "fps = Failpoints()\n"
        "fps.enable_from_env()\n"
        "asyncio.run(fps.hit('before_effect', {}))\n"
        "print('survived')\n"
    )
    env = subprocess_env(REPLAYSAFE_FAILPOINTS="before_effect=sigkill")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == -signal.SIGKILL, done
    assert b"survived" not in done.stdout


def test_env_spec_names_every_action_it_accepts() -> None:
    fps = Failpoints()
    fps.enable_from_env("before_effect=sigkill;after_ack=sleep:0.5;after_claim=exit")
    armed = {name: (a.kind, a.seconds) for name, a in fps._armed.items()}
    assert armed == {"before_effect": ("sigkill", 0.0), "after_ack": ("sleep", 0.5),
                     "after_claim": ("exit", 0.0)}  # fmt: skip
    with pytest.raises(ConfigurationError, match=re.escape("kill|exit|sigkill|sleep:S|pause")):
        fps.enable_from_env("before_effect=raise")


async def test_call_action_awaits_its_function_with_the_hit_context() -> None:
    fps = Failpoints()
    seen: list[object] = []

    async def fn(ctx: object) -> None:
        await asyncio.sleep(0)
        seen.append(ctx)

    fps.enable("before_effect", "call", fn=fn, when=lambda ctx: ctx.get("operation_id") == "a")
    await fps.hit("before_effect", {"operation_id": "b"})
    await fps.hit("before_effect", {"operation_id": "a"})
    assert seen == [{"operation_id": "a"}] and fps.fired["before_effect"] == 1
    with pytest.raises(ConfigurationError, match="needs fn="):
        fps.enable("before_effect", "call")
