"""Settle: a verdict applied to the broker, and the outcome counted. The only place the runtime
acks, nacks or quarantines.

:meth:`Settler.settle` takes a :data:`~replaysafe.runtime.policy.Verdict` and moves the copy's
last boundary: COMPLETED for an ack (after the ledger holds the effect: the ambiguity window
closes here), a redelivery for a nack, a durable quarantine entry and then COMPLETED for a
quarantine. Every settled copy is counted once in ``replaysafe_deliveries_total`` by outcome. A
:class:`~replaysafe.guard.Guard` settles through the same code: its "broker" is the outcome it
hands back to the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.envelope import HEADER_OPERATION_ID, Envelope
from replaysafe.errors import BrokerError, LeaseLost, LedgerDataError, LedgerUnavailable
from replaysafe.ledger.base import QuarantineRequest
from replaysafe.observe import otel
from replaysafe.quarantine import Disclosure, disclose, shown_text
from replaysafe.runtime.policy import LEDGER_RETRY_DELAY, Ack, Leave, Nack, Quarantine, Verdict

if TYPE_CHECKING:
    from collections.abc import Callable

    from replaysafe.app import HandlerSpec
    from replaysafe.brokers.base import Delivery
    from replaysafe.clock import Clock
    from replaysafe.failpoints import Failpoints
    from replaysafe.ledger.base import LedgerBackend
    from replaysafe.runtime.sync import OverTwin

log = logging.getLogger("replaysafe.runtime")

#: real seconds the app's redaction hook may take on one quarantined message (see Settler.disclose)
REDACT_TIMEOUT = 5.0


def transport_identity(delivery: Delivery, *, withheld: bool = False) -> str:
    """What the transport says about an undecodable message, stable across its redeliveries
    (broker-added headers such as delivery counts are left out on purpose). ``withheld``: no
    copy of the body is stored (the redaction hook failed), so the entry id, which hashes the
    copy, gets the body's digest here instead: two different bodies stay two entries."""
    raw_op = delivery.headers.get(HEADER_OPERATION_ID, "")
    ctype = delivery.content_type or delivery.headers.get("content-type", "")
    names = ",".join(sorted(k for k in delivery.headers if not k.lower().startswith("x-")))
    digest = hashlib.sha256(names.encode()).hexdigest()
    body = f"\x00{hashlib.sha256(delivery.body).hexdigest()}" if withheld else ""
    return f"{raw_op[:512]}\x00{ctype[:200]}\x00{digest}{body}"


def _bare(request: QuarantineRequest, exc: LedgerDataError) -> QuarantineRequest:
    """``request`` without the bytes and text that came from outside (the message copy and its
    content type), for a ledger that refused its data. The operation id and fingerprint stay:
    ``decode_wire`` validated the one and computed the other. The identity gets the body's digest,
    so two bodies refused alike stay two entries."""
    digest = hashlib.sha256(request.message or b"").hexdigest()
    return replace(
        request,
        message=None,
        content_type=None,
        identity=f"{request.identity}\x00refused:{digest}",
        detail=f"{request.detail[:1500]}; the ledger refused this entry's data "
        f"({type(exc).__name__}), so it is stored without the message copy and content type",
    )


@dataclass(slots=True)
class Settled:
    """What :meth:`Settler.settle` did: the outcome it counted, the nack's delay, the quarantine
    entry it recorded. Differs from the verdict when a quarantine could not be recorded (the copy
    was nacked instead)."""

    outcome: str
    delay: float | None = None
    entry_id: str | None = None


class Settler:
    """Applies verdicts for one driver (a Worker or a Guard) and keeps its ambiguity signals."""

    def __init__(
        self,
        *,
        ledger: LedgerBackend | OverTwin,
        clock: Clock,
        stats: o.Stats,
        tracing: otel.Tracing,
        failpoints: Failpoints,
        redact: Callable[[bytes], bytes] | None,
        inline: bool = False,
    ) -> None:
        self._ledger = ledger
        #: the sync path: the redaction hook runs in the caller's thread (no event loop to spare)
        self._inline = inline
        self._clock = clock
        self._stats = stats
        self._tracing = tracing
        self._failpoints = failpoints
        self._redact = redact
        #: (handler, operation id) -> when its effect was recorded, until the broker completes it
        self._ambiguous: dict[tuple[str, str], float] = {}
        #: metric keys by (metric, handler, outcome), built once (settle runs per message)
        self._keys: dict[tuple[str, str, str | None], tuple[str, o.Labels]] = {}

    def _key(self, name: str, handler: str, outcome: str | None = None) -> tuple[str, o.Labels]:
        key = self._keys.get((name, handler, outcome))
        if key is None:
            labels = {"handler": handler} if outcome is None else {"handler": handler,
                                                                   "outcome": outcome}  # fmt: skip
            key = self._keys[(name, handler, outcome)] = o.Stats.key(name, **labels)
        return key

    def _count(self, handler: str, outcome: str) -> None:
        """Count one delivery of ``handler`` settled as ``outcome`` (``deliveries_total``)."""
        self._stats.add(self._key(o.DELIVERIES, handler, outcome))

    def track(self, handler: str) -> None:
        """Export the open-ambiguity gauges of ``handler``."""
        self._stats.track(o.OPEN_AMBIGUITY, self._open_count(handler), handler=handler)
        self._stats.track(o.OPEN_AMBIGUITY_AGE, self._open_age(handler), handler=handler)

    def _open_count(self, handler: str) -> Callable[[], float]:
        return lambda: float(sum(1 for h, _ in self._ambiguous if h == handler))

    def _open_age(self, handler: str) -> Callable[[], float]:
        def age() -> float:
            times = [t for (h, _), t in self._ambiguous.items() if h == handler]
            return self._clock.now() - min(times) if times else 0.0

        return age

    def shown(self, text: str) -> str:
        """``text`` about a message (it may quote operation ids or payload values) as a log
        line or a stored error may show it: through the app's redaction hook."""
        return shown_text(self._redact, text)

    def point(self, spec: HandlerSpec, env: Envelope | None, attempt: int) -> dict[str, Any]:
        """The context a failpoint sees."""
        return {
            "handler": spec.name,
            "guarantee": spec.guarantee.value,
            "operation_id": env.operation_id if env else None,
            "attempt": attempt,
            "sleep": self._clock.sleep,
        }

    async def hit(self, point: str, spec: HandlerSpec, env: Envelope | None, attempt: int) -> None:
        """Fire failpoint ``point`` (the chaos harness arms them) with its context. The hot path
        calls it only ``if failpoints.armed`` (no coroutine, no context while none is)."""
        await self._failpoints.hit(point, self.point(spec, env, attempt))

    async def settle(
        self,
        spec: HandlerSpec,
        delivery: Delivery,
        env: Envelope | None,
        verdict: Verdict,
    ) -> Settled:
        """Apply ``verdict`` to ``delivery`` at the broker and count the outcome. May raise
        ``SimulatedCrash`` from a failpoint, leaving the copy unsettled, as a dead process would.
        """
        if isinstance(verdict, Ack):
            if verdict.effected:
                assert env is not None
                await self._complete_effected(spec, delivery, env, verdict)
                return Settled(verdict.outcome)
            self._count(spec.name, verdict.outcome)
            await delivery.ack()
        elif isinstance(verdict, Nack):
            self._count(spec.name, verdict.outcome)
            await delivery.nack(delay=verdict.delay)
        elif isinstance(verdict, Quarantine):
            return await self._quarantine(spec, delivery, env, verdict)
        else:
            assert isinstance(verdict, Leave), verdict
            self._count(spec.name, verdict.outcome)
        return Settled(verdict.outcome)

    async def ack_first(self, spec: HandlerSpec, delivery: Delivery, env: Envelope) -> bool:
        """At-most-once: complete at the broker *before* the effect, confirmed, not merely
        requested (a completion still in flight when the process dies brings the message back,
        and the effect would run twice). False when the broker did not confirm it: the effect
        must not run (the pipeline's verdict is then ``Leave(completion_unconfirmed)``)."""
        try:
            await delivery.ack_confirmed()
        except BrokerError as exc:
            log.warning("%s: %s", spec.name, self.shown(
                f"at-most-once: {exc}; the effect of {env.operation_id} is not run (it may come "
                "back, or be lost)"))  # fmt: skip
            return False
        return True

    async def _complete_effected(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, verdict: Ack
    ) -> None:
        """EFFECTED → COMPLETED: the ambiguity window, counted open until the broker completes."""
        effected = self._clock.now()
        key = (spec.name, env.operation_id)
        self._ambiguous[key] = effected
        try:
            if verdict.point is not None and self._failpoints.armed:
                await self.hit(verdict.point, spec, env, verdict.attempt)
            if not self._tracing.enabled:
                await delivery.ack()
            else:
                with self._tracing.span(otel.BROKER_COMPLETE, handler=spec.name):
                    await delivery.ack()
        finally:
            self._ambiguous.pop(key, None)
        window = self._clock.now() - effected
        self._stats.record(self._key(o.AMBIGUITY_WINDOW, spec.name), window)
        self._count(spec.name, verdict.outcome)
        if self._failpoints.armed:
            await self.hit(fp.AFTER_ACK, spec, env, verdict.attempt)

    async def disclose(self, delivery: Delivery, detail: str, op: str | None) -> Disclosure:
        """``quarantine.disclose`` for one message. The app's hook is user code that may be slow
        on a large body: it runs on a thread, and one that takes longer than
        :data:`REDACT_TIMEOUT` counts as a failed hook (nothing of the body is kept), so a slow
        hook can neither stall every other handler on the event loop nor block the
        quarantine."""
        redact = self._redact
        if redact is None or self._inline:
            return disclose(redact, delivery.body, detail, op)
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(disclose, redact, delivery.body, detail, op), REDACT_TIMEOUT
            )
        except TimeoutError:
            return Disclosure(
                None,
                f"(detail withheld: the redaction hook took longer than {REDACT_TIMEOUT:g}s); no "
                "copy of the body was stored",
                None,
                f"TimeoutError (it took longer than {REDACT_TIMEOUT:g}s)",
            )

    async def _quarantine(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope | None, q: Quarantine
    ) -> Settled:
        """Record the quarantine durably, then complete the original at the broker.

        What is written down (the body copy, the detail, the operation id in the log line)
        passes through the app's redaction hook first (``quarantine.disclose``); a hook that
        fails keeps no copy of the body and never stops the quarantine. An entry the ledger
        cannot take (down, our lease gone, its data refused even bare) is not completed: the copy
        comes back."""
        stats = self._stats
        op = env.operation_id if env else None
        shown = await self.disclose(delivery, q.detail, op)
        request = QuarantineRequest(
            scope=spec.scope,
            reason=q.reason,
            operation_id=op,
            fingerprint=env.fingerprint if env else None,
            risk=q.risk,
            attempts=q.attempts,
            detail=shown.detail[:2000],
            message=shown.message,
            # the content type the body was decoded (and fingerprinted) as: redrive checks the
            # copy against the fingerprint with it (a plain client's missing one means JSON)
            content_type=env.content_type if env else delivery.content_type,
            identity="" if env else transport_identity(delivery, withheld=shown.message is None),
            published_at=env.published_at if env else delivery.broker_timestamp,
        )
        ledger = self._ledger
        try:
            with self._tracing.span(otel.QUARANTINE, handler=spec.name, reason=q.reason.value):
                try:
                    entry = await ledger.quarantine(request, q.claim)
                except LedgerDataError as exc:
                    # the ledger is up but refused something of this message: store the entry
                    # without what came from outside rather than nack it forever
                    entry = await ledger.quarantine(_bare(request, exc), q.claim)
        except LedgerDataError as exc:
            # not even the bare entry: a bug, never an outage; the copy waits out a lease
            log.error("%s: the ledger refused quarantine entry %s even without the message's "
                      "data (%s); leaving the copy to redelivery", spec.name,
                      request.entry_id(), self.shown(str(exc)))  # fmt: skip
            self._count(spec.name, o.FAILED)
            await delivery.nack(delay=spec.lease)
            return Settled(o.FAILED, spec.lease)
        except LeaseLost:
            stats.inc(o.LEASE_LOST, handler=spec.name)
            self._count(spec.name, o.LEASE_LOST_OUTCOME)
            await delivery.nack(delay=spec.lease)
            return Settled(o.LEASE_LOST_OUTCOME, spec.lease)
        except LedgerUnavailable:
            stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
            self._count(spec.name, o.UNAVAILABLE)
            await delivery.nack(delay=LEDGER_RETRY_DELAY)
            return Settled(o.UNAVAILABLE, LEDGER_RETRY_DELAY)
        if shown.hook_error is not None:
            log.error(
                "%s: the app's redaction hook raised %s on a message body: quarantine entry %s "
                "keeps no copy of it; fix the hook (App(redact=...))",
                spec.name,
                shown.hook_error,
                entry.id,
            )
        # the entry id is what `replaysafe quarantine show` takes; the transport's delivery id
        # only where no operation id is known (bad input)
        about = f"delivery {delivery.delivery_id}" if op is None else "operation withheld"
        if shown.operation_id is not None:
            about = f"operation {shown.operation_id}"
        log.warning("%s: quarantined entry %s (%s) as %s: %s", spec.name, entry.id, about,
                    q.reason.value, shown.detail)  # fmt: skip
        stats.inc(o.QUARANTINED, handler=spec.name, reason=q.reason.value)
        self._count(spec.name, o.QUARANTINE)
        if self._failpoints.armed:
            await self.hit(fp.AFTER_QUARANTINE_BEFORE_ACK, spec, env, q.attempts)
        await delivery.ack()
        return Settled(o.QUARANTINE, entry_id=entry.id)
