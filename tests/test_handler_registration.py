"""What ``App.handler`` accepts and refuses at registration, and what it says (issue 13, item 1a;
issue 14 item 2 accepts plain functions as sync handlers). The warning at registration about a
deadline shorter than the lease (item 9) is tested in tests/test_deadline.py."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from replaysafe import ConfigurationError, Context, Effect, Guarantee
from replaysafe.app import App
from replaysafe.brokers import MemoryBroker
from replaysafe.ledger import MemoryLedger

EO, ALO, AMO = Guarantee.EFFECTIVELY_ONCE, Guarantee.AT_LEAST_ONCE, Guarantee.AT_MOST_ONCE


def new_app() -> App:
    return App("reg", broker=MemoryBroker(), ledger=MemoryLedger())


def register(app: App, fn: Any, **kwargs: Any) -> None:
    kwargs.setdefault("guarantee", EO)
    kwargs.setdefault("effect", Effect.keyed("payments"))
    app.handler("orders", name=kwargs.pop("name", "charge"), **kwargs)(fn)


# ---------------------------------------------------------------- item 1a: coroutine functions


def sync_charge(ctx: Context) -> str:
    return "charged"


async def async_charge(ctx: Context) -> str:
    return "charged"


async def async_charge_with_fee(ctx: Context, fee: int) -> str:
    return f"charged {fee}"


class SyncCallable:
    def __call__(self, ctx: Context) -> str:
        return "charged"


class AsyncCallable:
    async def __call__(self, ctx: Context) -> str:
        return "charged"


class Service:
    async def charge(self, ctx: Context) -> str:
        return "charged"


def logged(fn: Callable[[Context], Any]) -> Callable[[Context], Any]:
    """A sync decorator written the usual way: the wrapper is a plain def returning whatever the
    wrapped function returns (a coroutine when that is an async def)."""

    @functools.wraps(fn)
    def wrapper(ctx: Context) -> Any:
        return fn(ctx)

    return wrapper


def timed(fn: Callable[[Context], Awaitable[Any]]) -> Callable[[Context], Awaitable[Any]]:
    """An async decorator (its wrapper is itself a coroutine function)."""

    @functools.wraps(fn)
    async def wrapper(ctx: Context) -> Any:
        return await fn(ctx)

    return wrapper


async def async_gen(ctx: Context) -> Any:
    yield "not a handler"


SYNC = {
    "plain def": sync_charge,
    "lambda": lambda ctx: "charged",
    "partial of a def": functools.partial(lambda ctx, fee: fee, fee=3),
    "sync __call__": SyncCallable(),
    "sync decorator over a def": logged(sync_charge),
}

REFUSED = {
    "a class": (SyncCallable, "is a class"),
    "async generator": (async_gen, "generator function"),
    "not callable": (42, "not callable"),
}

ACCEPTED = {
    "async def": async_charge,
    "partial of an async def": functools.partial(async_charge_with_fee, fee=3),
    "async __call__": AsyncCallable(),
    "partial of an async __call__": functools.partial(AsyncCallable()),
    "bound async method": Service().charge,
    "sync decorator over an async def": logged(async_charge),
    "async decorator over an async def": timed(async_charge),
    "two decorators": logged(timed(async_charge)),
}


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_registration_refuses_what_cannot_run(what: str) -> None:
    fn, says = REFUSED[what]
    app = new_app()
    with pytest.raises(ConfigurationError, match=says):
        register(app, fn)
    assert app.handlers == {}


@pytest.mark.parametrize("what", sorted(ACCEPTED))
def test_registration_accepts_what_returns_an_awaitable(what: str) -> None:
    app = new_app()
    register(app, ACCEPTED[what])
    assert list(app.handlers) == ["charge"]
    assert not app.handlers["charge"].sync


@pytest.mark.parametrize("what", sorted(SYNC))
def test_a_plain_function_is_registered_as_a_sync_handler(what: str) -> None:
    """Issue 14, item 2: a plain ``def`` is no longer refused; it runs through the sync path."""
    for guarantee, effect in ((ALO, None), (AMO, None), (EO, Effect.unkeyed("smtp"))):
        app = new_app()
        register(app, SYNC[what], guarantee=guarantee, effect=effect)
        assert app.handlers["charge"].sync


def test_a_sync_handler_cannot_have_a_transactional_effect() -> None:
    from replaysafe.ledger import SQLiteLedger

    app = App("reg", broker=MemoryBroker(), ledger=SQLiteLedger(":memory:"))
    with pytest.raises(ConfigurationError, match=r"ctx\.tx, which is async"):
        register(app, sync_charge, effect=Effect.transactional())
    assert app.handlers == {}
