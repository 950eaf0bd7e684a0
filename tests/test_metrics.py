"""The signals of DESIGN §6 move as the faults say, and are exposed in Prometheus format."""

from __future__ import annotations

import asyncio
import re

from replaysafe import Context, Effect, Envelope, Guarantee
from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.observe import TopK
from replaysafe.observe.prometheus import render

from .runtime_harness import Harness

EO = Guarantee.EFFECTIVELY_ONCE


def order(i: int) -> Envelope:
    return Envelope.of(f"charge:order-{i}", {"order": f"order-{i}", "amount": 5})


def _value(text: str, metric: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(metric + "{") and not line.startswith(metric + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{metric} {labels} not in exposition")


async def test_duplicate_hits_and_ambiguity_window_under_injected_redelivery() -> None:
    h = Harness(honour_keys=False)

    async def charge(ctx: Context) -> None:
        await h.probe.apply(ctx.payload["order"], None, ctx.idempotency_key)

    h.handler(EO, effect=Effect.unkeyed("payments"), lease=5)(charge)
    # each effect is recorded, then the worker dies before the broker completes it: redelivery
    h.failpoints.enable(fp.AFTER_LEDGER_BEFORE_ACK, "kill", times=3)
    await h.publish(*(order(i) for i in range(6)))
    h.start()
    await h.drain()
    await h.stop()
    text = render(lambda: [w.stats for w in h.workers])
    assert h.probe.duplicates() == 0
    assert _value(text, "replaysafe_duplicate_hits_total", cause="completed") == 3
    assert _value(text, "replaysafe_redeliveries_total", handler="charge") >= 3
    # windows closed by this copy's own completion; the 3 cut by a crash show up as duplicates
    assert _value(text, "replaysafe_ambiguity_window_seconds_count", handler="charge") == 3
    assert _value(text, "replaysafe_duplicate_age_seconds_count", handler="charge") == 3
    assert _value(text, "replaysafe_deliveries_total", outcome="applied") == 3
    assert _value(text, "replaysafe_deliveries_total", outcome="duplicate") == 3
    assert _value(text, "replaysafe_replay_horizon_seconds") == 7 * 86_400
    # hot keys: counts by rank; the keys themselves (operation ids) never become label values
    # (issue 13 item 16b), they are named in process (Stats.top) and by `inspect --top`
    hot = re.findall(r'replaysafe_redelivered_keys\{.*rank="(\d+)".*\} (\S+)', text)
    assert len(hot) >= 3 and all(float(n) >= 1 for _, n in hot)
    assert "order-" not in text and "key=" not in text
    named = [k for w in h.workers for k, _ in w.stats.top(o.REDELIVERED_KEYS, handler="charge")]
    assert len(named) >= 3 and all(k.startswith("charge:order-") for k in named)


async def test_open_ambiguity_is_visible_while_completion_is_pending() -> None:
    h = Harness()

    async def charge(ctx: Context) -> None:
        await h.probe.apply(ctx.payload["order"], None, ctx.idempotency_key)

    h.handler(EO, effect=Effect.keyed("payments"), lease=30)(charge)
    h.failpoints.enable(fp.AFTER_LEDGER_BEFORE_ACK, "pause")
    await h.publish(order(1))
    h.start()
    await h.run_until(lambda: h.probe.calls == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    h.clock.advance(7)
    text = render(lambda: [w.stats for w in h.workers])
    assert _value(text, "replaysafe_open_ambiguity", handler="charge") == 1
    assert _value(text, "replaysafe_open_ambiguity_oldest_seconds", handler="charge") >= 7
    h.failpoints.resume(fp.AFTER_LEDGER_BEFORE_ACK)
    await h.drain()
    await h.stop()
    text = render(lambda: [w.stats for w in h.workers])
    assert _value(text, "replaysafe_open_ambiguity", handler="charge") == 0
    window = h.workers[0].stats.summary(o.AMBIGUITY_WINDOW)
    assert window.count == 1 and window.max >= 7  # the pause sat inside the window


def test_topk_memory_is_bounded_and_keeps_the_hot_keys() -> None:
    # space-saving keeps every key whose share of the stream exceeds 1/capacity
    top = TopK(capacity=10)
    for i in range(10_000):
        top.add(f"cold-{i}")
        if i % 5 == 0:
            top.add("hot")  # 2,000 of 12,000 = 17% > 10%
    assert len(top.counts) == 10
    assert top.top(1)[0][0] == "hot"


async def test_opentelemetry_spans_per_boundary() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from replaysafe.observe import otel

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    h = Harness()
    h.app.tracer_provider = provider

    async def charge(ctx: Context) -> None:
        await h.probe.apply(ctx.payload["order"], None, ctx.idempotency_key)

    h.handler(EO, effect=Effect.keyed("payments"), lease=30)(charge)
    await h.publish(order(1))
    h.start()
    await h.drain()
    await h.stop()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in (otel.DELIVERY, otel.CLAIM, otel.EFFECT, otel.LEDGER_COMPLETE,
                 otel.BROKER_COMPLETE):  # fmt: skip
        assert name in spans, sorted(spans)
    delivery = spans[otel.DELIVERY]
    assert delivery.attributes["replaysafe.handler"] == "charge"
    # the boundaries nest under the delivery and happen in order
    for name in (otel.EFFECT, otel.LEDGER_COMPLETE, otel.BROKER_COMPLETE):
        assert spans[name].parent.span_id == delivery.context.span_id
    assert spans[otel.EFFECT].end_time <= spans[otel.LEDGER_COMPLETE].start_time
    assert spans[otel.LEDGER_COMPLETE].end_time <= spans[otel.BROKER_COMPLETE].start_time
    assert spans[otel.EFFECT].attributes["replaysafe.operation_id"] == "charge:order-1"


def test_tracing_is_skipped_without_a_configured_provider() -> None:
    from replaysafe.observe.otel import NO_TRACING, tracing_for

    assert tracing_for(False) is NO_TRACING and not NO_TRACING.enabled
    # the API's default proxy provider records nothing: no spans are made at all
    assert tracing_for(True) is NO_TRACING
