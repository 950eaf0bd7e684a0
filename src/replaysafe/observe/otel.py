"""OpenTelemetry spans per boundary (extra ``otel``: opentelemetry-api).

Without the package, or with ``App(tracing=False)``, the runtime gets :data:`NO_TRACING` and pays
one attribute check per span site. Span names (one place):

- ``replaysafe.delivery``: one delivery through the pipeline (DELIVERED → settled), with the
  handler, guarantee, the transport's delivery id and attempt as attributes;
- ``replaysafe.claim``: the ledger claim of a fetched batch;
- ``replaysafe.effect``: the handler (EFFECTED for keyed/unkeyed effects), with the operation id,
  attempt and fencing token: the one span that names the operation. Ids are derived from
  business fields and spans leave the process without the redaction hook; where ids must not
  leave it, build the App with ``tracing=False``;
- ``replaysafe.ledger.complete``: recording the effect in the ledger;
- ``replaysafe.broker.complete``: completion at the broker (COMPLETED);
- ``replaysafe.quarantine``: a quarantine record being written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

DELIVERY = "replaysafe.delivery"
CLAIM = "replaysafe.claim"
EFFECT = "replaysafe.effect"
LEDGER_COMPLETE = "replaysafe.ledger.complete"
BROKER_COMPLETE = "replaysafe.broker.complete"
QUARANTINE = "replaysafe.quarantine"


class Tracing:
    """Starts spans on an OpenTelemetry tracer, or does nothing."""

    def __init__(self, tracer: Any | None) -> None:
        self._tracer = tracer
        #: spans are made (a plain attribute: read several times per message)
        self.enabled: bool = tracer is not None

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Any]:
        if self._tracer is None:
            yield None
            return
        attrs = {f"replaysafe.{k}": v for k, v in attributes.items() if v is not None}
        with self._tracer.start_as_current_span(name, attributes=attrs) as span:
            yield span


NO_TRACING = Tracing(None)


def tracing_for(enabled: bool = True, provider: Any | None = None) -> Tracing:
    """Tracing on ``provider`` (default: the global tracer provider) when opentelemetry-api is
    installed, ``enabled``, and a real provider is configured; otherwise :data:`NO_TRACING`.

    Without a configured SDK the API's proxy provider only makes non-recording spans, which cost
    a third of the pipeline's throughput for nothing, so they are skipped. Workers decide when
    they start, so a provider installed after the App was built is still picked up."""
    if not enabled:
        return NO_TRACING
    try:
        from opentelemetry import trace
    except ImportError:
        return NO_TRACING
    source = provider if provider is not None else trace.get_tracer_provider()
    if isinstance(source, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return NO_TRACING
    return Tracing(source.get_tracer("replaysafe"))
