"""Quarantine records and redrive through the ledger: an applied operation is never re-run."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from replaysafe import App, Context, Effect, Envelope, Guarantee, QuarantineReason, RetryPolicy
from replaysafe.brokers import MemoryBroker
from replaysafe.cli import main
from replaysafe.errors import BadInput
from replaysafe.ledger import MemoryLedger, OpKey, State
from replaysafe.ledger.base import Acquired, QuarantineRequest
from replaysafe.quarantine import EffectRisk
from replaysafe.redrive import NOT_REDRIVABLE, redrive

from .runtime_harness import Harness

EO = Guarantee.EFFECTIVELY_ONCE


def order(i: int) -> Envelope:
    return Envelope.of(f"charge:order-{i}", {"order": f"order-{i}", "amount": 5})


def _flaky(h: Harness, broken: dict[str, bool]) -> None:
    async def charge(ctx: Context) -> None:
        if broken["yes"]:
            raise RuntimeError("payments-api 503")
        await h.probe.apply(ctx.payload["order"], None, ctx.idempotency_key)

    h.handler(EO, effect=Effect.keyed("payments"), lease=5,
              retry=RetryPolicy(max_attempts=3, base_delay=0.1))(charge)  # fmt: skip


async def test_poison_redriven_after_the_fix_applies_once() -> None:
    h = Harness()
    broken = {"yes": True}
    _flaky(h, broken)
    await h.publish(order(1), order(2))
    h.start()
    await h.drain()
    entries = await h.ledger.quarantined()
    assert [e.reason for e in entries] == [QuarantineReason.MAX_ATTEMPTS] * 2
    assert entries[0].published_at is not None and entries[0].message_size > 0
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None and rec.state is State.QUARANTINED
    broken["yes"] = False  # the downstream is fixed
    results = await redrive(h.app, entries)
    assert all(r.redriven for r in results)
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 1, "order-2": 1}
    again = await h.ledger.quarantine_entry(entries[0].id)
    assert again is not None and again.redrives == 1 and again.redriven_at is not None


async def test_redrive_of_an_applied_operation_applies_nothing_twice() -> None:
    h = Harness()
    _flaky(h, {"yes": False})
    await h.publish(order(1))
    h.start()
    await h.drain()
    assert h.probe.per_subject() == {"order-1": 1}
    # a stale entry for the same operation (e.g. a copy set aside earlier), then redriven
    rec = await h.ledger.get(OpKey("charge", "charge:order-1"))
    assert rec is not None
    env = order(1)
    entry = await h.ledger.quarantine(QuarantineRequest(
        scope="charge", reason=QuarantineReason.MAX_ATTEMPTS, operation_id=env.operation_id,
        fingerprint=env.fingerprint, message=env.payload, content_type=env.content_type,
        published_at=h.clock.now(),
    ))  # fmt: skip
    [result] = await redrive(h.app, [entry])
    assert result.redriven
    await h.drain()
    await h.stop()
    assert h.probe.per_subject() == {"order-1": 1}  # answered from the ledger as a duplicate
    assert h.total("replaysafe_duplicate_hits_total", cause="completed") == 1


async def test_redrive_refusals() -> None:
    h = Harness(horizon=3600)
    _flaky(h, {"yes": False})
    env = order(1)

    async def put(reason: QuarantineReason, **kw: Any) -> Any:
        fields: dict[str, Any] = {
            "operation_id": env.operation_id, "fingerprint": env.fingerprint,
            "message": env.payload, "content_type": env.content_type,
            "published_at": h.clock.now(),
        }  # fmt: skip
        fields.update(kw)
        return await h.ledger.quarantine(QuarantineRequest(scope="charge", reason=reason, **fields))

    bad = await put(QuarantineReason.MALFORMED_PAYLOAD, operation_id=None, fingerprint=None,
                    message=b"{oops")  # fmt: skip
    conflict = await put(QuarantineReason.KEY_REUSE_CONFLICT)
    redacted = await put(QuarantineReason.MAX_ATTEMPTS, message=b'{"order":"xxxx","amount":5}')
    old = await put(QuarantineReason.OUTCOME_UNKNOWN, published_at=h.clock.now() - 7200)
    results = {r.entry_id: r for r in await redrive(h.app, [bad, conflict, redacted, old])}
    assert not any(r.redriven for r in results.values())
    assert "bad input" in results[bad.id].detail
    assert "refused again" in results[conflict.id].detail
    assert "redacted" in results[redacted.id].detail
    assert "horizon" in results[old.id].detail
    assert h.broker.published("orders") == []
    # forced: the copy beyond the horizon is re-stamped and republished
    [forced] = await redrive(h.app, [old], force=True)
    assert forced.redriven and len(h.broker.published("orders")) == 1


async def test_every_bad_input_reason_is_refused_even_with_an_intact_copy() -> None:
    """Bad input is decided on the bytes (and their transport metadata) alone: the same bytes
    are refused again, so redrive refuses them whatever the entry kept. A malformed transport
    header was missing from the list (#13): nothing of such a message was trusted."""
    reasons = {cls.reason for cls in BadInput.__subclasses__()}
    assert QuarantineReason.MALFORMED_TRANSPORT_HEADER in reasons
    assert reasons <= NOT_REDRIVABLE
    h = Harness()
    _flaky(h, {"yes": False})
    env = order(1)
    entry = await h.ledger.quarantine(QuarantineRequest(
        scope="charge", reason=QuarantineReason.MALFORMED_TRANSPORT_HEADER,
        operation_id=env.operation_id, fingerprint=env.fingerprint, message=env.payload,
        content_type=env.content_type, published_at=h.clock.now(),
    ))  # fmt: skip
    [result] = await redrive(h.app, [entry])
    assert not result.redriven and "refused again" in result.detail
    assert h.broker.published("orders") == []


async def test_redaction_hook_applies_before_the_copy_is_stored() -> None:
    h = Harness()
    h.app.redact = lambda body: body.replace(b"4111111111111111", b"****")

    async def charge(ctx: Context) -> None:
        raise KeyError("unknown card")

    h.handler(EO, effect=Effect.keyed("payments"), lease=5,
              retry=RetryPolicy(give_up_on=(KeyError,)))(charge)  # fmt: skip
    await h.publish(Envelope.of("charge:c1", {"card": "4111111111111111"}))
    h.start()
    await h.drain()
    await h.stop()
    [entry] = await h.ledger.quarantined()
    assert entry.message is not None and b"4111" not in entry.message
    [r] = await redrive(h.app, [entry])
    assert not r.redriven  # a redacted copy is not the message: it cannot be republished


# ---------------------------------------------------------------------- the CLI


@pytest.fixture
def cli_app() -> Iterator[tuple[str, App]]:
    broker, ledger = MemoryBroker(), MemoryLedger()
    app = App("cli", broker=broker, ledger=ledger)

    async def charge(ctx: Context) -> None:
        return None

    app.handler("orders", guarantee=EO, effect=Effect.keyed("payments"))(charge)
    module = types.ModuleType("rs_quarantine_cli_app")
    module.app = app  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    yield f"{module.__name__}:app", app
    del sys.modules[module.__name__]


def _seed(app: App) -> list[str]:
    async def go() -> list[str]:
        ids = []
        for i, reason in enumerate([QuarantineReason.MAX_ATTEMPTS,
                                    QuarantineReason.MALFORMED_PAYLOAD]):  # fmt: skip
            env = order(i)
            out = await app.ledger.claim(
                OpKey("charge", env.operation_id), env.fingerprint, "w", 30
            )
            assert isinstance(out, Acquired)
            entry = await app.ledger.quarantine(QuarantineRequest(
                scope="charge", reason=reason, operation_id=env.operation_id,
                fingerprint=env.fingerprint, message=env.payload, content_type=env.content_type,
                risk=EffectRisk.RELEASED_CLEANLY, attempts=3, published_at=app.clock.now(),
            ), out.claim)  # fmt: skip
            ids.append(entry.id)
        return ids

    return asyncio.run(go())


def test_cli_list_show_redrive_purge(cli_app: tuple[str, App]) -> None:
    target, app = cli_app
    poison, bad = _seed(app)
    runner = CliRunner()
    listed = runner.invoke(main, ["quarantine", "list", target, "--json"])
    assert listed.exit_code == 0, listed.output
    assert {e["id"] for e in json.loads(listed.output)} == {poison, bad}
    shown = runner.invoke(main, ["quarantine", "show", target, poison])
    doc = json.loads(shown.output)
    assert doc["reason"] == "max_attempts" and '"order":"order-0"' in doc["message"]
    table = runner.invoke(main, ["quarantine", "list", target])
    assert poison in table.output
    ok = runner.invoke(main, ["quarantine", "redrive", target, poison])
    assert ok.exit_code == 0 and "redriven" in ok.output
    refused = runner.invoke(
        main, ["quarantine", "redrive", target, "--reason", "malformed_payload"]
    )
    assert refused.exit_code == 1 and "REFUSED" in refused.output
    broker = app.broker
    assert isinstance(broker, MemoryBroker) and len(broker.published("orders")) == 1
    rec = asyncio.run(app.ledger.get(OpKey("charge", "charge:order-0")))
    assert rec is not None and rec.state is State.RELEASED and rec.attempts == 0
    purged = runner.invoke(main, ["quarantine", "purge", target, "--reason", "malformed_payload",
                                  "--yes"])  # fmt: skip
    assert purged.exit_code == 0 and "purged 1" in purged.output
    left = json.loads(runner.invoke(main, ["quarantine", "list", target, "--json"]).output)
    assert [e["id"] for e in left] == [poison] and left[0]["redrives"] == 1
    missing = runner.invoke(main, ["quarantine", "show", target, "nope"])
    assert missing.exit_code != 0 and "no quarantine entries" in missing.output
