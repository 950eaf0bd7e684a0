"""The guarantee statement: per handler, boundary by boundary, where replay stops hurting.

``explain(app)`` reads the app's configuration and what the broker and ledger can say about
themselves (:meth:`Broker.describe`, :meth:`Ledger.durability`), optionally the handlers' observed
latency, and returns for each handler:

- a statement, one line per boundary: what the broker promises (PUBLISHED/DELIVERED), when and
  where the operation identity is recorded, whether the downstream refuses a second apply
  (EFFECTED), when the broker is told (COMPLETED), the verdict naming the boundary where replay
  stops hurting, and what can still happen twice or be lost;
- findings with stable ids and severities (``error`` fails ``--strict``).

``explain_guard(guard)`` states a :class:`~replaysafe.Guard` through the same code path: its
``spec`` is a handler's, its ledger is asked the same way; no broker is known to it (the caller's
consumer owns the broker and the ack), so the broker's facts are unknown, the statement says the
ack's timing is the caller's part of the guarantee, and RS124 lists the checks left undone.

Finding ids (stable; documented in docs/explain.md):

=======  ========  =====================================================================
id       severity  trigger
=======  ========  =====================================================================
RS101    warning   at-most-once with a keyed/transactional effect: completion comes first
RS102    warning   effectively-once with an unkeyed effect (outcome_unknown quarantine)
RS103    error     effectively-once with ``unkeyed(on_unknown="retry")``: at-least-once there
RS104    error     operation id extractor is not deterministic (delivery id / fresh uuid)
RS105    info      no key extractor: messages without rs-operation-id are quarantined
RS106    error     replay horizon shorter than the broker's retention
RS107    error     replay horizon shorter than DLQ retention or the redrive window
RS108    error     handler deadline or observed p99 longer than a visibility timeout that
                   cannot be extended
RS109    warning   observed handler p99 longer than the lease (relies on every heartbeat)
RS110    error     ledger storage cannot back the claim under effectively-once (a crash or
                   restart loses claims wholesale, or can corrupt the store)
RS111    warning   ledger durability unknown under effectively-once
RS112    error     broker delivery limit without a dead-letter target (silent drop)
RS113    error     consumer auto-commit (completion before the effect)
RS114    warning   retry budget can outlive the replay horizon
RS115    info      no publish time from a plain producer on this broker: horizon unchecked
RS116    warning   delivery limit at or below the retry budget (the broker gives up first)
RS117    info      broker retention unknown or unbounded (compare it with the horizon)
RS118    warning   ledger storage can lose its latest claims in a crash (appendfsync
                   everysec, synchronous_commit=off …) under effectively-once
RS119    info      which handler failures an unkeyed effect retries (the rule in force)
RS120    warning   handler deadline shorter than its lease: a slow run is cut, lease alive
RS122    warning   the handler's queue/group holds messages and has no consumer
RS123    warning   another group on the handler's source, named like the app's groups, holds
                   messages and has no consumer (a renamed or removed handler's group)
RS124    info      a guard: no broker is known, so the checks that need its facts were not
                   made (retention, dead-letter, visibility, delivery limit, auto-commit)
=======  ========  =====================================================================
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from replaysafe.app import App, HandlerSpec
from replaysafe.brokers.base import Capabilities, GroupState, RedeliveryKind, SourceFacts
from replaysafe.envelope import operation_id as make_operation_id
from replaysafe.errors import LedgerUnavailable
from replaysafe.guarantees import Effect, Guarantee
from replaysafe.ledger.base import Durability, DurabilityLevel, LedgerAdmin

if TYPE_CHECKING:
    from replaysafe.guard import Guard

Severity = Literal["error", "warning", "info"]
_ORDER = {"error": 0, "warning": 1, "info": 2}


@dataclass(frozen=True, slots=True)
class Finding:
    id: str
    severity: Severity
    message: str


def _severity_first(f: Finding) -> tuple[int, str]:
    """How a handler's findings are listed: errors, warnings, then info; by id within each."""
    return _ORDER[f.severity], f.id


@dataclass(slots=True)
class HandlerStatement:
    name: str
    guarantee: Guarantee
    #: the boundary where replay stops hurting, or None when it never does
    boundary: str | None
    statement: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    #: the queue/group the handler reads, as the broker names it (``Broker.group_name``)
    queue: str | None = None
    #: what the broker said about it when asked (None when it could not be asked)
    queue_state: GroupState | None = None
    #: "handler" (of an App) or "guard" (a Guard inside the caller's own consumer)
    kind: Literal["handler", "guard"] = "handler"

    def as_json(self) -> dict[str, Any]:
        q = self.queue_state
        return {
            "name": self.name,
            "kind": self.kind,
            "guarantee": self.guarantee.value,
            "queue": self.queue,
            "queue_state": None
            if q is None
            else {"messages": q.messages, "consumers": q.consumers, "exists": q.exists},
            "boundary": self.boundary,
            "statement": list(self.statement),
            "findings": [
                {"id": f.id, "severity": f.severity, "message": f.message} for f in self.findings
            ],
        }


@dataclass(slots=True)
class Report:
    handlers: list[HandlerStatement]

    def as_json(self) -> dict[str, Any]:
        return {"handlers": [h.as_json() for h in self.handlers]}

    @property
    def errors(self) -> list[Finding]:
        return [f for h in self.handlers for f in h.findings if f.severity == "error"]


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "unbounded"
    for unit, size in (("d", 86_400.0), ("h", 3_600.0), ("min", 60.0)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


_REDELIVERY = {
    RedeliveryKind.NACK: "redelivers on nack or when the consumer's connection dies",
    RedeliveryKind.VISIBILITY_TIMEOUT: "redelivers when a visibility timeout expires, even while "
    "the first handler still runs",
    RedeliveryKind.OFFSET_REWIND: "redelivers everything after the committed offset after a "
    "restart or rebalance",
}


def _key_is_deterministic(spec: HandlerSpec) -> bool | None:
    """Call the key extractor twice on the handler's example payload: a fresh uuid or a delivery
    id shows up as two different answers. None when there is nothing to test with."""
    if spec.key is None or spec.example is None:
        return None
    try:
        a, b = spec.key(spec.example), spec.key(spec.example)
    except Exception:
        return False
    norm = [make_operation_id(*x) if isinstance(x, tuple) else x for x in (a, b)]
    return norm[0] == norm[1]


def _unkeyed_failure_rule(g: Guarantee, eff: Effect) -> str:
    """RS119: what a handler failure does to an unkeyed effect under ``g``."""
    name = eff.name
    if g is Guarantee.AT_LEAST_ONCE:
        return (f"unkeyed {name} under at-least-once: every handler failure is retried under the "
                "retry budget, also one raised after the request left, which applies the effect "
                f"at {name} again (duplicates are this guarantee's sentence)")  # fmt: skip
    if eff.on_unknown == "retry":
        return (f"unkeyed {name} with on_unknown='retry': every handler failure is retried, also "
                f"one raised after the request left (at-least-once at {name})")  # fmt: skip
    proof = "EffectNotApplied" + "".join(f", {t.__name__}" for t in eff.not_applied_on)
    return (f"unkeyed {name}: a handler failure is retried only when it proves the effect did not "
            f"happen ({proof}); any other exception is read as an unknown outcome and "
            "quarantined as outcome_unknown on that attempt, never re-run; raise "
            "EffectNotApplied, or list exception types in Effect.unkeyed(..., not_applied_on=...), "
            "where the request certainly never left")  # fmt: skip


def _horizon(owner: App | Guard) -> float:
    """How long ``owner``'s ledger remembers completed operations."""
    return owner.horizon


#: a guard's COMPLETED line per guarantee: the caller acks, so its timing is part of the promise
_GUARD_COMPLETION = {
    Guarantee.AT_MOST_ONCE: "completion: yours. The guard awaits your ack= callback BEFORE the "
    "effect and runs nothing if it fails; the callback must complete the message at the broker, "
    "confirmed (the ack's timing is part of this guarantee).",
    Guarantee.AT_LEAST_ONCE: "completion: yours. Complete the message at the broker only after "
    "run() returned an Outcome whose action is 'ack', and nack it when the action is 'nack'; the "
    "guard does not own the ack, so its timing is part of this guarantee: an ack before run() "
    "returns (auto-ack, auto-commit) makes it at-most-once.",
    Guarantee.EFFECTIVELY_ONCE: "completion: yours. The guard records the effect in the ledger "
    "and returns an Outcome; complete the message at the broker only then and only when its "
    "action is 'ack' (nack after retry_after when it is 'nack'); the gap between the two is the "
    "ambiguity window, where a redelivered copy is answered from the ledger. The guard does not "
    "own the ack, so its timing is part of this guarantee: an ack before run() returns "
    "(auto-ack, auto-commit, a Kafka commit past an offset still running) loses the operation "
    "in a crash.",
}


def explain_handler(
    app: App | Guard,
    spec: HandlerSpec,
    caps: Capabilities | None,
    facts: SourceFacts,
    durability: Durability,
    p99: float | None = None,
) -> HandlerStatement:
    """The statement and findings for one handler (pure: all facts are passed in).

    ``app`` is the App that owns ``spec``, or a :class:`~replaysafe.Guard` (``spec`` is then
    ``guard.spec``). ``caps`` is None when no broker is known (a guard): the broker's promise is
    unknown, ``facts`` should be all-unknown, and completion is stated as the caller's ack."""
    g, eff = spec.guarantee, spec.effect
    guard = caps is None
    out = HandlerStatement(spec.name, g, None, kind="guard" if guard else "handler")
    say, find = out.statement.append, out.findings.append
    horizon = _horizon(app)

    # PUBLISHED / DELIVERED: the broker's promise
    if caps is None:
        say("broker: none that the guard knows; your consumer receives each message and settles "
            "it, so what the broker promises (redelivery, retention, dead-letter, visibility "
            "timeout, auto-commit) is unknown here.")  # fmt: skip
        find(Finding("RS124", "info", "a guard knows no broker: the checks that need its facts "
                     f"were not made; check them against your consumer: no copy delivered later "
                     f"than the horizon ({_span(horizon)}) after its publish, by retention, "
                     "dead-letter retention or a redrive (RS106, RS107); a visibility timeout "
                     "longer than the deadline or extended with Message(extend=...) (RS108); a "
                     "delivery limit above the retry budget and with a dead-letter target "
                     "(RS112, RS116); no auto-ack or auto-commit (RS113); "
                     "Message(broker_timestamp=...) so copies from plain producers are checked "
                     "against the horizon (RS115)"))  # fmt: skip
    else:
        dedup = (
            f"; it drops duplicate publishes only within {_span(caps.native_dedup_window)}"
            if caps.native_dedup_window
            else ""
        )
        say(
            f"broker ({facts.broker}, source {spec.source!r}): delivers at least once and "
            f"{_REDELIVERY[caps.redelivery]}{dedup}."
        )
    # identity
    if spec.key is None:
        ident = "the rs-operation-id header set by the producer"
        find(Finding("RS105", "info", "no key extractor: a message from a plain producer without "
                     "rs-operation-id is quarantined as invalid_operation_id; declare key=... to "
                     "derive the id from business fields"))  # fmt: skip
    else:
        ident = "the key extractor over the payload's business fields"
    if _key_is_deterministic(spec) is False:
        find(Finding("RS104", "error", "the key extractor gave two different operation ids for "
                     "the same payload: it reads a delivery id or mints a fresh id per call, so "
                     "every redelivery looks new; derive the id from business fields"))  # fmt: skip
    if g is Guarantee.EFFECTIVELY_ONCE:
        say(
            f"identity: operation id from {ident}, claimed in the ledger ({durability.store}, "
            f"{durability.setting}) BEFORE the effect with a {_span(spec.lease)} lease and a "
            f"fencing token; completed operations are remembered for {_span(horizon)}."
        )
    else:
        say(f"identity: operation id from {ident}; {g.value} records no claim, so a replay "
            "cannot be recognised.")  # fmt: skip

    # EFFECTED
    if eff.kind == "transactional":
        say("effect: a write in the ledger's own database; the ledger row commits in the same "
            "transaction, so a second apply cannot commit.")  # fmt: skip
    elif eff.kind == "keyed":
        say(f"effect: {eff.name} receives the operation id as idempotency key and refuses a "
            "second apply.")  # fmt: skip
    else:
        say(f"effect: {eff.name} cannot deduplicate: every call is a new effect.")

    # COMPLETED and the verdict
    if guard:
        # the guard does not own the ack: what the caller does with Outcome.action, and when,
        # is part of the guarantee, so the statement says it in the caller's terms
        say(_GUARD_COMPLETION[g])
    if g is Guarantee.AT_MOST_ONCE:
        if not guard:
            say("completion: the broker completes the message BEFORE the effect.")
        out.boundary = "broker completion (before the effect)"
        say("verdict: nothing is replayed, so replay never hurts; a crash between completion and "
            "the effect loses the operation.")  # fmt: skip
        say("may still happen: loss of an operation (never a duplicate).")
        if eff.kind in ("keyed", "transactional"):
            find(Finding("RS101", "warning", f"at-most-once completes before the effect, so the "
                         f"{eff.kind} effect's protection is never needed and operations may be "
                         "lost; declare at-least-once or effectively-once if loss is not "
                         "acceptable"))  # fmt: skip
    elif g is Guarantee.AT_LEAST_ONCE:
        if not guard:
            say("completion: the broker completes the message AFTER the effect.")
        out.boundary = None
        say(f"verdict: replay hurts at {eff.name}: a crash between the effect and completion, "
            "an expired visibility or an ambiguous publish applies it again.")  # fmt: skip
        say("may still happen: duplicates (never a loss).")
    else:
        if not guard:
            say("completion: the broker completes the message only after the ledger recorded the "
                "effect; the gap between the two is the ambiguity window.")  # fmt: skip
        if eff.kind == "transactional":
            out.boundary = f"the ledger transaction's commit ({durability.store})"
            say(f"verdict: replay stops hurting at {out.boundary}.")
            say("may still happen: nothing twice; an operation older than the horizon is "
                "quarantined as beyond_horizon instead of being re-applied.")  # fmt: skip
        elif eff.kind == "keyed":
            out.boundary = eff.name
            say(f"verdict: replay stops hurting at {eff.name} (keyed).")
            say(f"may still happen: a re-run after a crash calls {eff.name} again with the same "
                "key (it must honour it for as long as the horizon); nothing is lost.")  # fmt: skip
        elif eff.on_unknown == "retry":
            out.boundary = None
            say(f"verdict: at-least-once at {eff.name}: after a crash mid-effect it is re-run.")
            say(f"may still happen: a duplicate at {eff.name} after a crash or a lost lease.")
            find(Finding("RS103", "error", f"effectively-once is declared but {eff.name} cannot "
                         "deduplicate and on_unknown='retry' re-runs it: this handler is "
                         f"at-least-once at {eff.name}; key the downstream or accept "
                         "quarantine"))  # fmt: skip
        else:
            out.boundary = f"the ledger claim ({durability.store})"
            say(f"verdict: completed operations never run again (stopped at the ledger); a crash "
                f"in the middle of the effect leaves its outcome at {eff.name} unknown and the "
                "operation is quarantined as outcome_unknown, never silently re-run.")  # fmt: skip
            say("may still happen: operations set aside for a human (outcome_unknown); nothing "
                "twice.")  # fmt: skip
            find(Finding("RS102", "warning", f"effectively-once with unkeyed {eff.name}: crashes "
                         "mid-effect end in outcome_unknown quarantine; give the downstream an "
                         "idempotency key to recover automatically"))  # fmt: skip
        if durability.level is DurabilityLevel.NOT_DURABLE:
            find(Finding("RS110", "error", f"the ledger cannot back the claim: "
                         f"{durability.setting}: {durability.detail}"))  # fmt: skip
        elif durability.level is DurabilityLevel.LOSES_RECENT:
            find(Finding("RS118", "warning", f"the ledger ({durability.store}) can lose its most "
                         f"recent claims and completions in a crash: {durability.setting}: "
                         f"{durability.detail}. A lost completion makes its operation new again "
                         "(re-run: harmless at a keyed downstream, a duplicate at an unkeyed "
                         "one); a lost claim lets a second worker start it"))  # fmt: skip
        elif durability.level is DurabilityLevel.UNKNOWN:
            find(Finding("RS111", "warning", f"the ledger ({durability.store}) does not say "
                         "whether a returned claim survives a crash: "
                         f"{durability.detail}"))  # fmt: skip

    # failures of an unkeyed effect: which ones are retried (info: every rule here is what the
    # guarantee promises; the finding says which one is in force and how to change it)
    if eff.kind == "unkeyed" and g is not Guarantee.AT_MOST_ONCE:
        find(Finding("RS119", "info", _unkeyed_failure_rule(g, eff)))

    # horizons against the broker's memory
    if g is Guarantee.EFFECTIVELY_ONCE:
        if facts.retention is None:
            if not guard:  # a guard's RS124 says it with the rest
                find(Finding("RS117", "info", "the broker's retention is unknown or unbounded: "
                             "make sure no copy can be delivered later than the horizon "
                             f"({_span(horizon)})"))  # fmt: skip
        elif facts.retention > horizon:
            kept = _span(facts.retention)
            find(Finding("RS106", "error", f"the broker keeps messages for {kept} but the "
                         f"ledger remembers operations for {_span(horizon)}: an old copy "
                         "delivered after the horizon cannot be proven new (it is quarantined "
                         "as beyond_horizon); raise the horizon or bound the broker's "
                         "retention"))  # fmt: skip
        for label, span in (("dead-letter retention", facts.dead_letter_retention),
                            ("redrive window", facts.redrive_window)):  # fmt: skip
            if span is not None and span > horizon:
                find(Finding("RS107", "error", f"{label} {_span(span)} is longer than the replay "
                             f"horizon {_span(horizon)}: a redrive after the horizon re-applies "
                             "completed operations; raise the horizon"))  # fmt: skip
        budget = spec.retry.max_attempts * (spec.retry.max_delay + spec.timeout)
        if budget > horizon:
            find(Finding("RS114", "warning", f"the retry budget can run for {_span(budget)}, "
                         f"longer than the horizon {_span(horizon)}"))  # fmt: skip
        if facts.broker_timestamps is False:
            find(Finding("RS115", "info", "this broker stamps no publish time: messages from "
                         "plain producers without rs-published-at cannot be checked against "
                         "the horizon"))  # fmt: skip

    # time: visibility, lease, deadline, observed latency
    vis = facts.visibility_timeout
    extendable = caps is not None and caps.extend_visibility and spec.extend_visibility
    if vis is not None and not extendable:
        worst = max(spec.timeout, p99 or 0.0)
        if worst > vis and g is not Guarantee.AT_MOST_ONCE:
            find(Finding("RS108", "error", f"the handler may run {_span(worst)} (deadline or "
                         f"observed p99) but the visibility timeout is {_span(vis)} and cannot "
                         "be extended: the message is redelivered while it runs"))  # fmt: skip
    short_deadline = spec.short_deadline()
    if short_deadline is not None:
        find(Finding("RS120", "warning", short_deadline))
    if p99 is not None and g is Guarantee.EFFECTIVELY_ONCE and p99 > spec.lease:
        find(Finding("RS109", "warning", f"observed p99 {_span(p99)} exceeds the lease "
                     f"{_span(spec.lease)}: every such run depends on a heartbeat succeeding; "
                     "raise the lease above the p99"))  # fmt: skip

    # broker settings that lose or complete early
    if facts.delivery_limit is not None:
        if facts.dead_letter is None:
            find(
                Finding(
                    "RS112",
                    "error",
                    f"the broker drops a message after "
                    f"{facts.delivery_limit} deliveries and no dead-letter target is set: "
                    "poison or churn is silently lost; declare a dead-letter exchange/queue",
                )
            )
        if facts.delivery_limit <= spec.retry.max_attempts and g is not Guarantee.AT_MOST_ONCE:
            limit, budget_n = facts.delivery_limit, spec.retry.max_attempts
            find(Finding("RS116", "warning", f"the broker's delivery limit ({limit}) is at or "
                         f"below the retry budget ({budget_n}): the broker gives up before "
                         "replaysafe quarantines"))  # fmt: skip
    if facts.auto_commit and g is not Guarantee.AT_MOST_ONCE:
        find(Finding("RS113", "error", "the consumer auto-commits offsets: completion happens "
                     f"before the effect, so {g.value} is really at-most-once; disable "
                     "enable.auto.commit"))  # fmt: skip
    out.findings.sort(key=_severity_first)
    return out


async def _durability(ledger: LedgerAdmin) -> Durability:
    try:
        return await ledger.durability()
    except LedgerUnavailable as exc:  # a design review without the server still gets its report
        return Durability(type(ledger).__name__, None, "unknown",
                          f"it could not be asked ({exc})")  # fmt: skip


async def explain_guard(guard: Guard, *, p99: dict[str, float] | None = None) -> Report:
    """The report for one :class:`~replaysafe.Guard`: its ``spec`` stated as a handler's, its
    ledger asked for its durability, no broker (the caller's consumer owns it and the ack).
    ``p99`` maps the guard's name to its observed p99 latency in seconds, when known."""
    durability = await _durability(guard.ledger)
    # nothing is known about the broker: every fact unknown, and no publish time is missing
    # for certain (the caller may pass Message(broker_timestamp=...)): RS124 says what to check
    facts = SourceFacts(broker="unknown")
    spec = guard.spec
    return Report([explain_handler(guard, spec, None, facts, durability,
                                   (p99 or {}).get(spec.name))])  # fmt: skip


async def explain(app: App, *, p99: dict[str, float] | None = None) -> Report:
    """The report for every handler of ``app``. ``p99`` maps handler names to observed p99
    latency in seconds (from metrics), when known."""
    durability = await _durability(app.ledger)
    handlers = []
    for spec in app.handlers.values():
        caps = app.broker.capabilities(spec.source)
        facts = SourceFacts(broker=type(app.broker).__name__)
        with contextlib.suppress(Exception):
            facts = await asyncio.wait_for(app.broker.describe(spec.source), timeout=10)
        handlers.append(explain_handler(app, spec, caps, facts, durability,
                                        (p99 or {}).get(spec.name)))  # fmt: skip
    await _name_queues(app, handlers)
    return Report(handlers)


async def _name_queues(app: App, statements: list[HandlerStatement]) -> None:
    """Name each handler's queue/group as the broker does (a statement line and ``queue`` in
    JSON) and add RS122/RS123 from the broker's counts (``runtime.preflight.queue_warnings``, the
    same judgement ``replaysafe run`` logs at start-up)."""
    from replaysafe.runtime.preflight import queue_warnings, stray_groups

    specs = list(app.handlers.values())
    states: dict[str, GroupState] = {}
    for spec in specs:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                states[spec.name] = await app.broker.group_state(spec.source, spec.group)
    warnings = queue_warnings(app, states, await stray_groups(app, specs))
    for h in statements:
        spec = app.handlers[h.name]
        state = h.queue_state = states.get(h.name)
        h.queue = state.name if state else app.broker.group_name(spec.source, spec.group)
        if state is None:
            now = "the broker could not be asked how many messages wait there"
        elif state.exists is False:
            now = "it does not exist yet (the first worker creates it)"
        else:
            counts = [f"{state.messages} message(s) waiting" if state.messages is not None
                      else "the broker does not say how many messages wait",
                      f"{state.consumers} consumer(s)" if state.consumers is not None
                      else "it cannot count consumers"]  # fmt: skip
            now = ", ".join(counts)
        h.statement.insert(1, f"queue: group {spec.group!r} reads {h.queue}; now {now}.")
        h.findings.extend(Finding(w.id, "warning", w.message)
                          for w in warnings if h.name in w.handlers)  # fmt: skip
        h.findings.sort(key=_severity_first)
