"""nats-py's errors mapped to replaysafe's ``BrokerError`` tree, and the lazy driver import.

Three outcomes matter to a caller: the server cannot be reached (``BrokerUnavailable``: retry
later), the server refused the request (``ConfigurationError``: a missing stream, bad
credentials, a refused setting -- retrying does not help), and a publish whose PubAck never came
back after it was sent (``PublishAmbiguous``: retry with the SAME envelope; the stream's
``Nats-Msg-Id`` window drops the copy if it was stored).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from replaysafe.errors import (
    BrokerUnavailable,
    ConfigurationError,
    MissingExtra,
    PublishAmbiguous,
    ReplaysafeError,
)


@dataclass(frozen=True, slots=True)
class Driver:
    """The parts of nats-py the adapter uses, imported once."""

    nats: Any
    #: ``nats.aio.client.Client`` (a client object the adapter can close if connect hangs)
    client: Any
    api: Any
    errors: Any
    js_errors: Any


def driver() -> Driver:
    """Import nats-py lazily; a missing one names the extra to install."""
    try:
        nats = importlib.import_module("nats")
        client = importlib.import_module("nats.aio.client")
        api = importlib.import_module("nats.js.api")
        errors = importlib.import_module("nats.errors")
        js_errors = importlib.import_module("nats.js.errors")
    except ImportError as error:
        raise MissingExtra("nats", "nats-py") from error
    return Driver(nats=nats, client=client.Client, api=api, errors=errors, js_errors=js_errors)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def map_error(drv: Driver, exc: BaseException, doing: str, where: str) -> ReplaysafeError:
    """The replaysafe error for a failed admin or consumer call (never for a publish: see
    :func:`map_publish_error`). ``doing`` says what was attempted, ``where`` names the server."""
    e, js = drv.errors, drv.js_errors
    if isinstance(exc, ReplaysafeError):
        return exc
    if isinstance(exc, e.AuthorizationError | e.InvalidUserCredentialsError):
        return ConfigurationError(
            f"NATS at {where} refused the credentials while {doing} ({_describe(exc)}); check "
            "the user and password in the URL"
        )
    if isinstance(exc, js.NotFoundError):
        return ConfigurationError(
            f"NATS at {where}: {doing} failed, the stream or consumer does not exist "
            f"({_describe(exc)}); call broker.prepare_source(source, groups) (or subscribe once) "
            "to declare it"
        )
    if isinstance(exc, js.ServiceUnavailableError | js.ServerError):
        return BrokerUnavailable(
            f"NATS JetStream at {where} is unavailable while {doing} ({_describe(exc)}); retry "
            "later"
        )
    if isinstance(exc, js.APIError):
        return ConfigurationError(
            f"NATS JetStream at {where} refused {doing} ({_describe(exc)}); fix the stream or "
            "consumer settings, or remove the conflicting stream/consumer"
        )
    if isinstance(exc, e.NoRespondersError):
        return BrokerUnavailable(
            f"NATS at {where}: nobody answered {doing} (JetStream disabled, or not ready); start "
            "the server with JetStream enabled (nats-server -js)"
        )
    return BrokerUnavailable(
        f"NATS at {where} is unreachable while {doing} ({_describe(exc)}); retry when the "
        "server is back"
    )


def map_publish_error(
    drv: Driver, exc: BaseException, subject: str, operation_id: str, where: str
) -> ReplaysafeError:
    """A failed JetStream publish. Raised before the message left the client (the connection is
    closed, or no server was ever reached): ``BrokerUnavailable``. The server answered with a
    refusal, or no stream captures the subject: ``ConfigurationError`` (nothing stored).
    Anything after the send (no PubAck within the timeout, the connection lost while waiting):
    ``PublishAmbiguous``."""
    e, js = drv.errors, drv.js_errors
    if isinstance(exc, ReplaysafeError):
        return exc
    if isinstance(exc, e.NoRespondersError | js.NoStreamResponseError):
        return ConfigurationError(
            f"NATS at {where}: no JetStream stream captures subject {subject!r}, so operation "
            f"{operation_id!r} was not stored; call broker.prepare_source({subject!r}) (or "
            "subscribe to it once) before publishing, or add the subject to a stream"
        )
    if isinstance(exc, e.MaxPayloadError):
        return ConfigurationError(
            f"NATS at {where}: operation {operation_id!r} is larger than the server's max "
            "payload, so it was not sent; store the payload elsewhere and send a reference, or "
            "raise max_payload on the server"
        )
    if isinstance(exc, js.ServiceUnavailableError):
        return BrokerUnavailable(
            f"NATS JetStream at {where} is unavailable, operation {operation_id!r} was not "
            f"stored on {subject!r} ({_describe(exc)}); retry later"
        )
    if isinstance(exc, js.APIError):
        return ConfigurationError(
            f"NATS JetStream at {where} refused operation {operation_id!r} on {subject!r} "
            f"({_describe(exc)}); it was not stored: fix the message or the stream's limits"
        )
    if isinstance(
        exc,
        e.ConnectionClosedError | e.NoServersError | e.OutboundBufferLimitError,
    ):
        return BrokerUnavailable(
            f"NATS at {where}: operation {operation_id!r} was not sent to {subject!r} "
            f"({_describe(exc)}); retry when the server is back"
        )
    return PublishAmbiguous(
        f"NATS at {where}: no PubAck for operation {operation_id!r} on {subject!r} after "
        f"sending it ({_describe(exc)}); it may or may not be stored: retry with the SAME "
        "envelope (the stream's Nats-Msg-Id window drops the copy if it was)"
    )
