"""`replaysafe explain MODULE:GUARD` (issue 14, item 5): a Guard is stated through the same code
path as a handler (its spec, its ledger), with no broker known and the ack the caller's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from replaysafe import App, Context, Effect, Guarantee, Guard
from replaysafe.brokers import MemoryBroker
from replaysafe.cli import main
from replaysafe.explain import explain, explain_guard
from replaysafe.ledger import SQLiteLedger

EO, ALO, AMO = Guarantee.EFFECTIVELY_ONCE, Guarantee.AT_LEAST_ONCE, Guarantee.AT_MOST_ONCE


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("GUARDS_APP_DIR", str(tmp_path))  # the charge guard's ledger file
    return CliRunner()


def test_text_states_the_guard_with_the_callers_ack(cli: CliRunner) -> None:
    out = cli.invoke(main, ["explain", "tests.apps.guards:charge", "--strict"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())  # rich wraps lines at the terminal width
    assert text.startswith("guard charge (effectively-once) — replay stops hurting at: psp")
    assert "broker: none that the guard knows" in text
    assert "completion: yours." in text
    assert "The guard does not own the ack, so its timing is part of this guarantee" in text
    assert "INFO RS124" in text
    # no broker was asked: no queue line, no retention finding of a handler's kind
    assert "queue:" not in text and "RS117" not in text


def test_json_has_the_same_shape_as_a_handler(cli: CliRunner) -> None:
    out = cli.invoke(main, ["explain", "tests.apps.guards:charge", "--json", "--p99",
                            "charge=45"])  # fmt: skip
    assert out.exit_code == 0, out.output
    [h] = json.loads(out.output)["handlers"]
    assert h["kind"] == "guard" and h["name"] == "charge"
    assert h["guarantee"] == "effectively-once" and h["boundary"] == "psp"
    assert h["queue"] is None and h["queue_state"] is None
    heads = [line.split(":", 1)[0] for line in h["statement"]]
    assert heads == ["broker", "identity", "effect", "completion", "verdict", "may still happen"]
    assert "synchronous=FULL" in h["statement"][1]  # the ledger was asked, as for a handler
    # the p99 (45 s) is longer than the 30 s lease: RS109, a handler's option finding
    assert [f["id"] for f in h["findings"]] == ["RS109", "RS124"]


def test_strict_fails_on_a_guards_errors(cli: CliRunner) -> None:
    out = cli.invoke(main, ["explain", "tests.apps.guards:emails", "--strict", "--json"])
    assert out.exit_code == 1, out.output
    [h] = json.loads(out.output)["handlers"]
    errors = {f["id"] for f in h["findings"] if f["severity"] == "error"}
    assert errors == {"RS103", "RS110"}
    assert h["boundary"] is None


def test_at_least_once_guard_says_an_early_ack_is_at_most_once(cli: CliRunner) -> None:
    out = cli.invoke(main, ["explain", "tests.apps.guards:notify", "--json"])
    assert out.exit_code == 0, out.output
    [h] = json.loads(out.output)["handlers"]
    [completion] = [s for s in h["statement"] if s.startswith("completion:")]
    assert "makes it at-most-once" in completion


def test_an_attribute_that_is_neither_app_nor_guard_is_a_usage_error(cli: CliRunner) -> None:
    out = cli.invoke(main, ["explain", "tests.apps.guards:not_a_guard"])
    assert out.exit_code == 2
    assert "is int, not a replaysafe App or Guard" in out.output
    # the commands that need an app's broker still refuse a guard
    inspect = cli.invoke(main, ["inspect", "tests.apps.guards:notify", "o1"])
    assert inspect.exit_code == 2 and "is Guard, not a replaysafe App" in inspect.output


async def _noop(ctx: Context) -> None:
    return None


@pytest.mark.parametrize(
    ("guarantee", "effect"),
    [
        (EO, Effect.keyed("psp")),
        (EO, Effect.unkeyed("smtp")),
        (EO, Effect.transactional()),
        (ALO, None),
        (AMO, Effect.keyed("psp")),
    ],
)
async def test_one_code_path_a_guard_says_what_the_same_handler_says(
    tmp_path: Path, guarantee: Guarantee, effect: Effect | None
) -> None:
    """Identity, effect, verdict and the option findings are the handler's, word for word; only
    the broker line, the completion line and the broker-fact findings differ."""
    ledger = SQLiteLedger(tmp_path / "l.db")
    options: dict[str, Any] = {"guarantee": guarantee, "effect": effect, "lease": 20.0,
                               "timeout": 10.0}  # fmt: skip
    app = App("t", broker=MemoryBroker(), ledger=ledger, horizon=3 * 86_400.0)
    app.handler("pay", name="pay", **options)(_noop)  # a guard's source is its name
    guard = Guard(ledger, name="pay", horizon=3 * 86_400.0, **options)
    [h] = (await explain(app)).handlers
    [g] = (await explain_guard(guard)).handlers
    await ledger.close()

    def same(lines: list[str]) -> list[str]:
        return [s for s in lines if s.split(":", 1)[0] in ("identity", "effect", "verdict",
                                                              "may still happen")]  # fmt: skip

    assert same(g.statement) == same(h.statement) and len(same(g.statement)) == 4
    assert g.boundary == h.boundary
    broker_facts = {"RS106", "RS107", "RS108", "RS112", "RS113", "RS115", "RS116", "RS117",
                    "RS122", "RS123"}  # fmt: skip
    assert {f.id for f in g.findings} - {"RS124"} == {f.id for f in h.findings} - broker_facts
    assert g.statement[0].startswith("broker: none")
    assert sum(s.startswith("completion: yours.") for s in g.statement) == 1
