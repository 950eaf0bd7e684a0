"""The driver (aiobotocore, imported lazily) and how its errors map to the replaysafe error tree:
a missing queue, refused credentials or a refused request are ``ConfigurationError`` (waiting
will not fix them); throttling, 5xx and unreachable endpoints are ``BrokerUnavailable``."""

from __future__ import annotations

import importlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from replaysafe.errors import BrokerUnavailable, ConfigurationError, MissingExtra, ReplaysafeError

_MISSING_QUEUE = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})
_AUTH = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "InvalidSecurity",
        "ExpiredToken",
        "MissingAuthenticationToken",
        "IncompleteSignature",
    }
)
_THROTTLED = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "KmsThrottled",
    }
)
_CONFIG_BOTO_ERRORS: Final = (
    "NoCredentialsError",
    "PartialCredentialsError",
    "NoRegionError",
    "ParamValidationError",
    "ProfileNotFound",
    "InvalidRegionError",
    "UnknownServiceError",
)


@dataclass(frozen=True, slots=True)
class _Driver:
    get_session: Any
    config: Any
    client_error: type[BaseException]
    #: errors meaning the request or the local configuration is wrong (never retried)
    config_errors: tuple[type[BaseException], ...]
    #: botocore's wrappers of connection failures (``kwargs["error"]`` holds the cause)
    connect_timeout: type[BaseException]
    endpoint_error: type[BaseException]
    #: causes inside ``endpoint_error`` that happen while connecting, before any byte is sent
    connect_phase: tuple[type[BaseException], ...]
    #: every error the driver may raise for a failed call
    errors: tuple[type[BaseException], ...]


def _driver() -> _Driver:
    """Import aiobotocore lazily; a missing one names the extra to install."""
    try:
        session = importlib.import_module("aiobotocore.session")
        config = importlib.import_module("aiobotocore.config")
        exc = importlib.import_module("botocore.exceptions")
        aiohttp = importlib.import_module("aiohttp")
    except ImportError as error:
        raise MissingExtra("sqs", "aiobotocore") from error
    config_errors = tuple(
        t for n in _CONFIG_BOTO_ERRORS if isinstance(t := getattr(exc, n, None), type)
    )
    return _Driver(
        get_session=session.get_session,
        config=config.AioConfig,
        client_error=exc.ClientError,
        config_errors=config_errors,
        connect_timeout=exc.ConnectTimeoutError,
        endpoint_error=exc.EndpointConnectionError,
        connect_phase=(aiohttp.ClientConnectorError, socket.gaierror),
        errors=(exc.ClientError, exc.BotoCoreError, aiohttp.ClientError, OSError, TimeoutError),
    )


def _error_code(exc: BaseException) -> tuple[str, int, str]:
    """(code, HTTP status, message) of a botocore ``ClientError``."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    return (
        str(error.get("Code", "")),
        int(meta.get("HTTPStatusCode") or 0),
        str(error.get("Message", "")),
    )


def _retries(source: Any) -> int:
    meta = source.get("ResponseMetadata") if isinstance(source, Mapping) else None
    if meta is None:
        response = getattr(source, "response", None)
        meta = response.get("ResponseMetadata") if isinstance(response, Mapping) else None
    return int((meta or {}).get("RetryAttempts") or 0)


def _is_missing_queue(drv: _Driver, exc: BaseException | None) -> bool:
    """True when ``exc`` is SQS answering that the queue does not exist."""
    return isinstance(exc, drv.client_error) and _error_code(exc)[0] in _MISSING_QUEUE


def _map_error(drv: _Driver, exc: BaseException, what: str) -> ReplaysafeError:
    """Map a driver error to the error tree; ``what`` says which call failed where (``SQS
    ReceiveMessage on queue 'q' (endpoint … region …) failed``), the result adds what to do."""
    if isinstance(exc, drv.client_error):
        code, status, message = _error_code(exc)
        if code in _MISSING_QUEUE:
            return ConfigurationError(
                f"{what}: the queue does not exist; create it (SQSBroker.create_queue or "
                "your infrastructure code) or fix the name"
            )
        if code in _AUTH:
            return ConfigurationError(
                f"{what}: {code}: {message}; check the credentials and the IAM policy"
            )
        if status >= 500 or code in _THROTTLED:
            return BrokerUnavailable(
                f"{what}: {code or status}: {message}; SQS is overloaded or failing, retry later"
            )
        return ConfigurationError(
            f"{what}: SQS refused the request: {code}: {message}; check the queue's "
            "attributes and the request"
        )
    if isinstance(exc, drv.config_errors):
        return ConfigurationError(
            f"{what}: {type(exc).__name__}: {exc}; configure region and credentials"
        )
    return BrokerUnavailable(
        f"{what}: {type(exc).__name__}: {exc}; the endpoint is unreachable, retry later"
    )


def _not_sent(drv: _Driver, exc: BaseException) -> bool:
    """True when ``exc`` happened while connecting, before any byte of the request left.
    (aiobotocore wraps both connect failures and some mid-request connection errors in
    ``EndpointConnectionError``; only the cause tells them apart.)"""
    if isinstance(exc, drv.connect_timeout):
        return True
    cause = getattr(exc, "kwargs", {}).get("error")
    return isinstance(exc, drv.endpoint_error) and isinstance(cause, drv.connect_phase)
