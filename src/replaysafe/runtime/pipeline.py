"""The fixed pipeline, one function per guarantee, each returning a verdict (DESIGN §2).

- AT_MOST_ONCE (:meth:`Pipeline.at_most_once`): complete at the broker (confirmed) → handler.
  Errors are counted, never retried.
- AT_LEAST_ONCE (:meth:`Pipeline.at_least_once`): handler → complete. Error → retry budget →
  nack(delay) or quarantine.
- EFFECTIVELY_ONCE: decode + fingerprint → horizon → claim (:meth:`Pipeline.claim`, one
  ``claim_many`` per batch) → :meth:`Pipeline.after_claim`: AlreadyDone: complete (duplicate
  hit) · InFlight: nack with delay >= remaining lease · Conflict: quarantine key_reuse_conflict ·
  Quarantined: complete · Acquired: handler (lease and visibility extended while it runs) →
  ledger complete (or ``complete_in`` the handler's transaction) → complete at the broker.

The functions decide and record in the ledger; they never ack or nack (``runtime.settle`` does,
from the verdict) except at-most-once's completion *before* its effect, which is that guarantee's
definition and goes through ``Settler.ack_first``. The decisions themselves are the pure functions
of ``runtime.policy``. A driver (the Worker, a Guard) fetches, calls these, and settles.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from replaysafe import failpoints as fp
from replaysafe import observe as o
from replaysafe.app import Context
from replaysafe.envelope import Envelope, decode_wire
from replaysafe.errors import (
    BadInput,
    LeaseLost,
    LedgerDataError,
    LedgerUnavailable,
    OutcomeUnknown,
)
from replaysafe.guarantees import Guarantee
from replaysafe.ledger.base import (
    Acquired,
    AlreadyDone,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    InFlight,
    OpKey,
    TransactionalLedger,
)
from replaysafe.observe import otel
from replaysafe.quarantine import QuarantineReason
from replaysafe.runtime import policy
from replaysafe.runtime.batch import Coalescer
from replaysafe.runtime.middleware import NotAwaitable, handler_call
from replaysafe.runtime.policy import (
    LEDGER_RETRY_DELAY,
    Ack,
    Leave,
    Nack,
    Quarantine,
    Verdict,
    encode_result,
    marks_start,
)

if TYPE_CHECKING:
    from replaysafe.app import HandlerFn, HandlerSpec
    from replaysafe.brokers.base import Delivery
    from replaysafe.clock import Clock
    from replaysafe.failpoints import Failpoints
    from replaysafe.ledger.base import Ledger
    from replaysafe.runtime.keeper import Keeper
    from replaysafe.runtime.settle import Settler
    from replaysafe.runtime.sync import OverTwin, SyncKeeper

log = logging.getLogger("replaysafe.runtime")


class Pipeline:
    """The pipelines of one driver's handlers, sharing its ledger, keeper and coalescers."""

    def __init__(
        self,
        *,
        ledger: Ledger | OverTwin,
        clock: Clock,
        stats: o.Stats,
        tracing: otel.Tracing,
        failpoints: Failpoints,
        settler: Settler,
        keeper: Keeper | SyncKeeper,
        owner: str,
        horizon: float,
        max_clock_skew: float,
        can_extend: Callable[[HandlerSpec, Delivery], bool],
        on_ledger_down: Callable[[], None],
        sleep: Callable[[float], Awaitable[None]] | None = None,
        coalescer: Callable[..., Any] = Coalescer,
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.stats = stats
        self.tracing = tracing
        self.failpoints = failpoints
        self.settler = settler
        self.keeper = keeper
        self.owner = owner
        self.horizon = horizon
        self.max_clock_skew = max_clock_skew
        self._can_extend = can_extend
        self._ledger_down = on_ledger_down
        self._rng = random.Random()
        self._fns: dict[str, HandlerFn] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: waits between retries of a completion (the sync path blocks its thread instead)
        self._sleep = sleep or clock.sleep
        self.completer = coalescer(ledger.complete_many)
        #: unkeyed effects: "about to start" marks, one mark_started per batch of handlers
        self.starter = coalescer(ledger.mark_started, drop_cancelled=True)

    # ------------------------------------------------------------------ set-up

    def prepare(self, specs: Sequence[HandlerSpec]) -> None:
        """Build each handler's call once (``middleware.handler_call``). A plain ``def`` handler
        runs on this pipeline's thread pool, sized to the sync handlers' concurrency."""
        sync = sum(s.concurrency for s in specs if s.sync)
        if sync and self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=sync, thread_name_prefix="replaysafe-handler"
            )
        for spec in specs:
            self._fns[spec.name] = handler_call(spec, self.stats, self.clock, self.tracing,
                                                self._pool)  # fmt: skip

    def close(self) -> None:
        """Release the thread pool; sync handlers still running (cut) finish on their own."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ decode

    def decode(self, spec: HandlerSpec, delivery: Delivery) -> Envelope | Quarantine:
        """The delivery as an envelope (fingerprinted where the ledger compares it), or the
        quarantine of a copy that cannot be decoded (bad input is never retried)."""
        try:
            return decode_wire(
                delivery.body,
                delivery.headers,
                content_type=delivery.content_type,
                key=delivery.key,
                broker_timestamp=delivery.broker_timestamp,
                key_extractor=spec.key,
                limits=spec.limits,
                check_fingerprint=spec.guarantee is Guarantee.EFFECTIVELY_ONCE,
            )
        except BadInput as bad:
            return Quarantine(bad.reason, str(bad), attempts=delivery.attempt)

    def delivered(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, now: float, ages: list[float]
    ) -> None:
        """Signals at DELIVERED: redeliveries by key, and the copy's age against the horizon
        (collected into ``ages``: the batch records them at once)."""
        if env.published_at is not None:
            ages.append(max(now - env.published_at, 0.0))
        if delivery.attempt > 1 or delivery.redelivered:
            self.stats.inc(o.REDELIVERIES, handler=spec.name)
            self.stats.hit(o.REDELIVERED_KEYS, env.operation_id, handler=spec.name)

    # ------------------------------------------------------------------ at-most / at-least-once

    async def _run(self, spec: HandlerSpec, ctx: Context, claim: Claim | None) -> Any:
        extend = spec.extend_visibility and self._can_extend(spec, ctx.delivery)
        return await self.keeper.execute(spec, self._fns[spec.name], ctx, claim,
                                         extend_visibility=extend)  # fmt: skip

    async def at_most_once(self, spec: HandlerSpec, delivery: Delivery, env: Envelope) -> Verdict:
        """Complete first (confirmed), then run: an error is counted, never retried."""
        attempt = delivery.attempt
        if not await self.settler.ack_first(spec, delivery, env):
            return Leave(o.UNCONFIRMED)
        if self.failpoints.armed:
            await self.settler.hit(fp.AFTER_ACK, spec, env, attempt)
        if self.failpoints.armed:
            await self.settler.hit(fp.BEFORE_EFFECT, spec, env, attempt)
        try:
            result = await self._run(
                spec, Context(env, delivery, spec.name, delivery.attempt), None
            )
        except Exception as exc:  # completed already: counted, never retried
            log.warning("%s: %s", spec.name, self.settler.shown(
                f"at-most-once handler failed on {env.operation_id}: {exc!r} (not retried)"
            ))  # fmt: skip
            self.stats.inc(o.HANDLER_ERRORS, handler=spec.name)
            if isinstance(exc, OutcomeUnknown):
                self.stats.inc(o.OUTCOME_UNKNOWN, handler=spec.name)
            return Leave(o.FAILED)
        if self.failpoints.armed:
            await self.settler.hit(fp.AFTER_EFFECT_BEFORE_LEDGER, spec, env, attempt)
        return Leave(o.APPLIED, result)

    async def at_least_once(self, spec: HandlerSpec, delivery: Delivery, env: Envelope) -> Verdict:
        """Run, then complete; a failure is retried within the broker's delivery count."""
        attempt = delivery.attempt
        spent = policy.delivery_budget(spec, attempt)
        if spent is not None:
            self.stats.inc(o.RETRY_BUDGET_EXHAUSTED, handler=spec.name)
            return spent
        if self.failpoints.armed:
            await self.settler.hit(fp.BEFORE_EFFECT, spec, env, attempt)
        result: Any = None
        try:
            result = await self._run(spec, Context(env, delivery, spec.name, attempt), None)
        except NotAwaitable as exc:
            # the body ran as a plain function: the effect is done, so complete it (a nack
            # would run it again because of our own failure to await it)
            log.warning("%s: %s", spec.name,
                        self.settler.shown(f"{exc}; completing {env.operation_id}"))  # fmt: skip
            self.stats.inc(o.HANDLER_ERRORS, handler=spec.name)
        except Exception as exc:
            return await self.failed(spec, env, None, attempt, exc)
        # no ledger: the effect is done when the handler returns; the broker completes after
        return Ack(o.APPLIED, True, fp.AFTER_EFFECT_BEFORE_LEDGER, result, attempt)

    # ------------------------------------------------------------------ effectively-once

    async def claim(
        self, spec: HandlerSpec, decoded: Sequence[tuple[Delivery, Envelope]]
    ) -> list[ClaimOutcome | Verdict]:
        """Horizon check, then one ``claim_many`` for the whole batch: per copy, its claim's
        outcome (for :meth:`after_claim`) or a verdict already (beyond the horizon, refused,
        ledger unavailable)."""
        now = self.clock.now()
        out: list[ClaimOutcome | Verdict | None] = []
        fresh: list[tuple[int, Delivery, Envelope]] = []
        horizon, skew = self.horizon, self.max_clock_skew
        for delivery, env in decoded:
            q = (
                None
                if env.published_at is None
                else policy.horizon(env.published_at, now, horizon, skew, delivery.attempt)
            )
            if q is None:
                fresh.append((len(out), delivery, env))
            out.append(q)
        if not fresh:
            return [v for v in out if v is not None]
        marks = marks_start(spec)
        envs = [env for _, _, env in fresh]
        outcomes: Sequence[ClaimOutcome | Verdict]
        try:
            if not self.tracing.enabled:
                outcomes = await self._claim(spec, envs, marks)
            else:
                with self.tracing.span(otel.CLAIM, handler=spec.name, batch=len(envs)):
                    outcomes = await self._claim(spec, envs, marks)
        except LedgerDataError as exc:
            if len(fresh) > 1:
                # one copy's data was refused: claim each alone, so the others still run
                outcomes = [(await self.claim(spec, [(d, e)]))[0] for _, d, e in fresh]
            else:
                env = fresh[0][2]
                outcomes = [Quarantine(
                    QuarantineReason.INVALID_OPERATION_ID,
                    f"the ledger refused to claim operation {env.operation_id!r} ({exc}); nothing "
                    "ran. Fix what the producer sends as the operation id and resend",
                    attempts=fresh[0][1].attempt,
                )]  # fmt: skip
        except LedgerUnavailable as exc:
            # no effect without a confirmed claim: give the messages back and try later
            log.warning("%s: ledger unavailable (%s); nacking %d deliveries", spec.name, exc,
                        len(fresh))  # fmt: skip
            self.stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
            self._ledger_down()
            outcomes = [Nack(LEDGER_RETRY_DELAY, o.UNAVAILABLE)] * len(fresh)
        if len(out) == len(fresh):  # none beyond the horizon: the outcomes in order
            return list(outcomes)
        for (i, _, _), outcome in zip(fresh, outcomes, strict=True):
            out[i] = outcome
        return [v for v in out if v is not None]

    async def _claim(
        self, spec: HandlerSpec, envs: list[Envelope], marks: bool
    ) -> list[ClaimOutcome]:
        scope, owner, lease = spec.scope, self.owner, spec.lease
        if len(envs) == 1 and not marks:  # claim() does not carry marks_start
            env = envs[0]
            return [await self.ledger.claim(OpKey(scope, env.operation_id), env.fingerprint,
                                            owner, lease)]  # fmt: skip
        return await self.ledger.claim_many([
            ClaimRequest(OpKey(scope, env.operation_id), env.fingerprint, owner, lease, marks)
            for env in envs
        ])  # fmt: skip

    async def after_claim(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, outcome: ClaimOutcome | Verdict
    ) -> Verdict:
        """The verdict for one claimed copy: run the handler when the claim was acquired."""
        if isinstance(outcome, Acquired):
            return await self._acquired(spec, delivery, env, outcome.claim)
        if isinstance(outcome, Ack | Nack | Quarantine | Leave):
            return outcome
        if isinstance(outcome, AlreadyDone):
            self.stats.inc(o.DUPLICATE_HITS, handler=spec.name, cause="completed")
            if outcome.record.completed_at is not None:
                age = self.ledger.now() - outcome.record.completed_at
                self.stats.observe(o.DUPLICATE_AGE, max(age, 0.0), handler=spec.name)
        elif isinstance(outcome, InFlight):
            self.stats.inc(o.DUPLICATE_HITS, handler=spec.name, cause="in_flight")
            self.stats.inc(o.OVERLAPS_PREVENTED, handler=spec.name)
        return policy.claim_refused(outcome, self.ledger.now(), env.operation_id,
                                    env.fingerprint, delivery.attempt)  # fmt: skip

    async def _acquired(
        self, spec: HandlerSpec, delivery: Delivery, env: Envelope, claim: Claim
    ) -> Verdict:
        """Claim ACQUIRED: budget and outcome-unknown checks, then the effect."""
        if self.failpoints.armed:
            await self.settler.hit(fp.AFTER_CLAIM, spec, env, claim.attempt)
        refused = policy.acquired(spec, claim)
        if refused is not None:
            if refused.reason is QuarantineReason.MAX_ATTEMPTS:
                self.stats.inc(o.RETRY_BUDGET_EXHAUSTED, handler=spec.name)
            return refused
        if claim.recovered and not claim.previous_started:
            log.info("%s: %s", spec.name, self.settler.shown(
                f"the previous attempt on {env.operation_id} never started its effect; running "
                "it again"))  # fmt: skip
        hctx = Context(
            env,
            delivery,
            spec.name,
            claim.attempt,
            idempotency_key=env.operation_id if spec.effect.kind == "keyed" else None,
            token=claim.token,
        )
        if self.failpoints.armed:
            await self.settler.hit(fp.BEFORE_EFFECT, spec, env, claim.attempt)
        try:
            return await self._effect(spec, env, claim, hctx)
        except LeaseLost as exc:
            # someone else owns the operation now: never complete this copy at the broker
            log.warning("%s: %s", spec.name, self.settler.shown(str(exc)))
            self.stats.inc(o.LEASE_LOST, handler=spec.name)
            return Nack(spec.lease, o.LEASE_LOST_OUTCOME)
        except LedgerUnavailable as exc:
            # the effect may be done but the ledger cannot record it: never ack, never release.
            # The redelivery meets our lease (InFlight), then a recovered claim: a keyed or
            # transactional effect re-runs safely, an unkeyed one is quarantined outcome_unknown.
            log.warning("%s: %s", spec.name, self.settler.shown(
                f"ledger unavailable after the effect of {env.operation_id}: {exc}"))  # fmt: skip
            self.stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
            self._ledger_down()
            return Nack(spec.lease, o.UNAVAILABLE)

    async def _effect(
        self, spec: HandlerSpec, env: Envelope, claim: Claim, hctx: Context
    ) -> Verdict:
        """The handler and the ledger completion (EFFECTED). Raises ``LeaseLost`` /
        ``LedgerUnavailable`` for the caller to turn into a nack past the lease."""
        ledger = self.ledger
        if claim.lease_until <= ledger.now():
            # before any transaction opens: a SQLite transaction holds the ledger's only
            # connection, and an extension from inside it would wait for itself
            claim = await self._revalidate(spec, claim)
        if marks_start(spec) and not await self._mark_started(spec, env, claim):
            return Nack(spec.lease, o.UNAVAILABLE)
        if spec.effect.kind == "transactional":
            # a TransactionalLedger, or the sync path's adapter over a transactional twin
            assert ledger.transactional, ledger
            ledger = cast("TransactionalLedger", ledger)
            try:
                async with ledger.transaction() as tx:
                    hctx.tx = tx
                    result = await self._run(spec, hctx, claim)
                    if self.failpoints.armed:
                        await self.settler.hit(
                            fp.AFTER_EFFECT_BEFORE_LEDGER, spec, env, claim.attempt
                        )
                    with self.tracing.span(otel.LEDGER_COMPLETE, handler=spec.name):
                        await ledger.complete_in(tx, claim, encode_result(result))
            except (LeaseLost, LedgerUnavailable):
                raise
            except Exception as exc:  # rolled back: no effect, safe to retry
                return await self.failed(spec, env, claim, claim.attempt, exc)
        else:
            try:
                result = await self._run(spec, hctx, claim)
            except LeaseLost:
                raise
            except Exception as exc:
                return await self.failed(spec, env, claim, claim.attempt, exc)
            if self.failpoints.armed:
                await self.settler.hit(fp.AFTER_EFFECT_BEFORE_LEDGER, spec, env, claim.attempt)
            try:
                if not self.tracing.enabled:
                    await self._complete(claim, encode_result(result))
                else:
                    with self.tracing.span(otel.LEDGER_COMPLETE, handler=spec.name):
                        await self._complete(claim, encode_result(result))
            except (LeaseLost, LedgerUnavailable):
                raise
            except Exception:
                # our own failure after the effect (a ledger bug, a tracing hook): as when the
                # ledger is down, never release (a retry would run the effect again) and never
                # ack; the lease runs out and a recovered claim decides (a keyed effect re-runs
                # under its key, an unkeyed one is quarantined)
                log.exception("%s: %s", spec.name, self.settler.shown(
                    f"recording the effect of {env.operation_id} failed; leaving it to its "
                    "lease"))  # fmt: skip
                return Nack(spec.lease, o.FAILED)
        return Ack(o.APPLIED, True, fp.AFTER_LEDGER_BEFORE_ACK, result, claim.attempt)

    async def _mark_started(self, spec: HandlerSpec, env: Envelope, claim: Claim) -> bool:
        """Record that the effect is about to start (unkeyed effects), in the coalesced
        ``mark_started`` of the handlers starting now: one ledger round trip per batch. True when
        the effect may start. A stale claim raises ``LeaseLost``; a ledger that cannot record it
        means the effect does not start: the copy is nacked past the lease, and the recovered
        claim learns that it never started."""
        try:
            marked = await self.starter.submit(claim)
        except LedgerUnavailable as exc:
            log.warning("%s: %s", spec.name, self.settler.shown(
                f"ledger unavailable before the effect of {env.operation_id}: {exc}; the effect "
                "was not started"))  # fmt: skip
            self.stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
            self._ledger_down()
            return False
        if isinstance(marked, LeaseLost):
            raise marked
        return True

    async def _complete(self, claim: Claim, result: str | None) -> None:
        """Record EFFECTED through the coalescing ``complete_many``; retry a briefly unavailable
        ledger a few times (the keeper keeps the lease alive meanwhile) before giving up."""
        delay = 0.2
        for attempt in range(4):
            try:
                done = await self.completer.submit((claim, result))
            except LedgerUnavailable:
                if attempt == 3:
                    raise
                await self._sleep(delay)
                delay *= 2
                continue
            if isinstance(done, LeaseLost):
                raise done
            return

    async def _revalidate(self, spec: HandlerSpec, claim: Claim) -> Claim:
        """The lease ran out between the claim and the handler (the worker stalled: GC, SIGSTOP,
        an overloaded host, or a slow ledger). Never start an effect on a lease that may be
        gone: extend it first. The extension succeeds only while the claim's fencing token is
        still current (nobody took the operation over meanwhile); otherwise ``LeaseLost``, and
        the copy is left to the broker. A stall *during* the effect cannot be caught here: that
        is what the fencing token (``Context.token``) and the idempotency key are for."""
        try:
            return await self.ledger.extend(claim, spec.lease)
        except LedgerUnavailable as exc:
            raise LeaseLost(
                f"the lease on {claim.key.operation_id} expired before its handler started and "
                f"the ledger could not confirm it ({exc}); the effect was not started"
            ) from exc

    # ------------------------------------------------------------------ failure

    async def failed(
        self, spec: HandlerSpec, env: Envelope, claim: Claim | None, attempt: int, exc: Exception
    ) -> Verdict:
        """A failed attempt: the policy's verdict; a clean retry releases the claim first."""
        self.stats.inc(o.HANDLER_ERRORS, handler=spec.name)
        elapsed = self.clock.now() - env.published_at if env.published_at is not None else None
        f = policy.failure(spec, exc, claim=claim, attempt=attempt, elapsed=elapsed, rng=self._rng)
        if f.unknown:
            self.stats.inc(o.OUTCOME_UNKNOWN, handler=spec.name)
        if f.exhausted:
            self.stats.inc(o.RETRY_BUDGET_EXHAUSTED, handler=spec.name)
        if f.release and claim is not None:
            try:
                # stored as the record's last_error: what the redaction hook strips stays out
                await self.ledger.release(claim, self.settler.shown(repr(exc))[:1000])
            except LeaseLost:
                self.stats.inc(o.LEASE_LOST, handler=spec.name)
            except LedgerUnavailable:
                # not released: the lease runs out instead, then a recovered claim retries
                self.stats.inc(o.LEDGER_UNAVAILABLE, handler=spec.name)
                self._ledger_down()
        if isinstance(f.verdict, Nack):
            self.stats.inc(o.RETRIES, handler=spec.name)
        return f.verdict
