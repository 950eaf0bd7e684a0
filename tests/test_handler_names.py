"""Issue 13 item 16c: handler names are validated at registration, like the names the ledger's
control flags take (``ledger.base.check_handler_name``): a handler name is the ledger scope, the
default group suffix, a metric label and a word in every log line."""

from __future__ import annotations

import pytest

from replaysafe import App, ConfigurationError, Context, Effect, Guarantee
from replaysafe.brokers import MemoryBroker
from replaysafe.ledger import MemoryLedger
from replaysafe.ledger.base import MAX_HANDLER_NAME


async def _noop(ctx: Context) -> None:
    return None


def _app() -> App:
    return App("names", broker=MemoryBroker(), ledger=MemoryLedger())


@pytest.mark.parametrize(
    "name",
    ["charge\nINFO forged log line", "x" * 300, "é" * 128, "tab\there", "nul\x00", "del\x7f", ""],
    ids=["newline", "300-chars", "256-bytes", "tab", "nul", "del", "empty"],
)
def test_a_bad_handler_name_is_refused_at_registration(name: str) -> None:
    async def fn(ctx: Context) -> None:
        return None

    fn.__name__ = name  # an empty name= falls back to the function's name: check that path too
    app = _app()
    register = app.handler("orders", guarantee=Guarantee.AT_LEAST_ONCE, name=name or None)
    with pytest.raises(ConfigurationError, match=r"cannot be registered.*pass name="):
        register(fn)
    assert app.handlers == {}


def test_a_function_name_is_checked_too() -> None:
    async def f(ctx: Context) -> None:
        return None

    f.__name__ = "bad\nname"
    with pytest.raises(ConfigurationError, match="cannot be registered"):
        _app().handler("orders", guarantee=Guarantee.AT_MOST_ONCE)(f)


@pytest.mark.parametrize("name", ["charge", "x" * MAX_HANDLER_NAME, "é" * 127, "charge v2: EU/ü"])
def test_good_handler_names_are_registered(name: str) -> None:
    app = _app()
    app.handler("orders", guarantee=Guarantee.EFFECTIVELY_ONCE, effect=Effect.keyed("p"),
                name=name)(_noop)  # fmt: skip
    assert list(app.handlers) == [name] and app.handlers[name].group == f"names.{name}"
