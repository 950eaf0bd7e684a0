"""A small harness for pipeline tests: memory broker, a ledger, workers that restart after a
simulated crash, and a fake clock moved in steps until a condition holds."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from replaysafe import App, Envelope, Guarantee, Worker
from replaysafe.brokers.base import RedeliveryKind
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.errors import SimulatedCrash
from replaysafe.failpoints import Failpoints
from replaysafe.ledger.base import Ledger
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.testing import EffectProbe, FakeClock

SOURCE = "orders"


class Harness:
    def __init__(
        self,
        *,
        mode: RedeliveryKind = RedeliveryKind.NACK,
        ledger: Ledger | None = None,
        clock: FakeClock | None = None,
        honour_keys: bool = True,
        horizon: float = 7 * 86_400.0,
    ) -> None:
        self.clock = clock or FakeClock()
        self.failpoints = Failpoints()
        self.broker = MemoryBroker(clock=self.clock, failpoints=self.failpoints)
        self.broker.declare(SOURCE, mode=mode, visibility_timeout=10.0)
        self.ledger = ledger or MemoryLedger(self.clock)
        self.app = App(
            "t",
            broker=self.broker,
            ledger=self.ledger,
            clock=self.clock,
            horizon=horizon,
            failpoints=self.failpoints,
        )
        self.probe = EffectProbe(honour_keys=honour_keys)
        self.crashes = 0
        self.workers: list[Any] = []
        self._pool: list[asyncio.Task[None]] = []
        self._done = asyncio.Event()

    def handler(self, guarantee: Guarantee, **kwargs: Any) -> Any:
        return self.app.handler(SOURCE, guarantee=guarantee, **kwargs)

    async def publish(self, *envelopes: Envelope) -> None:
        stamped = [e.with_published_at(self.clock.now()) for e in envelopes]
        await self.broker.publish(SOURCE, stamped)

    async def publish_raw(self, body: bytes, headers: dict[str, str]) -> None:
        """A message from a plain client (no replaysafe envelope)."""
        await self.broker.publish_raw(SOURCE, body, headers)  # type: ignore[attr-defined]

    def start(self, workers: int = 1) -> None:
        async def supervise(n: int) -> None:
            generation = 0
            while not self._done.is_set():
                w = Worker(self.app, owner=f"w{n}.{generation}")
                self.workers.append(w)
                stopper = asyncio.create_task(self._stop_on_done(w))
                try:
                    await w.run(drain_timeout=5)
                except SimulatedCrash:
                    self.crashes += 1
                    generation += 1
                finally:
                    stopper.cancel()

        self._pool = [asyncio.create_task(supervise(n)) for n in range(workers)]

    async def _stop_on_done(self, w: Any) -> None:
        await self._done.wait()
        w.stop()

    def group(self) -> str:
        return next(iter(self.app.handlers.values())).group

    def depth(self) -> int:
        return int(self.broker.depth(SOURCE, self.group()))

    async def run_until(
        self, cond: Callable[[], bool], *, seconds: float = 120.0, step: float = 0.25
    ) -> None:
        """Advance the fake clock in ``step`` increments until ``cond()`` (bounded)."""
        elapsed = 0.0
        for _ in range(20):
            await asyncio.sleep(0)
        while not cond():
            if elapsed > seconds:
                raise AssertionError(f"condition not reached after {seconds}s of fake time")
            self.clock.advance(step)
            elapsed += step
            for _ in range(20):
                await asyncio.sleep(0)
            # a ledger on a thread (SQLite) does real I/O: give it real time too, or fake time
            # runs ahead of a loaded disk and every lease looks expired by the time it returns
            await asyncio.sleep(0.001)

    async def drain(self, *, seconds: float = 120.0) -> None:
        await self.run_until(lambda: self.depth() == 0, seconds=seconds)

    async def stop(self) -> None:
        self._done.set()
        for _ in range(200):
            if all(t.done() for t in self._pool):
                break
            self.clock.advance(0.1)
            await asyncio.sleep(0)
        for t in self._pool:
            t.cancel()
        await asyncio.gather(*self._pool, return_exceptions=True)

    def total(self, name: str, **labels: str) -> int:
        return sum(w.stats.total(name, **labels) for w in self.workers)


def order(i: int, amount: int = 10) -> Envelope:
    """The test operation "charge order ``i``" (operation id ``charge:order-<i>``)."""
    return Envelope.of(f"charge:order-{i}", {"order": f"order-{i}", "amount": amount})


async def run(h: Harness, *envs: Envelope, seconds: float = 120.0) -> None:
    """Publish ``envs``, start one supervised worker, drain (``seconds`` of fake time at most)
    and stop."""
    await h.publish(*envs)
    h.start()
    await h.drain(seconds=seconds)
    await h.stop()


def once_for(op: str) -> Callable[[Any], bool]:
    """A failpoint ``when``: true at the first hit for operation ``op``, never again."""
    fired: set[str] = set()

    def when(ctx: Any) -> bool:
        if ctx.get("operation_id") == op and op not in fired:
            fired.add(op)
            return True
        return False

    return when


#: a business key that must not leak (logs, metric labels, quarantine details)
EMAIL = b"ann@example.com"
# starts only where a run of name characters starts: without the lookbehind every position of
# a long run is tried again (quadratic: a 1 MiB body held the event loop for minutes)
_EMAIL = re.compile(rb"(?<![\w.+-])[\w.+-]+@[\w-]+\.[\w.]+")


def mask_emails(body: bytes) -> bytes:
    """A pattern redaction hook: covers bodies and text alike."""
    return _EMAIL.sub(b"<email>", body)
