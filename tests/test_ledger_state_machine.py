"""Property test of the ledger state machine (``replaysafe.ledger.base``), against every backend.

Hypothesis drives random interleavings of several workers claiming a few operations (two
fingerprints), completing / releasing / extending / quarantining with claims that may be stale,
crashing (forgetting their claims), the clock moving forward and stepping back, and purges. An
independent model (written out below, not calling ``decide_claim``) predicts every answer, and the
invariants state the promises:

- at most one successful ``complete`` (one effect) per operation between purges;
- a claim that takes over an expired lease reports ``previous_started=False`` exactly when no
  attempt of that in-flight chain may have started its effect (every one claimed with
  ``marks_start`` and none marked by ``mark_started``): never forgetting an earlier attempt;
- a stale token is always fenced (``LeaseLost``) and a current one never is;
- fencing tokens strictly increase; attempts never decrease;
- the stored record always equals the model's.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from replaysafe.errors import LeaseLost
from replaysafe.ledger.base import (
    Acquired,
    AlreadyDone,
    Claim,
    ClaimOutcome,
    ClaimRequest,
    Conflict,
    InFlight,
    Ledger,
    OpKey,
    Quarantined,
    QuarantineRequest,
    Record,
    State,
)
from replaysafe.ledger.memory import MemoryLedger
from replaysafe.ledger.sqlite import SQLiteLedger
from replaysafe.quarantine import EffectRisk, QuarantineReason
from replaysafe.testing import FakeClock

OPS = ("op-0", "op-1", "op-2")
WORKERS = ("w0", "w1", "w2")
#: mostly the right payload; a key-reuse conflict now and then
fingerprints = st.sampled_from(("fp-a", "fp-a", "fp-a", "fp-b"))
SCOPE = "sm"
#: claims a worker remembers; older ones are dropped (a bound, not a semantic)
HELD_PER_WORKER = 6

leases = st.sampled_from([0.5, 1.0, 2.0])
# exact lease lengths and fractions of them, so time lands on lease boundaries too
steps = st.one_of(
    st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    st.floats(min_value=0.0, max_value=3.0, allow_nan=False, allow_infinity=False),
)
picks = st.integers(min_value=0, max_value=1_000)

SETTINGS = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def key(op: str) -> OpKey:
    return OpKey(SCOPE, op)


@dataclass(frozen=True)
class Expected:
    """The model's view of one operation record."""

    fingerprint: str
    state: State
    token: int
    lease_until: float | None
    attempts: int
    completed_at: float | None = None
    #: some attempt since the operation was last claimed fresh (new or released) may have
    #: started its effect: it claimed without ``marks_start`` or its ``mark_started`` went through
    maybe_started: bool = True


class LedgerMachine(RuleBasedStateMachine):
    """Subclasses choose the backend in :meth:`make_ledger`."""

    def make_ledger(self, clock: FakeClock, directory: Path) -> Ledger:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        # one event loop per run: the ledger's lock and executor futures belong to it
        self.runner = asyncio.Runner()
        self.clock = FakeClock()
        self.directory = Path(tempfile.mkdtemp(prefix="replaysafe-sm-"))
        self.ledger = self.make_ledger(self.clock, self.directory)
        self.model: dict[str, Expected] = {}
        self.held: dict[str, list[Claim]] = {w: [] for w in WORKERS}
        self.effects: dict[str, int] = dict.fromkeys(OPS, 0)
        self.last_token = 0
        self.attempts_seen: dict[str, int] = dict.fromkeys(OPS, 0)

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def teardown(self) -> None:
        try:
            self.run(self.ledger.close())
        finally:
            self.runner.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ model

    def expect_claim(
        self, op: str, fp: str, owner: str, lease: float, got: ClaimOutcome, marks: bool = False
    ) -> None:
        """Check one claim outcome against the model, then apply it to the model."""
        now = self.clock.now()
        m = self.model.get(op)
        maybe_started = not marks
        if m is None:
            assert isinstance(got, Acquired), got
            assert (got.claim.attempt, got.claim.recovered) == (1, False)
        elif m.fingerprint != fp:
            assert isinstance(got, Conflict), got
        elif m.state is State.COMPLETED:
            assert isinstance(got, AlreadyDone), got
        elif m.state is State.QUARANTINED:
            assert isinstance(got, Quarantined), got
        elif m.state is State.IN_FLIGHT and m.lease_until is not None and m.lease_until > now:
            assert isinstance(got, InFlight), got
        else:
            assert isinstance(got, Acquired), (got, m, now)
            assert got.claim.attempt == m.attempts + 1
            # only a takeover of an expired lease leaves the previous outcome unknown
            assert got.claim.recovered is (m.state is State.IN_FLIGHT)
            if got.claim.recovered:
                assert got.claim.previous_started is m.maybe_started, (got, m)
                maybe_started = m.maybe_started or not marks  # never forgotten
        event(f"claim -> {type(got).__name__}" + (" (recovered)" if _recovered(got) else ""))
        if not isinstance(got, Acquired):
            return
        claim = got.claim
        assert claim.token > self.last_token, "fencing tokens must strictly increase"
        assert (claim.key, claim.fingerprint, claim.owner) == (key(op), fp, owner)
        assert claim.lease_until == now + lease
        self.last_token = claim.token
        self.model[op] = Expected(
            fp, State.IN_FLIGHT, claim.token, claim.lease_until, claim.attempt, None, maybe_started
        )
        held = self.held[owner]
        held.append(claim)
        del held[:-HELD_PER_WORKER]

    def is_current(self, claim: Claim) -> bool:
        m = self.model.get(claim.key.operation_id)
        return m is not None and m.state is State.IN_FLIGHT and m.token == claim.token

    def pick(self, index: int) -> Claim:
        claims = [c for w in WORKERS for c in self.held[w]]
        return claims[index % len(claims)]

    def holds_any(self) -> bool:
        return any(self.held.values())

    def fenced(self, claim: Claim, call: Any) -> Any:
        """Run a fenced call: it must succeed exactly when the model says the claim is current."""
        current = self.is_current(claim)
        try:
            out = self.run(call)
        except LeaseLost:
            assert not current, f"a current claim was fenced: {claim}"
            event("stale claim fenced")
            return None
        assert current, f"a stale claim was not fenced: {claim}, model {self.model}"
        return out

    def record_effect(self, op: str) -> None:
        self.effects[op] += 1
        assert self.effects[op] <= 1, f"{op} completed twice: the effect ran twice"

    # ------------------------------------------------------------------ rules

    @rule(
        worker=st.sampled_from(WORKERS),
        op=st.sampled_from(OPS),
        fp=fingerprints,
        lease=leases,
    )
    def claim(self, worker: str, op: str, fp: str, lease: float) -> None:
        got = self.run(self.ledger.claim(key(op), fp, worker, lease))
        self.expect_claim(op, fp, worker, lease, got)

    @rule(
        batch=st.lists(
            st.tuples(st.sampled_from(WORKERS), st.sampled_from(OPS), fingerprints, st.booleans()),
            min_size=1,
            max_size=4,
        ),
        lease=leases,
    )
    def claim_many(self, batch: list[tuple[str, str, str, bool]], lease: float) -> None:
        requests = [ClaimRequest(key(op), fp, w, lease, marks) for w, op, fp, marks in batch]
        outcomes = self.run(self.ledger.claim_many(requests))
        assert len(outcomes) == len(batch)
        for (w, op, fp, marks), got in zip(batch, outcomes, strict=True):
            self.expect_claim(op, fp, w, lease, got, marks)  # as the single form, in order

    @precondition(holds_any)
    @rule(indexes=st.lists(picks, min_size=1, max_size=4))
    def mark_started(self, indexes: list[int]) -> None:
        claims = [self.pick(i) for i in indexes]
        outcomes = self.run(self.ledger.mark_started(claims))
        for claim, out in zip(claims, outcomes, strict=True):
            if self.is_current(claim):
                assert out == claim, (claim, out)
                op = claim.key.operation_id
                self.model[op] = replace(self.model[op], maybe_started=True)
            else:
                assert isinstance(out, LeaseLost), (claim, out)

    @precondition(holds_any)
    @rule(index=picks, result=st.sampled_from([None, "receipt"]))
    def complete(self, index: int, result: str | None) -> None:
        claim = self.pick(index)
        done = self.fenced(claim, self.ledger.complete(claim, result))
        if done is None:
            return
        assert isinstance(done, Record)
        op = claim.key.operation_id
        self.record_effect(op)
        now = self.clock.now()
        assert (done.state, done.result, done.completed_at) == (State.COMPLETED, result, now)
        self.model[op] = replace(
            self.model[op], state=State.COMPLETED, lease_until=None, completed_at=now
        )

    @precondition(holds_any)
    @rule(indexes=st.lists(picks, min_size=1, max_size=4))
    def complete_many(self, indexes: list[int]) -> None:
        claims = [self.pick(i) for i in indexes]
        outcomes = self.run(self.ledger.complete_many([(c, None) for c in claims]))
        now = self.clock.now()
        for claim, out in zip(claims, outcomes, strict=True):
            op = claim.key.operation_id
            if self.is_current(claim):
                assert isinstance(out, Record) and out.state is State.COMPLETED, out
                self.record_effect(op)
                self.model[op] = replace(
                    self.model[op], state=State.COMPLETED, lease_until=None, completed_at=now
                )
            else:
                assert isinstance(out, LeaseLost), (claim, out)

    @precondition(holds_any)
    @rule(index=picks)
    def release(self, index: int) -> None:
        claim = self.pick(index)
        if self.fenced(claim, self._release(claim)) is not None:
            op = claim.key.operation_id
            self.model[op] = replace(self.model[op], state=State.RELEASED, lease_until=None)

    async def _release(self, claim: Claim) -> bool:
        await self.ledger.release(claim, "failed")
        return True

    @precondition(holds_any)
    @rule(index=picks, lease=leases)
    def extend(self, index: int, lease: float) -> None:
        claim = self.pick(index)
        extended = self.fenced(claim, self.ledger.extend(claim, lease))
        if extended is None:
            return
        assert isinstance(extended, Claim)
        assert extended.token == claim.token
        assert extended.lease_until == self.clock.now() + lease
        op = claim.key.operation_id
        self.model[op] = replace(self.model[op], lease_until=extended.lease_until)

    @precondition(holds_any)
    @rule(index=picks)
    def quarantine(self, index: int) -> None:
        claim = self.pick(index)
        request = QuarantineRequest(
            SCOPE,
            QuarantineReason.OUTCOME_UNKNOWN,
            operation_id=claim.key.operation_id,
            fingerprint=claim.fingerprint,
            risk=EffectRisk.OUTCOME_UNKNOWN,
        )
        if self.fenced(claim, self.ledger.quarantine(request, claim)) is not None:
            op = claim.key.operation_id
            self.model[op] = replace(self.model[op], state=State.QUARANTINED, lease_until=None)

    @rule(worker=st.sampled_from(WORKERS))
    def crash(self, worker: str) -> None:
        """The worker dies: its claims are never presented again; their leases run out."""
        self.held[worker].clear()

    @rule(seconds=steps)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(seconds=st.floats(min_value=-0.5, max_value=0.5, allow_nan=False))
    def jump(self, seconds: float) -> None:
        """An NTP step, possibly backwards: leases may live a little longer or shorter, but
        fencing must not care."""
        self.clock.jump(seconds)

    @rule(
        back=st.sampled_from([-1.0, 0.0, 0.5, 1.0, 3.0]),
        limit=st.integers(min_value=1, max_value=4),
    )
    def purge(self, back: float, limit: int) -> None:
        cutoff = self.clock.now() - back
        candidates = [
            op
            for op, m in self.model.items()
            if m.state is State.COMPLETED and m.completed_at is not None and m.completed_at < cutoff
        ]
        deleted = self.run(self.ledger.purge(cutoff, limit=limit))
        assert deleted == min(limit, len(candidates))
        gone = [op for op in candidates if self.run(self.ledger.get(key(op))) is None]
        assert len(gone) == deleted
        event(f"purge deleted {deleted}")
        for op in gone:  # forgotten: the operation is new to the ledger again
            del self.model[op]
            self.effects[op] = 0
            self.attempts_seen[op] = 0

    # ------------------------------------------------------------------ invariants

    @invariant()
    def ledger_matches_model(self) -> None:
        for op in OPS:
            record = self.run(self.ledger.get(key(op)))
            m = self.model.get(op)
            if m is None:
                assert record is None, record
                continue
            assert record is not None, op
            assert record.attempts >= self.attempts_seen[op], "attempts went down"
            self.attempts_seen[op] = record.attempts
            assert (
                record.fingerprint,
                record.state,
                record.token,
                record.lease_until,
                record.attempts,
                record.completed_at,
            ) == (m.fingerprint, m.state, m.token, m.lease_until, m.attempts, m.completed_at)
            assert self.effects[op] == (1 if m.state is State.COMPLETED else 0)
            if m.state is State.IN_FLIGHT:  # the stored form of "never started"
                assert (record.unstarted_attempt == record.attempts) is not m.maybe_started


def _recovered(outcome: ClaimOutcome) -> bool:
    return isinstance(outcome, Acquired) and outcome.claim.recovered


class MemoryLedgerMachine(LedgerMachine):
    def make_ledger(self, clock: FakeClock, directory: Path) -> Ledger:
        return MemoryLedger(clock)


class SQLiteLedgerMachine(LedgerMachine):
    def make_ledger(self, clock: FakeClock, directory: Path) -> Ledger:
        return SQLiteLedger(directory / "ledger.db", clock=clock)


@pytest.mark.parametrize(
    "machine", [MemoryLedgerMachine, SQLiteLedgerMachine], ids=["memory", "sqlite"]
)
def test_ledger_state_machine(machine: type[LedgerMachine]) -> None:
    run_state_machine_as_test(machine, settings=SETTINGS)
