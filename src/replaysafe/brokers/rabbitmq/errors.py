"""aiormq / aio-pika exceptions -> the :class:`~replaysafe.errors.ReplaysafeError` tree, with the
URL's password scrubbed from the driver's text.

Declaring and inspecting: a queue that exists with other settings or a refused permission is a
``ConfigurationError`` (retrying cannot help), anything else ``BrokerUnavailable``. Connecting:
refused credentials are a ``ConfigurationError``, the rest ``BrokerUnavailable``. Publishing:
unroutable or a missing exchange is a ``BrokerError`` (nothing stored), a refused permission a
``ConfigurationError``, and every outcome that may have stored the message (a nack, no confirm in
time, a connection lost after sending) ``PublishAmbiguous``.
"""

from __future__ import annotations

from replaysafe.brokers.rabbitmq._driver import _driver_aiormq
from replaysafe.brokers.rabbitmq.config import RabbitMQConfig
from replaysafe.errors import BrokerError, BrokerUnavailable, ConfigurationError, PublishAmbiguous


class _Errors:
    """The error texts of one broker: knows its (redacted) URL, its password (to scrub from
    driver messages) and its queue type (to explain a declaration RabbitMQ refused)."""

    __slots__ = ("_password", "_queue_type", "_url")

    def __init__(self, config: RabbitMQConfig) -> None:
        self._password = config.password
        self._url = config.redacted_url
        self._queue_type = config.queue_type

    def scrub(self, text: str) -> str:
        """Remove the password from driver text (aio-pika masks its own URLs; other messages
        may not). A very short password is only removed where it sits in a URL, so that it does
        not blank out ordinary words."""
        pw = self._password
        if not pw:
            return text
        text = text.replace(f":{pw}@", ":***@")
        return text.replace(pw, "***") if len(pw) >= 4 else text

    def describe(self, exc: BaseException) -> str:
        return self.scrub(f"{type(exc).__name__}: {exc}")

    def declare_error(self, what: str, exc: BaseException) -> Exception:
        """The error for a failed declare, delete or passive declare of ``what``."""
        aiormq = _driver_aiormq()
        if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
            return ConfigurationError(
                f"RabbitMQ refused to declare {what} ({self.describe(exc)}): it already exists "
                f"with other settings (e.g. a different queue type than {self._queue_type!r}). "
                "Delete it, or configure RabbitMQBroker to match it"
            )
        if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
            return ConfigurationError(
                f"RabbitMQ refused access to {what} ({self.describe(exc)}); grant the user "
                f"configure/write/read permissions on it in {self._url}"
            )
        return BrokerUnavailable(
            f"could not declare {what} on {self._url} ({self.describe(exc)}); check that "
            "RabbitMQ is reachable, then retry"
        )

    def connect_error(self, exc: BaseException) -> Exception:
        """The error for a connection that could not be opened."""
        aiormq = _driver_aiormq()
        if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
            return ConfigurationError(
                f"RabbitMQ at {self._url} refused the credentials ({self.describe(exc)}); check "
                "the user and password in the URL"
            )
        return BrokerUnavailable(
            f"cannot connect to RabbitMQ at {self._url} ({self.describe(exc)}); check that "
            "the server runs and the URL is right, then retry"
        )

    def publish_error(
        self, exc: BaseException, *, what: str, where: str, target: str, confirm_timeout: float
    ) -> Exception:
        """The error for one publish of ``what`` (``"'op-id' to exchange 'x'"``) to ``where``
        that raised ``exc`` (``target``: the exchange, or the queue for a direct publish)."""
        aiormq = _driver_aiormq()
        if isinstance(exc, aiormq.exceptions.PublishError):
            frame = getattr(exc, "frame", None)
            reply = getattr(frame, "reply_text", "returned")
            return BrokerError(
                f"RabbitMQ returned {what} as unroutable ({reply}): no queue is bound, so "
                "nothing was stored. Declare the consumer groups first: "
                f"await broker.declare({target!r}, groups=[...])"
            )
        if isinstance(exc, aiormq.exceptions.DeliveryError):
            return PublishAmbiguous(
                f"RabbitMQ nacked {what} ({self.describe(exc)}): some queues may hold it; "
                "retry with the SAME operation id"
            )
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
            return BrokerError(
                f"RabbitMQ has no {where} ({self.describe(exc)}); nothing was stored. "
                "It was deleted after it was declared: declare it again"
            )
        if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
            return ConfigurationError(
                f"RabbitMQ refused to let this user publish to {where} "
                f"({self.describe(exc)}); grant write permission"
            )
        if isinstance(exc, TimeoutError):
            return PublishAmbiguous(
                f"no publisher confirm for {what} within {confirm_timeout}s; RabbitMQ "
                "may or may not have stored it: retry with the SAME operation id"
            )
        return PublishAmbiguous(
            f"the connection to {self._url} failed while publishing {what} "
            f"({self.describe(exc)}); it may have been stored: retry with the SAME "
            "operation id"
        )
