"""`replaysafe explain`: the right verdict and findings for a table of configurations, each finding
both triggered and not triggered."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any

import pytest
from click.testing import CliRunner

from replaysafe import App, Context, Effect, Guarantee, RetryPolicy
from replaysafe.brokers import MemoryBroker
from replaysafe.brokers.base import Capabilities, RedeliveryKind, SettleGranularity, SourceFacts
from replaysafe.cli import main
from replaysafe.explain import explain, explain_handler
from replaysafe.ledger import MemoryLedger
from replaysafe.ledger.base import Durability, DurabilityLevel

EO, ALO, AMO = Guarantee.EFFECTIVELY_ONCE, Guarantee.AT_LEAST_ONCE, Guarantee.AT_MOST_ONCE
DAY = 86_400.0

NACK = Capabilities(RedeliveryKind.NACK, SettleGranularity.MESSAGE, False, False, True)
SQS = Capabilities(RedeliveryKind.VISIBILITY_TIMEOUT, SettleGranularity.MESSAGE, True, False, True)
SQS_NO_EXTEND = replace(SQS, extend_visibility=False)
KAFKA = Capabilities(
    RedeliveryKind.OFFSET_REWIND, SettleGranularity.CUMULATIVE_OFFSET, False, True, False
)
DURABLE = Durability("sqlite:x.db", True, "synchronous=FULL", "fsynced")
# built the way a backend of the first version built it: durable=False alone means not durable
FORGETFUL = Durability("redis://h", False, "appendonly=no", "a restart forgets every claim")
LOSSY = Durability.of(
    DurabilityLevel.LOSES_RECENT, "redis://h", "appendfsync=everysec", "may lose 1 s of claims"
)
UNKNOWN = Durability("custom", None, "unknown", "?")
BOUNDED = SourceFacts(broker="rabbitmq", retention=3 * DAY)


async def _noop(ctx: Context) -> None:
    return None


def _spec(guarantee: Guarantee, **kw: Any) -> Any:
    app = App("t", broker=MemoryBroker(), ledger=MemoryLedger(), horizon=kw.pop("horizon", 7 * DAY))
    effect = kw.pop("effect", Effect.keyed("payments") if guarantee is EO else None)
    app.handler("orders", guarantee=guarantee, effect=effect, **kw)(_noop)
    return app, app.handlers["_noop"]


def run(guarantee: Guarantee, *, caps: Capabilities = NACK, facts: SourceFacts = BOUNDED,
        durability: Durability = DURABLE, p99: float | None = None, **kw: Any) -> Any:  # fmt: skip
    app, spec = _spec(guarantee, **kw)
    return explain_handler(app, spec, caps, facts, durability, p99)


def ids(stmt: Any) -> set[str]:
    return {f.id for f in stmt.findings}


# (case, configuration, finding expected, finding id)
CASES: list[tuple[str, dict[str, Any], bool, str]] = [
    ("amo with keyed effect", {"guarantee": AMO, "effect": Effect.keyed("p")}, True, "RS101"),
    ("amo with unkeyed effect", {"guarantee": AMO}, False, "RS101"),
    ("eo unkeyed quarantines", {"guarantee": EO, "effect": Effect.unkeyed("smtp")}, True, "RS102"),
    ("eo keyed", {"guarantee": EO}, False, "RS102"),
    ("eo unkeyed retry", {"guarantee": EO, "effect": Effect.unkeyed("smtp", on_unknown="retry")},
     True, "RS103"),
    ("eo unkeyed quarantine is not retry",
     {"guarantee": EO, "effect": Effect.unkeyed("smtp")}, False, "RS103"),
    ("key from a fresh uuid", {"guarantee": EO, "key": lambda p: str(uuid.uuid4()),
                               "example": {"id": 1}}, True, "RS104"),
    ("key from business fields", {"guarantee": EO, "key": lambda p: ("o", p["id"]),
                                  "example": {"id": 1}}, False, "RS104"),
    ("no key extractor", {"guarantee": EO}, True, "RS105"),
    ("key extractor", {"guarantee": EO, "key": lambda p: p["id"]}, False, "RS105"),
    ("broker keeps longer than horizon",
     {"guarantee": EO, "facts": SourceFacts("kafka", retention=14 * DAY)}, True, "RS106"),
    ("broker keeps shorter than horizon", {"guarantee": EO}, False, "RS106"),
    ("dlq outlives horizon",
     {"guarantee": EO, "facts": SourceFacts("sqs", retention=4 * DAY, dead_letter="dlq",
                                            dead_letter_retention=14 * DAY)}, True, "RS107"),
    ("redrive window outlives horizon",
     {"guarantee": EO, "facts": SourceFacts("sqs", retention=4 * DAY, redrive_window=30 * DAY)},
     True, "RS107"),
    ("dlq within horizon",
     {"guarantee": EO, "facts": SourceFacts("sqs", retention=4 * DAY, dead_letter="dlq",
                                            dead_letter_retention=5 * DAY)}, False, "RS107"),
    ("deadline beyond unextendable visibility",
     {"guarantee": ALO, "caps": SQS_NO_EXTEND, "timeout": 60,
      "facts": SourceFacts("sqs", retention=DAY, visibility_timeout=30)}, True, "RS108"),
    ("observed p99 beyond unextendable visibility",
     {"guarantee": ALO, "caps": SQS_NO_EXTEND, "p99": 45,
      "facts": SourceFacts("sqs", retention=DAY, visibility_timeout=30)}, True, "RS108"),
    ("visibility extended by the runtime",
     {"guarantee": ALO, "caps": SQS, "timeout": 60,
      "facts": SourceFacts("sqs", retention=DAY, visibility_timeout=30)}, False, "RS108"),
    ("p99 beyond lease", {"guarantee": EO, "lease": 10, "p99": 15}, True, "RS109"),
    ("p99 within lease", {"guarantee": EO, "lease": 30, "p99": 15}, False, "RS109"),
    ("ledger cannot back the claim", {"guarantee": EO, "durability": FORGETFUL}, True, "RS110"),
    ("ledger fsyncs", {"guarantee": EO}, False, "RS110"),
    ("ledger loses recent claims is no error", {"guarantee": EO, "durability": LOSSY}, False,
     "RS110"),
    ("ledger durability unknown", {"guarantee": EO, "durability": UNKNOWN}, True, "RS111"),
    ("ledger durability known", {"guarantee": EO}, False, "RS111"),
    ("delivery limit without dlx",
     {"guarantee": ALO, "facts": SourceFacts("rabbitmq", retention=DAY, delivery_limit=20)},
     True, "RS112"),
    ("delivery limit with dlx",
     {"guarantee": ALO, "facts": SourceFacts("rabbitmq", retention=DAY, delivery_limit=20,
                                             dead_letter="orders.dlx")}, False, "RS112"),
    ("kafka auto-commit",
     {"guarantee": ALO, "caps": KAFKA, "facts": SourceFacts("kafka", retention=DAY,
                                                            auto_commit=True)}, True, "RS113"),
    ("kafka manual commit",
     {"guarantee": ALO, "caps": KAFKA, "facts": SourceFacts("kafka", retention=DAY,
                                                            auto_commit=False)}, False, "RS113"),
    ("retry budget outlives horizon",
     {"guarantee": EO, "horizon": 3600.0, "facts": SourceFacts("rabbitmq", retention=600),
      "retry": RetryPolicy(max_attempts=100, max_delay=600)}, True, "RS114"),
    ("retry budget within horizon", {"guarantee": EO}, False, "RS114"),
    ("no broker timestamps",
     {"guarantee": EO, "facts": SourceFacts("x", retention=DAY, broker_timestamps=False)},
     True, "RS115"),
    ("broker timestamps", {"guarantee": EO}, False, "RS115"),
    ("delivery limit below retry budget",
     {"guarantee": EO, "retry": RetryPolicy(max_attempts=5),
      "facts": SourceFacts("rabbitmq", retention=DAY, delivery_limit=3, dead_letter="d")},
     True, "RS116"),
    ("delivery limit above retry budget",
     {"guarantee": EO, "facts": SourceFacts("rabbitmq", retention=DAY, delivery_limit=20,
                                            dead_letter="d")}, False, "RS116"),
    ("unknown retention", {"guarantee": EO, "facts": SourceFacts("memory")}, True, "RS117"),
    ("known retention", {"guarantee": EO}, False, "RS117"),
    ("ledger loses recent claims", {"guarantee": EO, "durability": LOSSY}, True, "RS118"),
    ("ledger fsyncs every claim", {"guarantee": EO}, False, "RS118"),
    ("forgetful ledger is an error, not a warning", {"guarantee": EO, "durability": FORGETFUL},
     False, "RS118"),
    ("at-least-once claims nothing", {"guarantee": ALO, "durability": LOSSY}, False, "RS118"),
    ("eo unkeyed: which failures retry", {"guarantee": EO, "effect": Effect.unkeyed("smtp")},
     True, "RS119"),
    ("alo unkeyed: which failures retry", {"guarantee": ALO}, True, "RS119"),
    ("eo keyed retries every failure", {"guarantee": EO}, False, "RS119"),
    ("amo never retries", {"guarantee": AMO}, False, "RS119"),
    ("deadline shorter than the lease", {"guarantee": EO, "lease": 10, "timeout": 8}, True,
     "RS120"),
    ("default deadline", {"guarantee": EO, "lease": 10}, False, "RS120"),
    ("deadline equal to the lease", {"guarantee": ALO, "lease": 10, "timeout": 10}, False,
     "RS120"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "config", "expected", "finding"), CASES, ids=[c[0] for c in CASES]
)
def test_finding_table(name: str, config: dict[str, Any], expected: bool, finding: str) -> None:
    config = dict(config)
    g = config.pop("guarantee")
    stmt = run(g, **config)
    assert (finding in ids(stmt)) is expected, (name, stmt.findings)


def test_every_finding_id_is_covered_both_ways() -> None:
    triggered = {c[3] for c in CASES if c[2]}
    untriggered = {c[3] for c in CASES if not c[2]}
    assert triggered == untriggered == {f"RS{n}" for n in range(101, 121)}


def test_the_unkeyed_failure_rule_in_force_is_stated() -> None:
    """RS119 says which handler failures an unkeyed effect retries (issue 13, item 10)."""

    def rule(guarantee: Guarantee, effect: Effect | None = None) -> str:
        [finding] = [f for f in run(guarantee, effect=effect).findings if f.id == "RS119"]
        assert finding.severity == "info"
        return finding.message

    eo = rule(EO, Effect.unkeyed("smtp", not_applied_on=(ConnectionRefusedError,)))
    assert "(EffectNotApplied, ConnectionRefusedError)" in eo
    assert "quarantined as outcome_unknown" in eo and "never re-run" in eo
    assert "at-least-once at smtp" in rule(EO, Effect.unkeyed("smtp", on_unknown="retry"))
    assert "every handler failure is retried" in rule(ALO)


@pytest.mark.parametrize(
    ("config", "boundary"),
    [
        ({"guarantee": EO}, "payments"),
        ({"guarantee": EO, "effect": Effect.unkeyed("smtp")}, "the ledger claim (sqlite:x.db)"),
        ({"guarantee": EO, "effect": Effect.unkeyed("smtp", on_unknown="retry")}, None),
        ({"guarantee": ALO}, None),
        ({"guarantee": AMO}, "broker completion (before the effect)"),
    ],
)
def test_verdict_names_the_boundary(config: dict[str, Any], boundary: str | None) -> None:
    config = dict(config)
    stmt = run(config.pop("guarantee"), **config)
    assert stmt.boundary == boundary
    assert any(line.startswith("verdict:") for line in stmt.statement)
    assert any(line.startswith("may still happen:") for line in stmt.statement)


async def test_transactional_boundary_is_the_commit(tmp_path: Any) -> None:
    from replaysafe.ledger import SQLiteLedger

    app = App("t", broker=MemoryBroker(), ledger=SQLiteLedger(tmp_path / "l.db"))
    app.handler("orders", guarantee=EO, effect=Effect.transactional())(_noop)
    report = await explain(app)
    [h] = report.handlers
    assert h.boundary == f"the ledger transaction's commit (sqlite:{tmp_path / 'l.db'})"
    assert "RS110" not in ids(h)


def test_durability_levels_and_the_durable_flag_agree() -> None:
    assert [FORGETFUL.level, UNKNOWN.level, DURABLE.level] == [
        DurabilityLevel.NOT_DURABLE,
        DurabilityLevel.UNKNOWN,
        DurabilityLevel.DURABLE,
    ]
    assert LOSSY.durable is False  # a reader of the first version sees "may not survive"
    with pytest.raises(ValueError, match="durable=False"):
        Durability("x", True, "s", "d", DurabilityLevel.LOSES_RECENT)


async def test_memory_ledger_cannot_back_effectively_once() -> None:
    app, _ = _spec(EO)
    [h] = (await explain(app)).handlers
    assert "RS110" in ids(h)


def test_cli_json_and_strict() -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["explain", "replaysafe.examples.payments:app", "--json", "--strict"])
    assert ok.exit_code == 0, ok.output
    doc = json.loads(ok.output)
    [h] = doc["handlers"]
    assert set(h) == {
        "name",
        "kind",
        "guarantee",
        "queue",
        "queue_state",
        "boundary",
        "statement",
        "findings",
    }
    assert h["boundary"] == "payments-api" and h["guarantee"] == "effectively-once"
    assert h["kind"] == "handler"
    # an at-least-once handler passes --strict (no error), the verdict says replay hurts
    alo = runner.invoke(main, ["explain", "replaysafe.examples.payments:at_least_once", "--json"])
    assert json.loads(alo.output)["handlers"][0]["boundary"] is None
    bad = runner.invoke(main, ["explain", "tests.apps.explain_bad:app", "--strict"])
    assert bad.exit_code == 1, bad.output
    assert "RS103" in bad.output
