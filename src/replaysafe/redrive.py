"""Redrive: put quarantined messages back on their source, through the ledger.

A DLQ redrive re-applies whatever it is given; this one does not. Each entry is first prepared in
the ledger (``Ledger.redrive``: a quarantined operation is released with a fresh retry budget, a
completed one stays completed), then its stored copy is republished with the SAME operation id and
publish time. The consumer's normal pipeline decides: a completed operation is answered as a
duplicate (never re-run), a released one runs once.

Refused unless ``force``: entries whose bytes would be refused again (bad input, key-reuse
conflicts), copies that were capped or redacted (they are not the original message), and
operations older than the replay horizon (the ledger may have forgotten them, so they cannot be
proven new). ``force`` on an operation beyond the horizon re-stamps its publish time: the operator
accepts that it may apply twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from replaysafe.app import App
from replaysafe.envelope import JSON, Envelope, payload_fingerprint
from replaysafe.errors import BadInput
from replaysafe.ledger.base import QuarantineEntry
from replaysafe.quarantine import QuarantineReason, shown_text

log = logging.getLogger("replaysafe.redrive")

#: reasons whose messages are refused again as they are: redriving the same bytes cannot help
#: (every bad-input reason; a malformed transport header: nothing of that message was trusted)
NOT_REDRIVABLE = frozenset({
    QuarantineReason.INVALID_OPERATION_ID, QuarantineReason.OPERATION_ID_MISMATCH,
    QuarantineReason.PAYLOAD_TOO_LARGE,
    QuarantineReason.MALFORMED_PAYLOAD, QuarantineReason.UNSUPPORTED_CONTENT_TYPE,
    QuarantineReason.LIMIT_EXCEEDED, QuarantineReason.FINGERPRINT_MISMATCH,
    QuarantineReason.MALFORMED_HEADER, QuarantineReason.MALFORMED_TRANSPORT_HEADER,
    QuarantineReason.KEY_REUSE_CONFLICT,
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class RedriveResult:
    entry_id: str
    operation_id: str | None
    redriven: bool
    detail: str


def _refusal(app: App, entry: QuarantineEntry, force: bool) -> str | None:
    if entry.scope not in app.handlers:
        return f"no handler {entry.scope!r} in this app: it cannot say where to publish the copy"
    if entry.operation_id is None or entry.fingerprint is None:
        return "the entry has no decodable message (bad input): fix the producer and resend"
    if entry.message is None:
        return "no copy of the message was kept (the redaction hook failed): resend it"
    if entry.truncated:
        return f"only the first {len(entry.message)} of {entry.message_size} bytes were kept"
    try:
        # the runtime's own fingerprint of the copy: a body that came without a content type was
        # decoded (and fingerprinted) as JSON, the wire format's default
        body_fp = payload_fingerprint(entry.message, entry.content_type)
    except BadInput:
        body_fp = None
    if body_fp != entry.fingerprint:
        return "the stored copy differs from the original (redacted?): it cannot be republished"
    if force:
        return None
    if entry.reason in NOT_REDRIVABLE:
        return f"{entry.reason.value}: the same message would be refused again (--force to try)"
    now = app.clock.now()
    born = entry.published_at if entry.published_at is not None else entry.created_at
    if now - born > app.horizon:
        return (
            f"published {now - born:.0f}s ago, beyond the replay horizon of {app.horizon:.0f}s: "
            "the ledger may have forgotten it (--force re-stamps it and accepts a re-apply)"
        )
    return None


def _logged(app: App, operation_id: str | None) -> str | None:
    """The operation id as a log line may show it: through the app's redaction hook (the id is
    derived from business fields), withheld when the hook fails on it."""
    return None if operation_id is None else shown_text(app.redact, operation_id)


async def redrive(
    app: App, entries: list[QuarantineEntry], *, force: bool = False
) -> list[RedriveResult]:
    """Redrive ``entries`` of ``app`` (see the module docstring); every attempt is logged."""
    results: list[RedriveResult] = []
    for entry in entries:
        why = _refusal(app, entry, force)
        if why is not None:
            op = _logged(app, entry.operation_id)
            log.warning("redrive refused for %s (%s): %s", entry.id, op, why)
            results.append(RedriveResult(entry.id, entry.operation_id, False, why))
            continue
        assert entry.operation_id and entry.fingerprint and entry.message is not None
        spec = app.handlers[entry.scope]
        now = app.clock.now()
        published_at = entry.published_at
        stale = published_at is None or now - published_at > app.horizon
        if force and stale:
            published_at = now
        await app.ledger.redrive(entry.id)
        env = Envelope(
            entry.operation_id, entry.message, None, entry.fingerprint,
            entry.content_type or JSON, None, {}, published_at,
        )  # fmt: skip
        await app.broker.publish(spec.source, [env])
        log.warning("redrove %s (%s, %s) to %s%s", entry.id, _logged(app, entry.operation_id),
                    entry.reason.value, spec.source, " (forced)" if force else "")  # fmt: skip
        results.append(
            RedriveResult(entry.id, entry.operation_id, True, f"published to {spec.source}")
        )
    return results
