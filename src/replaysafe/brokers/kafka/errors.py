"""The driver and its errors: loading confluent-kafka, and mapping what it raises or reports onto
the ``ReplaysafeError`` tree (which produce errors prove a record was NOT written, which admin
refusals are a considered "no" rather than an outage)."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from replaysafe.errors import BrokerUnavailable, ConfigurationError, MissingExtra, ReplaysafeError

if TYPE_CHECKING:
    from confluent_kafka import KafkaError

#: producer delivery errors that prove the record was NOT written (everything else is ambiguous)
_REFUSED_CODES = (
    "MSG_SIZE_TOO_LARGE",
    "_MSG_SIZE_TOO_LARGE",
    "INVALID_MSG_SIZE",
    "RECORD_LIST_TOO_LARGE",
    "INVALID_RECORD",
    "INVALID_MSG",
    "TOPIC_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED",
    "UNKNOWN_TOPIC_OR_PART",
    "_UNKNOWN_TOPIC",
    "_UNKNOWN_PARTITION",
    "TOPIC_EXCEPTION",
    "INVALID_REQUIRED_ACKS",
    "_INVALID_ARG",
    "_PURGE_QUEUE",  # purged before it was ever sent
)


def _driver() -> ModuleType:
    try:
        import confluent_kafka
        import confluent_kafka.admin  # a subpackage: not loaded by the package itself
    except ImportError as exc:
        raise MissingExtra("kafka", "confluent_kafka") from exc
    return confluent_kafka


def _error_name(err: object) -> str:
    name = getattr(err, "name", None)
    return str(name()) if callable(name) else type(err).__name__


def _kafka_error(exc: BaseException) -> KafkaError | None:
    """The ``KafkaError`` inside a ``KafkaException`` (or None)."""
    arg = exc.args[0] if exc.args else None
    return arg if arg is not None and hasattr(arg, "code") and hasattr(arg, "fatal") else None


def _not_written(err: KafkaError | str) -> bool:
    """True when a delivery report's error proves the record was NOT written (a refusal for
    good); False when it may have been (the publish outcome is ambiguous)."""
    return not isinstance(err, str) and _error_name(err) in _REFUSED_CODES


def _admin_failure(ck: ModuleType, exc: Exception, display: str) -> ReplaysafeError:
    """What an admin call's exception means: ``ConfigurationError`` for a broker's considered
    "no" (bad partition count, policy, replication factor, ACL), ``BrokerUnavailable`` for an
    outage (local and retriable errors, anything that is not a ``KafkaException``)."""
    if isinstance(exc, ck.KafkaException):
        err = _kafka_error(exc)
        if err is not None and not err.retriable() and not err.name().startswith("_"):
            return ConfigurationError(
                f"KafkaBroker: {display} refused the admin request: {exc}; fix the "
                "request (topic settings, permissions)"
            )
    return BrokerUnavailable(
        f"KafkaBroker: admin request to {display} failed: {exc}; check that the "
        "brokers run and this client may administer topics"
    )
