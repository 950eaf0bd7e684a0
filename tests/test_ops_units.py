"""The pieces behind `replaysafe run`'s start-up check, readiness and stop report, in process
(issue 13 items 5, 6 and 12); tests/test_cli_ops.py runs the real command."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from replaysafe import App, Context, Effect, Envelope, Guarantee, Worker
from replaysafe.brokers.base import GroupState
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.errors import BrokerUnavailable, ConfigurationError, LedgerUnavailable
from replaysafe.explain import explain
from replaysafe.ledger.base import PROBE_SCOPE, OpKey, State
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.ledger.sqlite import SQLiteLedger
from replaysafe.runtime.health import CutRun, Health, StopReport
from replaysafe.runtime.preflight import preflight, queue_warnings

from .conftest import free_port, unavailable

EO, ALO, AMO = Guarantee.EFFECTIVELY_ONCE, Guarantee.AT_LEAST_ONCE, Guarantee.AT_MOST_ONCE


async def noop(ctx: Context) -> None:
    return None


def shop(broker: Any = None, ledger: Any = None) -> App:
    app = App("shop", broker=broker or MemoryBroker(), ledger=ledger or MemoryLedger())
    app.handler("orders", guarantee=EO, effect=Effect.keyed("payments"), name="capture")(noop)
    app.handler("orders", guarantee=ALO, name="notify")(noop)
    return app


# --------------------------------------------------------------------------- ledger probe


async def test_the_ledger_probe_claims_and_completes_an_operation_of_its_own(
    tmp_path: Path,
) -> None:
    for ledger in (MemoryLedger(), SQLiteLedger(tmp_path / "l.db")):
        await ledger.probe("w1")
        await ledger.probe("w1")  # a second start with the same owner: answered, no error
        rec = await ledger.get(OpKey(PROBE_SCOPE, "startup:w1"))
        assert rec is not None and rec.state is State.COMPLETED
        await ledger.close()


async def test_a_closed_ledger_fails_the_probe(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "l.db")
    await ledger.close()
    with pytest.raises(LedgerUnavailable):
        await ledger.probe("w1")


# --------------------------------------------------------------------------- preflight


async def test_preflight_names_every_handlers_group_and_refuses_a_dead_ledger() -> None:
    broker = MemoryBroker()
    app = shop(broker)
    await broker.publish("orders", [Envelope.of("o:1", {})])
    checked = await preflight(app, [app.handlers["capture"]], "w1")
    assert {n: g.name for n, g in checked.groups.items()} == {
        "capture": "orders/shop.capture", "notify": "orders/shop.notify",
    }  # fmt: skip
    # neither group exists yet: a first subscriber would read the message, nobody is waiting
    assert checked.groups["notify"] == GroupState("orders", "shop.notify", "orders/shop.notify",
                                                  1, 0, False)  # fmt: skip
    assert [w.id for w in checked.warnings] == ["RS122"]  # notify is not run by this worker

    class Down(MemoryLedger):
        async def paused(self) -> Any:
            raise LedgerUnavailable("the ledger is down; check that it runs, then retry")

    class Refused(MemoryBroker):
        async def check(self) -> None:
            raise BrokerUnavailable("cannot connect; check the URL, then retry")

    with pytest.raises(ConfigurationError) as raised:
        await preflight(shop(Refused(), Down()), [], "w1")
    text = str(raised.value)
    assert text.startswith("the ledger is not usable: the ledger is down")
    assert "Also, the broker is not usable: cannot connect" in text
    assert "\n" not in text and "Nothing was consumed" in text


async def test_preflight_gives_up_on_a_ledger_that_does_not_answer() -> None:
    class Hangs(MemoryLedger):
        async def paused(self) -> Any:
            await asyncio.sleep(3600)

    with pytest.raises(ConfigurationError, match=r"did not answer within 0\.2s"):
        await preflight(shop(ledger=Hangs()), [], "w1", within=0.2)


def test_queue_warnings_rs122_and_rs123() -> None:
    app = shop()
    unread = GroupState("orders", "shop.notify", "orders/shop.notify", 4, 0, True)
    busy = GroupState("orders", "shop.capture", "orders/shop.capture", 9, 2, True)
    unknown = GroupState("orders", "shop.capture", "https://sqs/orders", 9, None, True)
    old = GroupState("orders", "shop.charge", "orders/shop.charge", 3, 0, True)
    drained_old = GroupState("orders", "shop.refund", "orders/shop.refund", 0, 0, True)
    # explain judges every handler; a worker leaves out the ones it runs itself
    assert [w.id for w in queue_warnings(app, {"notify": unread, "capture": busy}, [])] == ["RS122"]
    assert queue_warnings(app, {"notify": unread}, [], running={"notify"}) == []
    # consumers unknown (SQS): never a warning
    assert queue_warnings(app, {"capture": unknown}, []) == []
    [w] = queue_warnings(app, {}, [old, drained_old])
    assert w.id == "RS123" and w.handlers == ("capture", "notify")
    assert "orders/shop.charge holds 3 message(s)" in w.message
    assert "group='shop.charge'" in w.message


async def test_memory_broker_group_state_and_strays() -> None:
    broker = MemoryBroker()
    await broker.publish("orders", [Envelope.of(f"o:{i}", {}) for i in range(3)])
    sub = await broker.subscribe("orders", "shop.capture", prefetch=1)
    [d] = await sub.next_batch(1)
    await d.ack()
    old = await broker.subscribe("orders", "shop.charge")
    await old.close()
    assert await broker.group_state("orders", "shop.capture") == GroupState(
        "orders", "shop.capture", "orders/shop.capture", 2, 1, True
    )
    strays = await broker.stray_groups("orders", "shop.")
    assert [(g.group, g.messages, g.consumers) for g in strays] == [
        ("shop.capture", 2, 1), ("shop.charge", 3, 0),
    ]  # fmt: skip
    await sub.close()


async def test_rabbitmq_without_a_management_api_finds_no_strays_and_says_why(
    amqp_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from replaysafe.brokers.rabbitmq import RabbitMQBroker

    closed = RabbitMQBroker(amqp_url, management_url=f"http://127.0.0.1:{free_port()}")
    off = RabbitMQBroker(amqp_url, management_url="")
    try:
        with caplog.at_level("DEBUG", logger="replaysafe.brokers.rabbitmq"):
            assert await closed.stray_groups("orders", "shop.") == []
        assert "management API at http://127.0.0.1:" in caplog.text
        caplog.clear()
        with caplog.at_level("DEBUG", logger="replaysafe.brokers.rabbitmq"):
            assert await off.stray_groups("orders", "shop.") == []
        assert "management API" not in caplog.text  # "" asks nothing (not the default URL)
        assert off.group_name("a/b", "shop.x") == "a%2Fb/shop.x"
    finally:
        await closed.close()
        await off.close()


async def test_explain_names_queues_and_reports_rs122_and_rs123() -> None:
    broker = MemoryBroker()
    await broker.publish("orders", [Envelope.of("o:1", {})])
    old = await broker.subscribe("orders", "shop.charge")  # a renamed handler's group
    await old.close()
    app = shop(broker)
    listener = await broker.subscribe("orders", "shop.capture")  # capture has a consumer
    report = await explain(app)
    by_name = {h.name: h for h in report.handlers}
    capture, notify = by_name["capture"], by_name["notify"]
    assert capture.queue == "orders/shop.capture"
    assert capture.as_json()["queue_state"] == {"messages": 1, "consumers": 1, "exists": True}
    assert (
        "queue: group 'shop.capture' reads orders/shop.capture; now 1 message(s) waiting, "
        "1 consumer(s)." in capture.statement
    )
    assert [f.id for f in capture.findings if f.id.startswith("RS12")] == ["RS123"]
    assert {f.id for f in notify.findings} >= {"RS122", "RS123"}
    assert notify.as_json()["queue"] == "orders/shop.notify"
    await listener.close()


async def test_sqs_names_the_queue_url_and_cannot_count_consumers(sqs_endpoint: str) -> None:
    from replaysafe.brokers.sqs import SQSBroker

    broker = SQSBroker(region="us-east-1", endpoint_url=sqs_endpoint,
                       aws_access_key_id="testing", aws_secret_access_key="testing")  # fmt: skip
    name = f"ops-{uuid.uuid4().hex[:10]}"
    try:
        await broker.prepare_source(name)
        await broker.publish(name, [Envelope.of(f"o:{i}", {}) for i in range(2)])
        await broker.check()
        state = await broker.group_state(name, "shop.capture")
        assert state.name.endswith(f"/{name}") and state.name.startswith("http")
        assert (state.messages, state.consumers, state.unread) == (2, None, False)
        assert broker.group_name(name, "anything") == state.name  # no groups on SQS
        assert await broker.stray_groups(name, "shop.") == []
    finally:
        await broker.drop_source(name)
        await broker.close()


async def test_kafka_members_unknown_when_the_broker_lists_none() -> None:
    """Unit level: Tansu (the test Kafka) answers DescribeConsumerGroups with a STABLE group and
    no members while it is consuming; that must read as unknown, never as 'no consumer'."""
    try:
        from confluent_kafka import ConsumerGroupState
    except ImportError:
        unavailable("Kafka", "confluent-kafka is not installed (pip install 'replaysafe[kafka]')")

    from replaysafe.brokers.kafka import KafkaBroker

    class Future:
        def __init__(self, value: Any) -> None:
            self.value = value

        def result(self, timeout: float) -> Any:
            return self.value

    class Desc:
        def __init__(self, state: Any, members: list[Any]) -> None:
            self.state, self.members = state, members

    described = {
        "stable-empty-list": Desc(ConsumerGroupState.STABLE, []),
        "empty": Desc(ConsumerGroupState.EMPTY, []),
        "two": Desc(ConsumerGroupState.STABLE, [object(), object()]),
    }

    class Admin:
        def describe_consumer_groups(self, groups: list[str], **_: Any) -> dict[str, Any]:
            return {g: Future(described[g]) for g in groups}

    broker = KafkaBroker("127.0.0.1:1")

    async def admin(fn: Any) -> Any:
        return fn(Admin())

    broker._admin = admin  # type: ignore[method-assign]
    assert await broker._members(list(described)) == {
        "stable-empty-list": None, "empty": 0, "two": 2,
    }  # fmt: skip
    assert broker.group_name("t", "g") == "topic 't', group id 'g'"
    await broker.close()


# --------------------------------------------------------------------------- health


async def test_health_reports_each_component_and_times_an_outage() -> None:
    class Flaky(MemoryLedger):
        down = False

        async def paused(self) -> Any:
            if self.down:
                raise LedgerUnavailable("connection refused")
            return await super().paused()

    ledger = Flaky()
    health = Health(shop(ledger=ledger), interval=0.01, max_ledger_outage=0.2)
    assert health.status() == (False, "ledger: not probed yet (starting)\n"
                                      "broker: not probed yet (starting)\n")  # fmt: skip
    await health.probe()
    assert health.status() == (True, "ledger: reachable\nbroker: reachable\n")
    ledger.down = True
    await health.probe()
    ready, body = health.status()
    assert not ready and "ledger: unreachable: connection refused" in body
    assert health.outage() > 0
    ledger.down = False
    await health.probe()
    assert health.ready() and health.outage() == 0
    ledger.down = True
    outage = await asyncio.wait_for(health.watch(), 10)  # returns once past the limit
    assert outage > 0.2


async def test_readiness_waits_for_the_worker_to_resume_after_an_outage() -> None:
    import time
    from types import SimpleNamespace

    worker = SimpleNamespace(ledger_paused=True, ledger_down_since=time.monotonic() - 12)
    health = Health(shop(), worker)  # type: ignore[arg-type]
    await health.probe()  # the ledger answers again, but the worker has not resumed yet
    ready, body = health.status()
    # the outage began 12 s ago; a loaded machine may add a second or more before the probe
    assert not ready
    paused = r"worker: consumption paused for 1[2-9]s until its own ledger probe"
    assert re.search(paused, body), body
    worker.ledger_paused, worker.ledger_down_since = False, None
    assert health.ready()


def test_metrics_server_serves_healthz_readyz_and_metrics() -> None:
    from replaysafe.errors import MissingExtra
    from replaysafe.observe import Stats

    try:
        from replaysafe.observe.prometheus import serve
    except MissingExtra as exc:
        unavailable("prometheus-client", str(exc))

    state = {"ready": False}
    port = free_port()
    httpd = serve(port, lambda: [Stats()], "0.0.0.0",
                  lambda: (state["ready"], "ledger: unreachable\n"))  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
        assert raised.value.code == 503 and raised.value.read() == b"ledger: unreachable\n"
        state["ready"] = True
        with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            assert r.status == 200
    finally:
        httpd.shutdown()
        httpd.server_close()


# --------------------------------------------------------------------------- stopping


def test_stop_report_says_what_becomes_of_each_cut_run() -> None:
    broker, ledger = MemoryBroker(), MemoryLedger()
    app = App("a", broker=broker, ledger=ledger)
    for name, g, eff in [
        ("keyed", EO, Effect.keyed("api")),
        ("mail", EO, Effect.unkeyed("smtp")),
        ("retry", EO, Effect.unkeyed("smtp", on_unknown="retry")),
        ("alo", ALO, None),
        ("amo", AMO, None),
    ]:
        app.handler("s", guarantee=g, effect=eff, name=name, lease=10)(noop)
    assert StopReport().describe(app) == "stopped after draining: nothing was cut"
    cut = [CutRun(n, n not in ("alo", "amo")) for n in ("keyed", "mail", "retry", "alo", "amo")]
    text = StopReport(timed_out=True, cut=cut, batches=5).describe(app)
    assert text.startswith("drain timeout reached; 5 handler run(s) cut: ")
    assert (
        "1 keyed run(s): their claims expire within 10s, then the redelivered copy runs "
        "again (keyed(api): a re-run is harmless)" in text
    )
    assert (
        "1 mail run(s): their claims expire within 10s, then the redelivered copy is "
        "quarantined as outcome_unknown" in text
    )
    assert (
        "1 retry run(s): their claims expire within 10s, then the redelivered copy runs "
        "again" in text
    )
    assert "1 alo run(s): not completed at the broker: redelivered and run again" in text
    assert "1 amo run(s): already completed at the broker, so their effect may be lost" in text
    forced = StopReport(forced=True, cut=[CutRun("keyed", False)], batches=1).describe(app)
    assert forced.startswith("stopped at once (second signal); 1 handler run(s) cut")
    assert "not claimed yet: redelivered and run normally" in forced


async def _slow_app() -> tuple[App, asyncio.Event]:
    broker = MemoryBroker()
    app = App("slow", broker=broker, ledger=MemoryLedger())
    started = asyncio.Event()

    @app.handler("jobs", guarantee=EO, effect=Effect.keyed("api"), lease=30)
    async def work(ctx: Context) -> None:
        started.set()
        await asyncio.sleep(3600)

    await broker.publish("jobs", [Envelope.of("job:1", {})])
    return app, started


async def _stop_now(worker: Any, run: asyncio.Task[Any]) -> None:
    """Clean-up after a test that may have failed half-way: stop the worker at once (a second
    signal) and wait, bounded, for its run task, so that no handler outlives the test."""
    if not run.done():
        worker.stop(now=True)
        await asyncio.wait({run}, timeout=10)
    if not run.done():
        run.cancel()
        await asyncio.wait({run}, timeout=10)


@pytest.mark.parametrize("now", [False, True])
async def test_a_stop_cuts_what_outlives_the_drain_and_reports_it(now: bool) -> None:
    app, started = await _slow_app()
    worker = Worker(app)
    run = asyncio.create_task(worker.run(drain_timeout=0.2 if not now else 3600))
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert worker.in_flight == 1
        worker.stop()
        if now:
            await asyncio.sleep(0.05)
            assert not run.done()  # the drain waits for the hour-long handler ...
            worker.stop(now=True)  # ... until a second signal
        await asyncio.wait_for(run, 10)
    finally:
        await _stop_now(worker, run)
    report = worker.stop_report
    assert report is not None and report.cut == [CutRun("work", True)]
    assert report.forced is now and report.timed_out is not now
    assert worker.in_flight == 0


async def test_a_drained_stop_reports_nothing_cut() -> None:
    """A stop while a handler runs: the drain lets it finish (well within the timeout), the
    effect is applied, and the report says nothing was cut."""
    from replaysafe import observe as o

    broker = MemoryBroker()
    app = App("quick", broker=broker, ledger=MemoryLedger())
    started, release = asyncio.Event(), asyncio.Event()

    @app.handler("jobs", guarantee=EO, effect=Effect.keyed("api"))
    async def work(ctx: Context) -> None:
        started.set()
        await release.wait()

    await broker.publish("jobs", [Envelope.of("job:1", {})])
    worker = Worker(app)
    run = asyncio.create_task(worker.run(drain_timeout=30))
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert worker.in_flight == 1  # something the stop could cut
        worker.stop()
        release.set()
        await asyncio.wait_for(run, 10)
    finally:
        release.set()
        await _stop_now(worker, run)
    report = worker.stop_report
    assert report is not None and report.drained, report
    assert (report.cut, report.batches, report.timed_out, report.forced) == ([], 0, False, False)
    assert worker.stats.total(o.DELIVERIES, outcome=o.APPLIED) == 1
    assert worker.in_flight == 0


# ------------------------------------------------------------- closing what a command opened

_CLI_APP = """
from replaysafe import App, Context, Effect, Guarantee
from replaysafe.brokers import MemoryBroker
from replaysafe.ledger import SQLiteLedger

app = App("cliapp", broker=MemoryBroker(), ledger=SQLiteLedger({path!r}))


@app.handler("orders", guarantee=Guarantee.EFFECTIVELY_ONCE, effect=Effect.keyed("api"))
async def charge(ctx: Context) -> None:
    return None
"""


def test_commands_in_one_process_never_meet_an_app_a_previous_command_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command closes the app it imported; the next command in the same process (CliRunner, a
    notebook) imports it anew instead of finding the closed one in ``sys.modules`` (which made
    `quarantine list` fail with "is closed" and `explain` report RS111, durability unknown). An
    app imported by the caller before the command is the caller's: left open."""
    import importlib
    import sys

    from click.testing import CliRunner

    from replaysafe.cli import main

    module = f"cli_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(_CLI_APP.format(path=str(tmp_path / "l.db")))
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    try:
        for _ in range(2):
            listed = runner.invoke(main, ["quarantine", "list", f"{module}:app", "--json"])
            assert listed.exit_code == 0, listed.output
            explained = runner.invoke(main, ["explain", f"{module}:app", "--json"])
            assert explained.exit_code == 0, explained.output
            [h] = json.loads(explained.output)["handlers"]
            assert "RS111" not in {f["id"] for f in h["findings"]}, h["findings"]
        mine = importlib.import_module(module).app  # imported by the caller: not the command's
        assert runner.invoke(main, ["quarantine", "list", f"{module}:app"]).exit_code == 0
        assert asyncio.run(mine.ledger.quarantined()) == []  # still open
        assert importlib.import_module(module).app is mine
        asyncio.run(mine.ledger.close())
    finally:
        sys.modules.pop(module, None)


_SYNC_APP = """
from replaysafe import App, Guarantee
from replaysafe.brokers import MemoryBroker
from replaysafe.ledger import MemoryLedger

app = App("syncapp", broker=MemoryBroker(), ledger=MemoryLedger())


@app.handler("orders", guarantee=Guarantee.AT_LEAST_ONCE)
async def charge(ctx):
    return None


@app.handler("orders", guarantee=Guarantee.AT_LEAST_ONCE)
async def charge(ctx):  # registered twice: refused at import
    return None
"""


@pytest.mark.parametrize("command", ["run", "explain", "inspect"])
def test_an_app_refused_at_import_is_one_paragraph_not_a_traceback(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ConfigurationError raised while the app's module is imported (here App.handler refusing
    a handler name registered twice) is the CLI's one-paragraph error with status 1, like every
    other refused start, not an uncaught exception."""
    import sys

    from click.testing import CliRunner

    from replaysafe.cli import main

    module = f"sync_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(_SYNC_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        result = CliRunner().invoke(main, [command, f"{module}:app"])
    finally:
        sys.modules.pop(module, None)
    assert isinstance(result.exception, SystemExit), result.exception  # not the raw error
    assert result.exit_code == 1
    assert f"Error: {module}:app: handler 'charge'" in result.output
    assert "is registered twice; name one" in result.output
