"""Guards for `replaysafe explain MODULE:GUARD` tests (tests/test_explain_guard.py): each is a
module attribute, as a consumer's module would hold it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from replaysafe import Effect, Guarantee, Guard
from replaysafe.ledger import SQLiteLedger

_DIR = Path(os.environ.get("GUARDS_APP_DIR") or tempfile.gettempdir())
_DB = _DIR / f"replaysafe-explain-guard-{os.getpid()}.db"

#: effectively-once over a keyed payments API, the operation id from business fields
charge = Guard(SQLiteLedger(_DB), name="charge", guarantee=Guarantee.EFFECTIVELY_ONCE,
               effect=Effect.keyed("psp"), key=lambda p: ("charge", p["order"]))  # fmt: skip

#: effectively-once declared over an SMTP server that re-runs: at-least-once there (RS103), and
#: an in-memory SQLite ledger cannot back a claim (RS110)
emails = Guard(SQLiteLedger(":memory:"), name="emails", guarantee=Guarantee.EFFECTIVELY_ONCE,
               effect=Effect.unkeyed("smtp", on_unknown="retry"))  # fmt: skip

#: at-least-once: the caller's ack after the effect is the whole promise
notify = Guard(SQLiteLedger(":memory:"), name="notify", guarantee=Guarantee.AT_LEAST_ONCE)

not_a_guard = 42
