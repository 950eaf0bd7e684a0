"""The demo's payments app under each guarantee, for ``replaysafe explain``::

    replaysafe explain replaysafe.examples.payments:app            # effectively-once, keyed
    replaysafe explain replaysafe.examples.payments:at_least_once
    replaysafe explain replaysafe.examples.payments:at_most_once

The ledger is a SQLite file in the temp directory; nothing is opened until a worker runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from replaysafe.app import App
from replaysafe.brokers.memory import MemoryBroker
from replaysafe.chaos.demo import build_app
from replaysafe.guarantees import Guarantee
from replaysafe.ledger.sqlite import SQLiteLedger
from replaysafe.testing import EffectProbe

_DIR = Path(tempfile.gettempdir())


def _make(g: Guarantee) -> App:
    ledger = SQLiteLedger(_DIR / f"replaysafe-example-{g.value}.db")
    return build_app(g, MemoryBroker(), ledger, EffectProbe(honour_keys=True), lease=30)


app = _make(Guarantee.EFFECTIVELY_ONCE)
at_least_once = _make(Guarantee.AT_LEAST_ONCE)
at_most_once = _make(Guarantee.AT_MOST_ONCE)
