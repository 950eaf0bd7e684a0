"""The conformance suite of the pause role (:class:`~replaysafe.ledger.base.HandlerControls`)."""

from __future__ import annotations

import pytest

from replaysafe.errors import (
    ConfigurationError,
)
from replaysafe.ledger.base import (
    MAX_HANDLER_NAME,
    MAX_PAUSE_TEXT,
    Acquired,
    LedgerBackend,
    OpKey,
    State,
)
from replaysafe.testing import FakeClock
from replaysafe.testing.contracts._ledger_base import (
    FP,
    HOSTILE,
    HOSTILE_STORED,
    KEY,
    LedgerFixtures,
    acquire,
    must_get,
)


class HandlerControlsContract(LedgerFixtures):
    """Behaviour every :class:`~replaysafe.ledger.base.HandlerControls` must show: durable
    per-handler pause flags that touch no operation."""

    async def test_pause_text_from_outside_is_stored_escaped(self, ledger: LedgerBackend) -> None:
        await ledger.set_paused("charge", True, reason=HOSTILE, by=f"ops {HOSTILE}")
        state = (await ledger.paused())["charge"]
        assert (state.reason, state.by) == (HOSTILE_STORED, f"ops {HOSTILE_STORED}")

    async def test_no_handler_is_paused_in_a_new_ledger(self, ledger: LedgerBackend) -> None:
        assert await ledger.paused() == {}

    async def test_pause_is_recorded_with_reason_and_author_and_resume_clears_it(
        self, ledger: LedgerBackend, clock: FakeClock
    ) -> None:
        await ledger.set_paused("charge", True, reason="provider outage", by="alice")
        [(name, state)] = (await ledger.paused()).items()
        assert name == state.handler == "charge"
        assert (state.reason, state.by) == ("provider outage", "alice")
        assert state.since > 0
        await self.advance(clock, 0.05)
        # pausing again replaces reason, author and time
        await ledger.set_paused("charge", True, reason="still down")
        again = (await ledger.paused())["charge"]
        assert (again.reason, again.by) == ("still down", "")
        assert again.since >= state.since
        await ledger.set_paused("charge", False)
        assert await ledger.paused() == {}
        await ledger.set_paused("charge", False)  # resuming a running handler changes nothing
        assert await ledger.paused() == {}

    async def test_pause_flags_are_per_handler_name(self, ledger: LedgerBackend) -> None:
        names = ["a:b", "a", "b", "ünïcode ✓", "x" * MAX_HANDLER_NAME]
        for name in names:
            await ledger.set_paused(name, True, reason=f"r-{name[:10]}")
        await ledger.set_paused("a", False)
        got = await ledger.paused()
        assert sorted(got) == sorted(n for n in names if n != "a")
        assert all(got[n].reason == f"r-{n[:10]}" for n in got)

    async def test_pause_touches_no_operation(self, ledger: LedgerBackend) -> None:
        claim = await acquire(ledger, KEY, self.lease)
        before = await must_get(ledger, KEY)
        await ledger.set_paused(KEY.scope, True)
        # pausing is the workers' business (they stop fetching): the ledger still answers
        assert await must_get(ledger, KEY) == before
        assert (await ledger.complete(claim, "done")).state is State.COMPLETED
        other = OpKey(KEY.scope, "another")
        assert isinstance(await ledger.claim(other, FP, "w1", self.lease), Acquired)
        summary = await ledger.summary()
        assert sum(summary.by_state.values()) == 2

    async def test_pause_text_is_capped_and_bad_handler_names_are_refused(
        self, ledger: LedgerBackend
    ) -> None:
        await ledger.set_paused("charge", True, reason="é" * MAX_PAUSE_TEXT, by="b" * 5000)
        state = (await ledger.paused())["charge"]
        assert state.reason == "é" * (MAX_PAUSE_TEXT // 2)  # cut between characters, not inside
        assert state.by == "b" * MAX_PAUSE_TEXT
        for bad in ["", "tab\there", "nul\x00", "x" * (MAX_HANDLER_NAME + 1)]:
            with pytest.raises(ConfigurationError, match="handler name"):
                await ledger.set_paused(bad, True)
        assert list(await ledger.paused()) == ["charge"]
