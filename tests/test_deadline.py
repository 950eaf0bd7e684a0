"""The handler deadline (issue 13, item 11b and the deadline part of item 9): the default is
decided from the lease extension, so a healthy slow handler whose lease is being extended is not
cut, yet a hung one still is; a deadline shorter than the lease is a warning at registration
and in ``explain`` (RS120). Memory broker, fake clock (tests/runtime_harness.py)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from replaysafe import ConfigurationError, Context, Effect, Guarantee, RetryPolicy
from replaysafe import observe as o
from replaysafe.app import DEADLINE_LEASES, App
from replaysafe.brokers import MemoryBroker
from replaysafe.ledger import MemoryLedger, OpKey, State

from .runtime_harness import Harness, order

EO, ALO, AMO = Guarantee.EFFECTIVELY_ONCE, Guarantee.AT_LEAST_ONCE, Guarantee.AT_MOST_ONCE


async def test_a_slow_handler_under_a_short_lease_completes_once_by_default() -> None:
    """A 6 s downstream call under a 3 s lease: the keeper extends the lease while it runs.
    The old default (0.8 x lease = 2.4 s) cut it, and an unkeyed effect was then quarantined."""
    h = Harness(honour_keys=False)

    async def send(ctx: Context) -> None:
        await h.clock.sleep(6)
        await h.probe.apply("order-1", None, None)

    h.handler(EO, effect=Effect.unkeyed("smtp"), lease=3)(send)
    assert h.app.handlers["send"].timeout == 3 * DEADLINE_LEASES
    await h.publish(order(1))
    h.start()
    await h.drain(seconds=60)
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 1}
    assert await h.ledger.quarantined() == []
    assert h.total(o.LEASE_EXTENSIONS) >= 1
    rec = await h.ledger.get(OpKey("send", "charge:order-1"))
    assert rec is not None and rec.state is State.COMPLETED and rec.attempts == 1


async def test_the_default_deadline_still_cuts_a_hung_handler_after_ten_leases() -> None:
    h = Harness()
    starts: list[float] = []

    async def hangs_once(ctx: Context) -> None:
        starts.append(h.clock.now())
        if len(starts) == 1:
            await asyncio.Event().wait()  # never returns: only the deadline ends it
        await h.probe.apply("order-1", None, ctx.idempotency_key)

    retry = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=0.2)
    h.handler(EO, effect=Effect.keyed("payments"), lease=3, retry=retry)(hangs_once)
    await h.publish(order(1))
    h.start()
    await h.drain(seconds=120)
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 1}
    assert len(starts) == 2
    # cut at 10 leases (30 s of fake time), then retried after a short backoff
    assert 3 * DEADLINE_LEASES <= starts[1] - starts[0] < 3 * DEADLINE_LEASES + 5


# ---------------------------------------------------------------- item 9: say it at registration


async def _noop(ctx: Context) -> None:
    return None


def register(caplog: pytest.LogCaptureFixture, **kwargs: object) -> list[str]:
    app = App("t", broker=MemoryBroker(), ledger=MemoryLedger())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="replaysafe.app"):
        app.handler("orders", name="charge", **kwargs)(_noop)  # type: ignore[arg-type]
    return [r.getMessage() for r in caplog.records if r.name == "replaysafe.app"]


def test_a_deadline_shorter_than_the_lease_is_a_warning_at_registration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the handler: 20 s of work, lease 10, a deadline that ends before the first lease
    [msg] = register(caplog, guarantee=EO, effect=Effect.unkeyed("smtp"), lease=10, timeout=8)
    assert "handler 'charge'" in msg and "deadline (8s)" in msg and "lease (10s)" in msg
    assert "quarantined as outcome_unknown, on the first attempt too" in msg
    assert "default 10 leases: 100s" in msg


@pytest.mark.parametrize(
    ("kwargs", "then"),
    [
        ({"guarantee": EO, "effect": Effect.keyed("payments")}, "retried under its key"),
        ({"guarantee": EO, "effect": Effect.unkeyed("smtp", on_unknown="retry")}, "re-run"),
        ({"guarantee": ALO}, "a second effect if the first one happened"),
        ({"guarantee": AMO}, "the operation is lost"),
    ],
)
def test_the_warning_says_what_a_cut_does_to_this_handler(
    caplog: pytest.LogCaptureFixture, kwargs: dict[str, object], then: str
) -> None:
    [msg] = register(caplog, lease=30, timeout=5, **kwargs)
    assert then in msg


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lease": 10},  # the default deadline: 10 leases
        {"lease": 10, "timeout": 10},  # one lease: the keeper's first extension happens before
        {"lease": 3, "timeout": 60},
    ],
)
def test_no_warning_when_the_deadline_is_at_least_the_lease(
    caplog: pytest.LogCaptureFixture, kwargs: dict[str, object]
) -> None:
    assert register(caplog, guarantee=EO, effect=Effect.unkeyed("smtp"), **kwargs) == []


def test_a_deadline_must_be_positive() -> None:
    app = App("t", broker=MemoryBroker(), ledger=MemoryLedger())
    with pytest.raises(ConfigurationError, match=r"timeout must be positive .* not 0; leave it "
                       r"unset for the default of 10 leases \(300s\)"):  # fmt: skip
        app.handler("orders", guarantee=ALO, timeout=0)
