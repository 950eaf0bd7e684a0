"""The broker's connection to SQS: two aiobotocore clients created on first use, every request
counted (``SQSBroker.api_calls``) and its driver errors mapped to the error tree."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from replaysafe.brokers.sqs.config import SQSConfig
from replaysafe.brokers.sqs.errors import _driver, _map_error, _retries
from replaysafe.errors import BrokerUnavailable, ConfigurationError, ReplaysafeError


class _Connection:
    """Owns the SQS clients and the request counts.

    ``client`` (receive, delete, visibility, metadata) lets botocore retry ``max_retries`` times;
    ``send_client`` (publishes) never retries, so a lost response is reported as ambiguous
    instead of hidden behind a retry. The driver is imported on construction (a missing extra
    fails there); the clients are created on the first call and closed by :meth:`aclose`, after
    which every call raises ``BrokerUnavailable``.
    """

    def __init__(self, config: SQSConfig, owner: Callable[[], str]) -> None:
        self._config = config
        #: the broker's repr, for errors after close
        self._owner = owner
        self._credentials = {
            k: v
            for k, v in (
                ("aws_access_key_id", config.aws_access_key_id),
                ("aws_secret_access_key", config.aws_secret_access_key),
                ("aws_session_token", config.aws_session_token),
            )
            if v is not None
        }
        # a long poll must never look like a read timeout
        self._read_timeout = max(config.read_timeout, config.wait_time + 10.0)
        self.drv = _driver()
        #: requests made, by kind (including the driver's own retries)
        self.calls: Counter[str] = Counter()
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._send_client: Any = None
        self._connect_lock = asyncio.Lock()
        self._closed = False

    @property
    def has_credentials(self) -> bool:
        return bool(self._credentials)

    async def clients(self) -> tuple[Any, Any]:
        """(client, send_client), connecting on first use."""
        if self._closed:
            raise BrokerUnavailable(
                f"{self._owner()} is closed; create a new SQSBroker to publish or consume"
            )
        if self._client is None:
            async with self._connect_lock:
                if self._client is None:
                    await self._connect()
        return self._client, self._send_client

    async def _connect(self) -> None:
        drv = self.drv
        conf = self._config
        session = drv.get_session()
        kwargs: dict[str, Any] = dict(self._credentials)
        if conf.region is not None:
            kwargs["region_name"] = conf.region
        if conf.endpoint_url is not None:
            kwargs["endpoint_url"] = conf.endpoint_url

        def config(attempts: int) -> Any:
            return drv.config(
                connect_timeout=conf.connect_timeout,
                read_timeout=self._read_timeout,
                max_pool_connections=conf.max_pool_connections,
                retries={"mode": "standard", "total_max_attempts": attempts},
            )

        stack = contextlib.AsyncExitStack()
        try:
            client = await stack.enter_async_context(
                session.create_client("sqs", config=config(conf.max_retries), **kwargs)
            )
            # publishes are never retried by the driver: a retry after a lost response would
            # hide the ambiguity (and a refusal after it would hide an accepted publish)
            send_client = await stack.enter_async_context(
                session.create_client("sqs", config=config(1), **kwargs)
            )
        except drv.errors as exc:
            await stack.aclose()
            raise ConfigurationError(
                f"cannot create an SQS client for {self.where()}: {type(exc).__name__}: {exc}; "
                "set region (and credentials or endpoint_url)"
            ) from None
        self._stack = stack
        self._client, self._send_client = client, send_client

    def where(self) -> str:
        conf = self._config
        return f"endpoint {conf.endpoint_url or 'AWS'} region {conf.region or '(default)'}"

    async def call(
        self, kind: str, operation: str, doing: str, queue: str | None, **params: Any
    ) -> dict[str, Any]:
        """One SQS request, counted in ``calls``; driver errors mapped to the error tree
        (``ConfigurationError`` for a missing queue, credentials or a refused request;
        ``BrokerUnavailable`` otherwise). Publishes use ``send_client`` directly instead."""
        client, _ = await self.clients()
        self.calls[kind] += 1
        try:
            response: dict[str, Any] = await getattr(client, operation)(**params)
        except self.drv.errors as exc:
            self.calls[kind] += _retries(exc)
            raise self.map(exc, doing, queue) from exc
        self.calls[kind] += _retries(response)
        return response

    def map(self, exc: BaseException, doing: str, queue: str | None) -> ReplaysafeError:
        """Map a driver error to the error tree, saying what happened and what to do."""
        where = f"queue {queue!r} ({self.where()})" if queue else self.where()
        return _map_error(self.drv, exc, f"SQS {doing} on {where} failed")

    async def aclose(self) -> None:
        """Close the clients; every later call raises ``BrokerUnavailable``."""
        self._closed = True
        if self._stack is not None:
            await self._stack.aclose()
        self._client = self._send_client = self._stack = None
