"""The SQS wire format and SQS's limits: how an envelope becomes a ``SendMessageBatch`` entry
(body text, String message attributes, FIFO group and deduplication ids), how entries are cut
into batches, and what SQS accepts. Pure functions: nothing here makes a request."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from replaysafe.envelope import Envelope
from replaysafe.errors import ConfigurationError

#: SQS limits
MAX_BATCH: Final = 10
MAX_ATTRIBUTES: Final = 10
MAX_VISIBILITY: Final = 43_200
MAX_WAIT_TIME: Final = 20
FIFO_DEDUP_WINDOW: Final = 300.0
DEFAULT_MAX_MESSAGE_BYTES: Final = 1_048_576

CONTENT_TYPE: Final = "content-type"
#: the ordering key, where the queue cannot carry it natively
HEADER_KEY: Final = "rs-key"
#: ``base64`` when the body had to be encoded to be valid SQS text
HEADER_BODY_ENCODING: Final = "rs-body-encoding"
#: why a message was rejected (on the dead-letter copy)
HEADER_REJECT_REASON: Final = "rs-reject-reason"
_TRANSPORT_HEADERS: Final = frozenset({HEADER_KEY, HEADER_BODY_ENCODING})

_SYSTEM_ATTRIBUTES: Final = [
    "ApproximateReceiveCount",
    "SentTimestamp",
    "MessageGroupId",
    "MessageDeduplicationId",
]

# SQS text: the XML character ranges SQS accepts in bodies and attribute values
_INVALID_TEXT = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$|^[A-Za-z0-9_-]{1,75}\.fifo$")
_ATTRIBUTE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")
# MessageGroupId / MessageDeduplicationId: alphanumerics and punctuation, 1..128
_GROUP_OR_DEDUP_ID = re.compile(r"""^[A-Za-z0-9!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]{1,128}$""")


@dataclass(slots=True)
class _Outgoing:
    """One validated ``SendMessageBatch`` entry and the envelope it carries."""

    envelope: Envelope
    params: dict[str, Any]
    size: int


def _check_queue_name(name: object) -> str:
    if not isinstance(name, str) or not _QUEUE_NAME.match(name):
        raise ConfigurationError(
            f"{name!r} is not a valid SQS queue name: use 1-80 letters, digits, '-' or '_' "
            "(FIFO queues end in '.fifo')"
        )
    return name


def _check_attribute(op: str, name: str, value: str) -> None:
    lowered = name.lower()
    if (
        not _ATTRIBUTE_NAME.match(name)
        or ".." in name
        or name.startswith(".")
        or name.endswith(".")
        or lowered.startswith(("aws.", "amazon."))
    ):
        raise ConfigurationError(
            f"operation {op!r}: header {name!r} cannot be an SQS message attribute name (letters, "
            "digits, '_', '-', '.', no leading/trailing or double '.', no 'AWS.'/'Amazon.' "
            "prefix); rename the header"
        )
    if not value:
        raise ConfigurationError(
            f"operation {op!r}: header {name!r} is empty and SQS refuses empty attribute values; "
            "omit the header or give it a value"
        )
    if _INVALID_TEXT.search(value):
        raise ConfigurationError(
            f"operation {op!r}: header {name!r} contains characters SQS does not accept in "
            "attribute values; encode the value (e.g. base64) or move it into the payload"
        )


def _body_text(payload: bytes) -> tuple[str, bool]:
    """The SQS body for ``payload`` and whether it had to be base64-encoded."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode("ascii"), True
    if _INVALID_TEXT.search(text):
        return base64.b64encode(payload).decode("ascii"), True
    return text, False


def _attribute_bytes(attributes: Mapping[str, Mapping[str, Any]]) -> int:
    total = 0
    for name, value in attributes.items():
        total += len(name.encode()) + len(str(value.get("DataType", "")).encode())
        total += len(str(value.get("StringValue", "")).encode("utf-8", "surrogatepass"))
        total += len(value.get("BinaryValue", b"") or b"")
    return total


def _timestamp(value: Any) -> float | None:
    try:
        return int(value) / 1000.0 if value is not None else None
    except (TypeError, ValueError):
        return None


def _outgoing(
    env: Envelope, index: int, *, fifo: bool, default_group: str, max_message_bytes: int
) -> _Outgoing:
    """Validate and encode one envelope as a ``SendMessageBatch`` entry for a FIFO or a standard
    queue (``ConfigurationError`` for what SQS would refuse: too many headers, bad attribute
    names or values, oversize)."""
    op = env.operation_id
    headers = env.wire_headers()
    headers[CONTENT_TYPE] = env.content_type
    clash = _TRANSPORT_HEADERS.intersection(headers)
    if clash:
        raise ConfigurationError(
            f"operation {op!r}: headers {sorted(clash)} are reserved by the SQS adapter; "
            "rename them"
        )
    body, encoded = _body_text(env.payload)
    if encoded:
        headers[HEADER_BODY_ENCODING] = "base64"
    params: dict[str, Any] = {"Id": str(index), "MessageBody": body}
    if fifo:
        group = default_group if env.key is None else env.key
        if not _GROUP_OR_DEDUP_ID.match(group):
            # not a valid MessageGroupId: group by its hash, carry the key itself as rs-key
            group = hashlib.sha256(group.encode("utf-8", "surrogatepass")).hexdigest()
            headers[HEADER_KEY] = str(env.key)
        params["MessageGroupId"] = group
        params["MessageDeduplicationId"] = (
            op
            if _GROUP_OR_DEDUP_ID.match(op)
            else hashlib.sha256(op.encode("utf-8", "surrogatepass")).hexdigest()
        )
    elif env.key is not None:
        headers[HEADER_KEY] = env.key
    if len(headers) > MAX_ATTRIBUTES:
        raise ConfigurationError(
            f"operation {op!r} needs {len(headers)} SQS message attributes "
            f"({', '.join(sorted(headers))}), over SQS's limit of {MAX_ATTRIBUTES}; "
            f"replaysafe uses up to {len(headers) - len(env.headers)} of them: send at most "
            f"{MAX_ATTRIBUTES - (len(headers) - len(env.headers))} headers of your own or "
            "move data into the payload"
        )
    attributes: dict[str, dict[str, str]] = {}
    for name, value in headers.items():
        _check_attribute(op, name, value)
        attributes[name] = {"DataType": "String", "StringValue": value}
    params["MessageAttributes"] = attributes
    size = len(body.encode("utf-8")) + _attribute_bytes(attributes)
    if size > max_message_bytes:
        raise ConfigurationError(
            f"operation {op!r} is {size} bytes on the wire, over the SQS message limit of "
            f"{max_message_bytes}; store the payload elsewhere (S3) and send a reference"
        )
    return _Outgoing(env, params, size)


def _chunks(entries: list[_Outgoing], max_message_bytes: int) -> list[list[_Outgoing]]:
    """``entries`` in order, cut into batches of at most ``MAX_BATCH`` entries and
    ``max_message_bytes`` bytes; renumbers each entry's ``Id`` within its batch."""
    chunks: list[list[_Outgoing]] = []
    current: list[_Outgoing] = []
    size = 0
    for e in entries:
        if current and (len(current) == MAX_BATCH or size + e.size > max_message_bytes):
            chunks.append(current)
            current, size = [], 0
        e.params["Id"] = str(len(current))
        current.append(e)
        size += e.size
    if current:
        chunks.append(current)
    return chunks
