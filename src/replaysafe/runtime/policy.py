"""Verdicts and the pure decisions that produce them: no I/O, no clock reads, no metrics.

A pipeline (``runtime.pipeline``) asks these functions what a situation means and gets a
:data:`Verdict` back; ``runtime.settle`` is the one place that applies a verdict to the broker.
Keeping the decisions here means each one is tested without a broker or a ledger, the way
``ledger.base.decide_claim`` is, and the Worker and the :class:`~replaysafe.guard.Guard` decide
alike because they call the same functions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from replaysafe import observe as o
from replaysafe.errors import OutcomeUnknown
from replaysafe.guarantees import Guarantee
from replaysafe.ledger.base import (
    AlreadyDone,
    Claim,
    ClaimOutcome,
    Conflict,
    InFlight,
    Quarantined,
)
from replaysafe.quarantine import EffectRisk, QuarantineReason

if TYPE_CHECKING:
    from replaysafe.app import HandlerSpec

#: results larger than this are not stored in the ledger (the effect still counts as done)
MAX_RESULT_BYTES = 16 * 1024
#: delay before retrying when the ledger is unavailable (no effect without a confirmed claim)
LEDGER_RETRY_DELAY = 1.0
#: added to an in-flight copy's remaining lease, so it comes back just after the lease ends
IN_FLIGHT_MARGIN = 0.05


@dataclass(slots=True)
class Ack:
    """Complete the copy at the broker (boundary COMPLETED).

    ``outcome`` is the ``replaysafe_deliveries_total`` label. ``effected``: the effect is recorded
    (ledger EFFECTED, or done under at-least-once), so the ack closes the ambiguity window, and
    ``point`` is the failpoint hit just before it. ``result`` is what the caller gets back: the
    handler's result, or the stored one for a duplicate."""

    outcome: str
    effected: bool = False
    point: str | None = None
    result: Any = None
    #: the attempt that made the effect (what the failpoints around the ack see)
    attempt: int = 0


@dataclass(slots=True)
class Nack:
    """Give the copy back for redelivery after ``delay`` seconds (where the broker can wait)."""

    delay: float
    outcome: str


@dataclass(slots=True)
class Quarantine:
    """Record a quarantine entry durably, then complete the copy at the broker. ``claim`` (when
    held) is ended in the same ledger call; ``attempts`` and ``risk`` go into the entry."""

    reason: QuarantineReason
    detail: str
    risk: EffectRisk = EffectRisk.NEVER_CLAIMED
    attempts: int = 0
    claim: Claim | None = None


@dataclass(slots=True)
class Leave:
    """Tell the broker nothing: the copy is settled already (at-most-once completes before its
    effect). ``outcome`` is still counted."""

    outcome: str
    result: Any = None


Verdict = Ack | Nack | Quarantine | Leave
# The verdicts are built per message and never changed after: plain slotted dataclasses (a frozen
# one's __init__ costs twice as much on the hot path).


class Cut(Exception):
    """The handler's deadline was cut: timeout, or the lease could not be extended."""

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(why)


def marks_start(spec: HandlerSpec) -> bool:
    """Whether the handler's claims record when its effect starts (``Ledger.mark_started``): an
    unkeyed effect under effectively-once that quarantines unknown outcomes, whose recovered
    claim is re-run only when the previous attempt provably never started. Nowhere else: a keyed
    or transactional effect re-runs anyway, at-least-once keeps no claim."""
    eff = spec.effect
    return (
        spec.guarantee is Guarantee.EFFECTIVELY_ONCE
        and eff.kind == "unkeyed"
        and eff.on_unknown == "quarantine"
    )


def evidence(exc: BaseException) -> str:
    """``exc`` as quarantine evidence: its type (qualified unless built in) and message."""
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ != "builtins":
        name = f"{cls.__module__}.{name}"
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not lose the quarantine
        text = "<its message could not be read>"
    return f"{name}: {text}" if text else name


#: encode_result's encoder, built once (json.dumps builds one per call for these options)
_RESULTS = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def encode_result(value: Any) -> str | None:
    """The handler's result as stored in the ledger, or None when it is not stored (None, too
    large, or it cannot be encoded). Never raises: the effect is done when this runs, and a result
    that cannot be stored must not turn into a failed attempt (a retry would run the effect
    again)."""
    if value is None:
        return None
    try:
        text = _RESULTS.encode(value)
    except Exception:  # TypeError, ValueError, a __str__ that raises, RecursionError
        return None
    return text if len(text.encode()) <= MAX_RESULT_BYTES else None


def decode_result(text: str | None) -> Any:
    """A stored result (``encode_result``'s text) as the value a duplicate answers with."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:  # written by something else: hand back the text as stored
        return text


def horizon(
    published_at: float | None, now: float, horizon: float, max_skew: float, attempt: int
) -> Quarantine | None:
    """Quarantine for a copy that cannot be proven new: published before ``now - horizon`` (the
    ledger may have forgotten it) or more than ``max_skew`` seconds in the future (a producer
    clock that far ahead would let an old operation look new). None: go on to the claim."""
    if published_at is None:
        return None
    if now - published_at > horizon:
        return Quarantine(
            QuarantineReason.BEYOND_HORIZON,
            f"published {now - published_at:.0f}s ago, beyond the replay horizon of "
            f"{horizon:.0f}s: the ledger may have forgotten it, so it cannot be proven new",
            attempts=attempt,
        )
    if published_at - now > max_skew:
        return Quarantine(
            QuarantineReason.FUTURE_TIMESTAMP,
            f"published {published_at - now:.0f}s in the future, beyond the allowed clock skew of "
            f"{max_skew:.0f}s: fix the producer's clock",
            attempts=attempt,
        )
    return None


def claim_refused(outcome: ClaimOutcome, ledger_now: float, operation_id: str,
                  fingerprint: str, attempt: int) -> Verdict:  # fmt: skip
    """The verdict for a claim that was not acquired: a duplicate of a completed operation is
    completed and answered with the stored result; one in flight elsewhere comes back just after
    that lease ends; a key reused with another payload is quarantined; an operation already
    quarantined is completed."""
    if isinstance(outcome, AlreadyDone):
        return Ack(o.DUPLICATE, result=decode_result(outcome.record.result))
    if isinstance(outcome, InFlight):
        remaining = (outcome.record.lease_until or ledger_now) - ledger_now
        return Nack(max(remaining, 0.0) + IN_FLIGHT_MARGIN, o.IN_FLIGHT)
    if isinstance(outcome, Conflict):
        return Quarantine(
            QuarantineReason.KEY_REUSE_CONFLICT,
            f"operation {operation_id} was first seen with payload "
            f"{outcome.record.fingerprint}, this copy has {fingerprint}",
            attempts=attempt,
        )
    assert isinstance(outcome, Quarantined), outcome
    return Ack(o.QUARANTINE)


def acquired(spec: HandlerSpec, claim: Claim) -> Quarantine | None:
    """Before running an acquired claim: quarantine when the retry budget is spent, or when a
    recovered claim's previous holder may have started an effect that cannot deduplicate. None:
    run the handler."""
    # a recovered claim whose previous holder may have started its effect (an unkeyed
    # effect's claim knows when it never did: mark_started was not recorded)
    unknown = claim.recovered and claim.previous_started
    if claim.attempt > spec.retry.max_attempts:
        return Quarantine(
            QuarantineReason.MAX_ATTEMPTS,
            f"claimed {claim.attempt} times, budget {spec.retry.max_attempts}",
            claim=claim,
            attempts=claim.attempt,
            risk=EffectRisk.OUTCOME_UNKNOWN if unknown else EffectRisk.RELEASED_CLEANLY,
        )
    if unknown and spec.effect.kind == "unkeyed" and spec.effect.on_unknown == "quarantine":
        return Quarantine(
            QuarantineReason.OUTCOME_UNKNOWN,
            f"attempt {claim.attempt - 1} on {spec.effect.name} (which cannot deduplicate) lost "
            "its lease without completing after its effect was marked started (or before marks "
            "were recorded); its effect may or may not have happened",
            claim=claim,
            attempts=claim.attempt,
            risk=EffectRisk.OUTCOME_UNKNOWN,
        )
    return None


def delivery_budget(spec: HandlerSpec, attempt: int) -> Quarantine | None:
    """At-least-once keeps no ledger count: the broker's delivery count is the budget."""
    if attempt > spec.retry.max_attempts:
        return Quarantine(
            QuarantineReason.MAX_ATTEMPTS,
            f"delivered {attempt} times, budget {spec.retry.max_attempts}",
            attempts=attempt,
            risk=EffectRisk.OUTCOME_UNKNOWN,
        )
    return None


@dataclass(frozen=True, slots=True)
class Failure:
    """What a failed attempt means: the verdict, whether the claim is released first (a clean
    retry), and which signals it raises."""

    verdict: Verdict
    #: release the claim (its ``last_error`` is the failure) before the nack
    release: bool
    #: the failure reads as an unknown outcome (``replaysafe_outcome_unknown_total``)
    unknown: bool
    #: the retry budget is spent (``replaysafe_retry_budget_exhausted_total``)
    exhausted: bool


def failure(
    spec: HandlerSpec,
    exc: Exception,
    *,
    claim: Claim | None,
    attempt: int,
    elapsed: float | None,
    rng: random.Random,
) -> Failure:
    """The verdict for a handler attempt that raised ``exc`` (``claim``: the ledger claim held;
    ``elapsed``: seconds since the operation's first publish, when known).

    An effect that may have happened on a downstream that cannot deduplicate is quarantined as
    ``outcome_unknown`` rather than retried into a second effect; a non-retryable error or a spent
    budget is quarantined; anything else is retried with the policy's backoff."""
    cut = isinstance(exc, Cut)
    claimed = claim is not None
    # the handler itself says its effect may have happened (a timeout after sending); under
    # effectively-once an unkeyed effect's failure reads the same unless the handler proves
    # the effect did not happen (EffectNotApplied, the effect's not_applied_on): a plain
    # exception after the request left must not be retried into a second effect
    told = isinstance(exc, OutcomeUnknown) or (
        claimed and spec.effect.kind == "unkeyed" and not cut and not spec.effect.not_applied(exc)
    )
    # a handler cut at its deadline (or when an extension failed) was cancelled wherever it
    # was, possibly after its request left: its effect may have happened too
    risk = EffectRisk.OUTCOME_UNKNOWN if told or cut else EffectRisk.RELEASED_CLEANLY
    if claimed and (cut or told) and not spec.effect.reruns_when_unknown:
        q = Quarantine(
            QuarantineReason.OUTCOME_UNKNOWN,
            f"attempt {attempt} failed with {evidence(exc)}; the effect on {spec.effect.name} may "
            "have happened (an unkeyed effect is retried only after EffectNotApplied or an "
            "exception its not_applied_on lists)",
            claim=claim,
            attempts=attempt,
            risk=EffectRisk.OUTCOME_UNKNOWN,
        )
        return Failure(q, release=False, unknown=told, exhausted=False)
    if not cut and not spec.retry.retryable(exc):
        q = Quarantine(QuarantineReason.NON_RETRYABLE_ERROR, repr(exc), risk, attempt, claim)
        return Failure(q, release=False, unknown=told, exhausted=False)
    limit = spec.retry.max_elapsed
    out_of_time = limit is not None and elapsed is not None and elapsed >= limit
    if attempt >= spec.retry.max_attempts or out_of_time:
        budget = (
            f"{elapsed:.0f}s since the first publish, budget {limit:.0f}s"
            if out_of_time and elapsed is not None and limit is not None
            else f"budget {spec.retry.max_attempts} attempts"
        )
        q = Quarantine(
            QuarantineReason.MAX_ATTEMPTS,
            f"attempt {attempt} failed ({budget}): {exc!r}",
            risk,
            attempt,
            claim,
        )
        return Failure(q, release=False, unknown=told, exhausted=True)
    retry = Nack(spec.retry.delay(attempt, rng), o.RETRIED)
    return Failure(retry, release=claimed, unknown=told, exhausted=False)
