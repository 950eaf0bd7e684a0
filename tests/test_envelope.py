"""The envelope codec: operation ids, canonical JSON, fingerprints, decode limits, wire format.

Every refusal is checked three ways: the exact exception class (not just a ``BadInput``), its
``reason`` (the quarantine reason the runtime will record) and a phrase of the message that tells
the operator what to do next (errors.py: "every error says what happened and what to do next").
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replaysafe import _payload, envelope
from replaysafe.envelope import (
    BYTES,
    DEFAULT_LIMITS,
    HEADER_FINGERPRINT,
    HEADER_MALFORMED_TRANSPORT,
    HEADER_OPERATION_ID,
    HEADER_PUBLISHED_AT,
    JSON,
    MAX_OPERATION_ID_BYTES,
    RESERVED_HEADERS,
    TEXT,
    Envelope,
    Limits,
    canonical_json,
    decode_json,
    decode_wire,
    fingerprint,
    fingerprint_bytes,
    format_time,
    operation_id,
    payload_fingerprint,
    validate_operation_id,
)
from replaysafe.errors import (
    BadInput,
    FingerprintMismatch,
    InvalidOperationId,
    LimitExceeded,
    MalformedHeader,
    MalformedPayload,
    OperationIdMismatch,
    PayloadTooLarge,
    UnsupportedContentType,
)
from replaysafe.quarantine import QuarantineReason as R

CAP = DEFAULT_LIMITS.max_payload_bytes
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
OP = "capture-payment:order-91827"


@contextmanager
def refused(cls: type[BadInput], reason: R, next_step: str) -> Iterator[pytest.ExceptionInfo[Any]]:
    """Expect exactly ``cls`` with ``reason``, and a message containing ``next_step``."""
    with pytest.raises(cls) as info:
        yield info
    exc = info.value
    assert type(exc) is cls, f"expected exactly {cls.__name__}, got {type(exc).__name__}: {exc}"
    assert exc.reason is reason
    assert isinstance(exc, BadInput)
    assert next_step in str(exc), f"message does not say what to do next: {exc}"


def nested_lists(depth: int, inner: str = "") -> bytes:
    return ("[" * depth + inner + "]" * depth).encode()


def nested_objects(depth: int) -> bytes:
    return ('{"a":' * depth + "1" + "}" * depth).encode()


def wire(op: str = OP, **extra: str) -> dict[str, str]:
    return {HEADER_OPERATION_ID: op, **extra}


# =========================================================================== operation ids


CONTROL_CHARS = {
    "NUL": "\x00",
    "LF": "\n",
    "CR": "\r",
    "TAB": "\t",
    "ESC": "\x1b",
    "DEL": "\x7f",
    "NEL": "\x85",
    "ZWSP-Cf": "\u200b",
    "ZWJ-Cf": "\u200d",
    "BOM-Cf": "\ufeff",
    "LINE-SEP-Zl": "\u2028",
    "PARA-SEP-Zp": "\u2029",
    "lone-surrogate-Cs": "\ud800",
}


class TestOperationId:
    def test_deterministic_namespace_and_parts(self) -> None:
        assert operation_id("capture-payment", "order-91827") == OP
        assert operation_id("capture-payment", "order-91827") == operation_id(
            "capture-payment", "order-91827"
        )
        assert operation_id("reserve-stock", "sku-7", 42) == "reserve-stock:sku-7:42"

    def test_colon_in_a_part_cannot_move_the_boundary(self) -> None:
        left = operation_id("a:b", "c")
        right = operation_id("a", "b:c")
        assert left != right
        assert left == "a%3Ab:c"
        assert right == "a:b%3Ac"

    def test_percent_is_escaped_so_an_escape_sequence_cannot_be_forged(self) -> None:
        # without escaping '%', the literal text "a%3Ab" would collide with the escaped "a:b"
        forged = operation_id("a%3Ab", "c")
        assert forged == "a%253Ab:c"
        assert forged != operation_id("a:b", "c")
        assert operation_id("ns", "100%") == "ns:100%25"

    @given(
        st.lists(st.text(alphabet="ab:%3A", max_size=6), min_size=2, max_size=4),
        st.lists(st.text(alphabet="ab:%3A", max_size=6), min_size=2, max_size=4),
    )
    @settings(max_examples=300, deadline=None)
    def test_different_tuples_never_collide(self, a: list[str], b: list[str]) -> None:
        if a != b:
            assert operation_id(*a) != operation_id(*b)
        else:
            assert operation_id(*a) == operation_id(*b)

    def test_an_int_part_and_its_decimal_text_are_one_operation(self) -> None:
        # issue 13 item 9c, decided: an operation id is text on the wire, so a part is its text.
        # A producer in another language (or a plain client setting rs-operation-id by hand)
        # derives the id from the same business field by formatting it; a Python int and the
        # JSON string "42" of that field must name the same operation, not two.
        assert operation_id("a", 42) == operation_id("a", "42") == "a:42"
        assert operation_id("a", -7) == "a:-7"
        # the same id from the header and from the extractor: accepted, no mismatch
        env = decode_wire(b'{"id": 42}', wire("a:42"), key_extractor=lambda v: ("a", v["id"]))
        assert env.operation_id == "a:42"
        # what still tells 42 from "42" apart is the payload: the fingerprint differs, so the two
        # bodies under one id are a key-reuse conflict, never two applications
        assert fingerprint({"id": 42}) != fingerprint({"id": "42"})

    def test_needs_at_least_one_business_part(self) -> None:
        with refused(
            InvalidOperationId, R.INVALID_OPERATION_ID, "needs at least one business part"
        ):
            operation_id("capture-payment")

    @pytest.mark.parametrize("bad", [True, False, 1.5, float("nan"), None, b"order", ["order"]])
    def test_refuses_parts_that_are_not_str_or_int(self, bad: Any) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "pass the business field's value"):
            operation_id("capture-payment", bad)

    @pytest.mark.parametrize("bad", [None, True, 2.0])
    def test_refuses_a_bad_namespace(self, bad: Any) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "pass the business field's value"):
            operation_id(bad, "order-1")

    def test_result_is_validated(self) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "derive a shorter id"):
            operation_id("ns", "x" * MAX_OPERATION_ID_BYTES)
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "use printable characters only"):
            operation_id("ns", "order\x00")
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "strip it at the producer"):
            operation_id("ns", "order ")


class TestValidateOperationId:
    @pytest.mark.parametrize(
        "good",
        [
            "a",
            OP,
            "a b",  # inner whitespace is visible and kept
            "x" * 255,
            "é" * 127,  # 254 bytes
            "tenant:acme/order:Zoë-😀",
        ],
    )
    def test_accepts(self, good: str) -> None:
        assert validate_operation_id(good) is good

    def test_empty(self) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "set the rs-operation-id header"):
            validate_operation_id("")

    @pytest.mark.parametrize("bad", [None, 123, b"capture-payment:1", ("a", "b"), 1.0])
    def test_not_a_string(self, bad: object) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "set the rs-operation-id header"):
            validate_operation_id(bad)

    @pytest.mark.parametrize(
        "bad",
        [
            "x" * 256,
            "é" * 128,  # only 128 characters, but 256 UTF-8 bytes
            "😀" * 64,  # 64 characters, 256 bytes
            "a" * 254 + "é",  # 256 bytes
        ],
        ids=["256-ascii", "128-e-acute", "64-emoji", "254-ascii+e-acute"],
    )
    def test_longer_than_255_utf8_bytes(self, bad: str) -> None:
        assert len(bad) <= 256
        assert len(bad.encode()) > MAX_OPERATION_ID_BYTES
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "derive a shorter id"):
            validate_operation_id(bad)

    @pytest.mark.parametrize("ch", list(CONTROL_CHARS.values()), ids=list(CONTROL_CHARS))
    def test_control_and_format_characters(self, ch: str) -> None:
        for bad in (f"order{ch}1", f"{ch}order", f"order{ch}"):
            with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "printable characters only"):
                validate_operation_id(bad)

    @pytest.mark.parametrize("bad", [" order", "order ", " ", "\u00a0order", "order\u3000"])
    def test_leading_or_trailing_whitespace(self, bad: str) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "strip it at the producer"):
            validate_operation_id(bad)


# =========================================================================== decode_json: size


class TestPayloadSize:
    def test_exactly_the_cap_is_accepted(self) -> None:
        body = b'"' + b"a" * (CAP - 2) + b'"'
        assert len(body) == CAP
        assert decode_json(body) == "a" * (CAP - 2)

    def test_one_byte_over_the_cap_is_refused(self) -> None:
        body = b'"' + b"a" * (CAP - 1) + b'"'
        with refused(PayloadTooLarge, R.PAYLOAD_TOO_LARGE, "store large data elsewhere"):
            decode_json(body)

    @pytest.mark.parametrize(
        "body",
        [b"{" * (CAP + 1), b"\xff" * (CAP + 1), b"NaN" + b" " * (CAP - 2), nested_lists(CAP)],
        ids=["invalid-json", "invalid-utf8", "nan", "deep-nesting"],
    )
    def test_size_is_checked_before_parsing(self, body: bytes) -> None:
        # each body is also bad in another way; the size cap must win because it is checked first
        assert len(body) > CAP
        with refused(PayloadTooLarge, R.PAYLOAD_TOO_LARGE, "send a reference"):
            decode_json(body)

    def test_nothing_parses_an_oversized_body(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def boom(*args: object, **kwargs: object) -> Any:
            raise AssertionError("an oversized body reached a parser")

        monkeypatch.setattr(_payload.json, "loads", boom)
        monkeypatch.setattr(_payload, "_check_depth", boom)
        with refused(PayloadTooLarge, R.PAYLOAD_TOO_LARGE, "send a reference"):
            decode_json(b"{" * (CAP + 1))
        with refused(PayloadTooLarge, R.PAYLOAD_TOO_LARGE, "send a reference"):
            decode_wire(b"{" * (CAP + 1), wire())

    def test_custom_small_limit(self) -> None:
        limits = Limits(max_payload_bytes=16)
        assert decode_json(b'{"a":"12345678"}', limits) == {"a": "12345678"}  # 16 bytes
        with refused(PayloadTooLarge, R.PAYLOAD_TOO_LARGE, "16-byte cap") as info:
            decode_json(b'{"a":"123456789"}', limits)  # 17 bytes
        assert "17 bytes" in str(info.value)
        with refused(PayloadTooLarge, R.PAYLOAD_TOO_LARGE, "store large data elsewhere"):
            decode_json(b"{{{{{{{{{{{{{{{{{", limits)  # 17 bytes of invalid JSON
        with refused(PayloadTooLarge, R.PAYLOAD_TOO_LARGE, "store large data elsewhere"):
            decode_wire(b"\x80" * 17, wire(), content_type=BYTES, limits=limits)


# =========================================================================== decode_json: syntax


class TestMalformedJson:
    @pytest.mark.parametrize(
        "body",
        [b'"\xff"', b"\xc3\x28", b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'{"a": "\xe2\x82"}'],
        ids=["ff", "bad-continuation", "overlong", "encoded-surrogate", "truncated"],
    )
    def test_invalid_utf8(self, body: bytes) -> None:
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "encode JSON bodies as UTF-8"):
            decode_json(body)

    @pytest.mark.parametrize(
        "body",
        [b"", b" ", b"{", b"}", b"{'a': 1}", b"[1,]", b'{"a" 1}', b'{"a":1,}', b"tru", b"01",
         b"1 2", b'"unterminated', b"\xef\xbb\xbf{}", b"[1] [2]", b'{"a":undefined}', b"+1"],
    )  # fmt: skip
    def test_syntax_errors(self, body: bytes) -> None:
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "fix the producer's encoder") as info:
            decode_json(body)
        assert "not valid JSON" in str(info.value)

    @pytest.mark.parametrize(
        "body",
        [
            b'{"a":1,"a":2}',
            b'{"a":1,"a":1}',  # same value twice is still ambiguous to other parsers
            b'{"x":{"b":1,"b":2}}',
            b'[{"ok":1},{"k":1,"k":2}]',
            b'{"outer":[[{"deep":{"z":0,"y":1,"z":2}}]]}',
            b'{"a":1,"\\u0061":2}',  # the same key spelled with an escape
        ],
        ids=["top", "same-value", "nested-object", "in-list", "deep", "escaped-spelling"],
    )
    def test_duplicate_keys(self, body: bytes) -> None:
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send each key once"):
            decode_json(body)

    def test_same_key_in_sibling_objects_is_fine(self) -> None:
        assert decode_json(b'[{"a":1},{"a":2}]') == [{"a": 1}, {"a": 2}]

    @pytest.mark.parametrize(
        "body",
        [b"NaN", b"Infinity", b"-Infinity", b'{"x":NaN}', b"[1,Infinity]", b'{"y":-Infinity}'],
    )
    def test_nan_and_infinity_literals(self, body: bytes) -> None:
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send finite numbers only"):
            decode_json(body)

    @pytest.mark.parametrize(
        "body", [b"1e999", b"-1e999", b"1E400", b"[0.5, 1e309]", b'{"a":2e308}']
    )
    def test_float_overflow_to_infinity(self, body: bytes) -> None:
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send finite numbers only") as info:
            decode_json(body)
        assert "overflows to infinity" in str(info.value)

    def test_large_but_finite_and_underflowing_floats_are_accepted(self) -> None:
        assert decode_json(b"1e308") == 1e308
        assert decode_json(b"-1.7976931348623157e308") == -1.7976931348623157e308
        assert decode_json(b"1e-999") == 0.0

    def test_escaped_quotes_inside_strings(self) -> None:
        body = rb'{"a":"say \"hi\" [{","b\"[":"\\","c":["]\\\"}"]}'
        assert decode_json(body) == {"a": 'say "hi" [{', 'b"[': "\\", "c": [']\\"}']}

    def test_unicode_escapes_decode_to_text(self) -> None:
        assert decode_json(b'"Zo\\u00eb \\ud83d\\ude00"') == "Zoë 😀"
        assert decode_json('"Zoë 😀"'.encode()) == "Zoë 😀"


# =========================================================================== decode_json: integers


class TestIntegers:
    @pytest.mark.parametrize("n", [0, -1, INT64_MAX, INT64_MIN, 10**18, -(10**18)])
    def test_int64_range_is_accepted(self, n: int) -> None:
        assert decode_json(str(n).encode()) == n
        assert decode_json(f'{{"n":[{n}]}}'.encode()) == {"n": [n]}

    @pytest.mark.parametrize(
        "n", [INT64_MAX + 1, INT64_MIN - 1, 2**64, -(2**64), 10**40, -(10**40), 10**41]
    )
    def test_beyond_int64_is_refused(self, n: int) -> None:
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "send it as a string") as info:
            decode_json(f'{{"amount":{n}}}'.encode())
        assert "64 bits" in str(info.value)

    @pytest.mark.parametrize("sign", ["", "-"])
    def test_a_million_digit_integer_is_refused(self, sign: str) -> None:
        # must be refused by the digit-count bound, not by int() (which would raise ValueError past
        # sys.get_int_max_str_digits, or burn CPU converting)
        body = (sign + "9" * 10**6).encode()
        assert len(body) <= CAP
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "send it as a string"):
            decode_json(body)
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "send it as a string"):
            decode_json(b'{"n":[' + body + b"]}")

    def test_custom_int_bits(self) -> None:
        limits = Limits(max_int_bits=32)
        assert decode_json(str(2**31 - 1).encode(), limits) == 2**31 - 1
        assert decode_json(str(-(2**31)).encode(), limits) == -(2**31)
        for n in (2**31, -(2**31) - 1):
            with refused(LimitExceeded, R.LIMIT_EXCEEDED, "send it as a string") as info:
                decode_json(str(n).encode(), limits)
            assert "32 bits" in str(info.value)


# =========================================================================== decode_json: nesting


class TestNesting:
    def test_64_levels_accepted(self) -> None:
        value = decode_json(nested_lists(64))
        depth = 0
        while isinstance(value, list):
            depth += 1
            value = value[0] if value else None
        assert depth == 64
        assert decode_json(nested_objects(64)) is not None

    @pytest.mark.parametrize(
        "body", [nested_lists(65), nested_objects(65)], ids=["lists", "objects"]
    )
    def test_65_levels_refused(self, body: bytes) -> None:
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "flatten the structure") as info:
            decode_json(body)
        assert "64 levels" in str(info.value)

    def test_mixed_objects_and_lists(self) -> None:
        ok = ('{"a":[' * 32 + "1" + "]}" * 32).encode()  # 64 levels
        bad = ('{"a":[' * 32 + "[1]" + "]}" * 32).encode()  # 65 levels
        assert decode_json(ok) is not None
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "flatten the structure"):
            decode_json(bad)

    def test_brackets_inside_strings_do_not_count(self) -> None:
        noise = '"[[[[{{{{" , "\\"[[[[" , "\\\\" , "{\\"[\\"}"'  # includes escaped quotes/backslash
        body = nested_lists(64, ", ".join([noise] * 20))
        value = decode_json(body)
        for _ in range(63):
            value = value[0]
        assert value[:4] == ["[[[[{{{{", '"[[[[', "\\", '{"["}']

    def test_closing_brackets_inside_strings_do_not_hide_depth(self) -> None:
        body = nested_lists(65, '"]]]]]]]]]]", "}}}}}}}}"')
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "flatten the structure"):
            decode_json(body)

    @pytest.mark.parametrize(
        "body",
        [nested_lists(100_000), b"[" * 100_000, nested_objects(100_000), b'{"a":' * 100_000],
        ids=["lists", "unclosed-lists", "objects", "unclosed-objects"],
    )
    def test_100k_deep_refused_without_recursion_error(self, body: bytes) -> None:
        # exact class LimitExceeded: a RecursionError would fail this test
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "flatten the structure"):
            decode_json(body)

    def test_recursion_error_inside_the_parser_becomes_limit_exceeded(self) -> None:
        # a limit higher than the interpreter can recurse: the parser's RecursionError is mapped
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "flatten the structure"):
            decode_json(nested_lists(100_000), Limits(max_depth=1_000_000))

    def test_custom_depth(self) -> None:
        limits = Limits(max_depth=3)
        assert decode_json(b'[{"a":[1]}]', limits) == [{"a": [1]}]
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "3 levels"):
            decode_json(b'[{"a":[[1]]}]', limits)

    def test_many_unclosed_quotes_are_scanned_in_linear_time(self) -> None:
        # regression: the depth pre-scan blanked strings with a backtracking regex that restarted at
        # every quote of an unterminated string (quadratic: ~30 s for 80 KB, hours for 1 MiB)
        body = b"[" * 65 + b'"' + b'\\"' * 400_000
        assert len(body) <= CAP
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "flatten the structure"):
            decode_json(body)
        # the same shape under the limit: the unterminated string is blanked up to the end of the
        # text in one pass, the depth check passes and the parser refuses the syntax
        body = b"[" * 64 + b'"{' + b'\\"' * 400_000
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "not valid JSON"):
            decode_json(body)


# =========================================================================== canonical form


class TestCanonicalJson:
    def test_sorted_compact_utf8(self) -> None:
        assert canonical_json({"b": 1, "a": [True, None, 1.5, "x"]}) == (
            b'{"a":[true,null,1.5,"x"],"b":1}'
        )

    def test_key_order_independent(self) -> None:
        one = {"b": {"y": 2, "x": 1}, "a": [{"d": 4, "c": 3}]}
        two = {"a": [{"c": 3, "d": 4}], "b": {"x": 1, "y": 2}}
        assert list(one) != list(two)
        assert canonical_json(one) == canonical_json(two)
        assert fingerprint(one) == fingerprint(two)

    def test_whitespace_and_spelling_independent(self) -> None:
        compact = b'{"a":[1,2],"b":{"c":"d\xc3\xab"}}'
        spaced = b'\n {\t"b" : { "c" : "d\\u00eb" } ,\r\n  "a" : [ 1 , 2 ]\n}\n '
        assert fingerprint(decode_json(compact)) == fingerprint(decode_json(spaced))
        assert canonical_json(decode_json(spaced)) == compact

    def test_fingerprint_is_sha256_of_the_canonical_bytes(self) -> None:
        digest = hashlib.sha256(b'{"amount":100,"order":"91827"}').hexdigest()
        assert fingerprint({"order": "91827", "amount": 100}) == f"sha256:{digest}"
        assert fingerprint_bytes(b"raw") == "sha256:" + hashlib.sha256(b"raw").hexdigest()

    def test_non_ascii_kept_as_utf8(self) -> None:
        out = canonical_json({"name": "Zoë", "emoji": "😀", "cjk": "注文"})
        assert out == '{"cjk":"注文","emoji":"😀","name":"Zoë"}'.encode()
        assert b"\\u" not in out

    def test_different_values_give_different_fingerprints(self) -> None:
        values: list[Any] = [
            1, "1", 1.5, True, None, "", [], {}, [1, 2], [2, 1], {"a": None}, {"a": 1},
            {"a": "1"}, {"a": 1, "b": 2}, "a", "a ", "A", {"a": [1]}, [[1]], "Zoë", "Zoe",
        ]  # fmt: skip
        fps = [fingerprint(v) for v in values]
        assert len(set(fps)) == len(values)

    @pytest.mark.parametrize(
        "bad",
        [float("nan"), float("inf"), float("-inf"), {"x": [float("nan")]}, {1: "a", "1": "b"},
         {1, 2}, object(), b"bytes", {"when": datetime(2026, 1, 1)}],
        ids=["nan", "inf", "-inf", "nested-nan", "mixed-keys", "set", "object", "bytes",
             "datetime"],
    )  # fmt: skip
    def test_values_json_cannot_carry_are_refused(self, bad: Any) -> None:
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send JSON-native values only"):
            canonical_json(bad)
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send JSON-native values only"):
            fingerprint(bad)

    def test_lone_surrogate_is_refused_not_a_unicode_error(self) -> None:
        # decode_json accepts the escape "\ud800"; canonical_json must refuse it as bad input
        # instead of leaking a UnicodeEncodeError (which the runtime would retry, not quarantine)
        value = decode_json(b'{"a":"\\ud800"}')
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send valid Unicode text"):
            canonical_json(value)
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send valid Unicode text"):
            decode_wire(b'{"a":"\\ud800"}', wire())


# =========================================================================== decode_wire: limits


class TestWireLimits:
    def test_header_count(self) -> None:
        headers = wire(**{f"h{i}": "v" for i in range(63)})
        assert len(headers) == 64
        assert decode_wire(b"{}", headers).operation_id == OP
        headers["h63"] = "v"
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "send fewer headers") as info:
            decode_wire(b"{}", headers)
        assert "65 headers" in str(info.value)

    def test_header_count_flood(self) -> None:
        headers = wire(**{f"h{i}": "" for i in range(100_000)})
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "send fewer headers"):
            decode_wire(b"{}", headers)
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "over the limit of 2"):
            decode_wire(b"{}", wire(a="1", b="2"), limits=Limits(max_headers=2))

    def test_header_bytes(self) -> None:
        base = len(HEADER_OPERATION_ID) + len(OP) + len("h")
        headers = wire(h="a" * (DEFAULT_LIMITS.max_header_bytes - base))
        assert decode_wire(b"{}", headers).headers == {"h": headers["h"]}
        headers["h"] += "a"
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "move large values into the payload") as info:
            decode_wire(b"{}", headers)
        assert f"{DEFAULT_LIMITS.max_header_bytes + 1} bytes" in str(info.value)

    def test_header_bytes_count_utf8_bytes_not_characters(self) -> None:
        # 9000 characters but 18000 bytes: over the 16 KiB byte limit
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "move large values into the payload"):
            decode_wire(b"{}", wire(note="é" * 9000))

    def test_header_flood_refused_before_the_body_is_looked_at(self) -> None:
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "move large values into the payload"):
            decode_wire(b"{" * (CAP + 1), wire(big="x" * 20_000))

    def test_oversized_body_refused_for_every_content_type(self) -> None:
        for ctype in (JSON, TEXT, BYTES, "application/x-python-pickle"):
            with refused(PayloadTooLarge, R.PAYLOAD_TOO_LARGE, "send a reference"):
                decode_wire(b"\x00" * (CAP + 1), wire(), content_type=ctype)


# =========================================================================== decode_wire: types


PICKLE = pickle.dumps({"amount": 100})


class TestContentTypes:
    @pytest.fixture
    def no_parsers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def boom(*args: object, **kwargs: object) -> Any:
            raise AssertionError("a disallowed body reached a parser")

        monkeypatch.setattr(pickle, "loads", boom)
        monkeypatch.setattr(_payload.json, "loads", boom)
        monkeypatch.setattr(envelope, "decode_json", boom)

    @pytest.mark.parametrize(
        "ctype",
        [
            "application/x-python-pickle",
            "application/python-pickle",
            "application/x-msgpack",
            "APPLICATION/X-PYTHON-PICKLE",
            "application/x-python-pickle; protocol=5",
            "application/xml",
            "application/json-seq",
        ],
    )
    @pytest.mark.usefixtures("no_parsers")
    def test_unsupported_refused_before_any_parsing(self, ctype: str) -> None:
        with refused(UnsupportedContentType, R.UNSUPPORTED_CONTENT_TYPE, "send application/json"):
            decode_wire(PICKLE, wire(), content_type=ctype)
        with refused(UnsupportedContentType, R.UNSUPPORTED_CONTENT_TYPE, "never decoded"):
            decode_wire(PICKLE, wire(**{"content-type": ctype}))

    @pytest.mark.parametrize(
        "ctype", ["application/json; charset=utf-8", "Application/JSON", " application/json ;x=1"]
    )
    def test_json_with_parameters_or_case(self, ctype: str) -> None:
        env = decode_wire(b'{"a": 1}', wire(), content_type=ctype)
        assert env.value == {"a": 1}
        assert env.content_type == ctype
        assert env.fingerprint == fingerprint({"a": 1})
        env = decode_wire(b'{"a": 1}', wire(**{"content-type": ctype}))
        assert env.value == {"a": 1}
        assert "content-type" not in env.headers

    def test_json_is_the_default(self) -> None:
        env = decode_wire(b'{"b":2, "a":1}', wire())
        assert env.content_type == JSON
        assert env.value == {"a": 1, "b": 2}
        assert env.payload == b'{"b":2, "a":1}'  # the body as received
        assert env.fingerprint == fingerprint({"a": 1, "b": 2})  # over the canonical form
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "encode JSON bodies as UTF-8"):
            decode_wire(PICKLE, wire())

    def test_json_limits_apply_on_the_wire(self) -> None:
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send each key once"):
            decode_wire(b'{"a":1,"a":2}', wire())
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "flatten the structure"):
            decode_wire(nested_lists(65), wire())
        with refused(LimitExceeded, R.LIMIT_EXCEEDED, "send it as a string"):
            decode_wire(str(2**63).encode(), wire())
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send finite numbers only"):
            decode_wire(b"[NaN]", wire())

    def test_text_plain(self) -> None:
        body = "héllo {not json".encode()
        env = decode_wire(body, wire(), content_type="text/plain; charset=utf-8")
        assert env.value == "héllo {not json"
        assert env.fingerprint == fingerprint_bytes(body)
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "encode text bodies as UTF-8"):
            decode_wire(b"caf\xe9", wire(), content_type=TEXT)

    def test_octet_stream(self) -> None:
        body = b"\x00\xff\x80{"
        env = decode_wire(body, wire(), content_type=BYTES)
        assert env.value == body
        assert type(env.value) is bytes
        assert env.fingerprint == fingerprint_bytes(body)

    def test_allowed_types_are_configurable(self) -> None:
        limits = Limits(allowed_content_types=frozenset({JSON}))
        with refused(UnsupportedContentType, R.UNSUPPORTED_CONTENT_TYPE, "send application/json"):
            decode_wire(b"hi", wire(), content_type=TEXT, limits=limits)


# =========================================================================== decode_wire: identity


class TestWireOperationId:
    def test_from_header(self) -> None:
        assert decode_wire(b"{}", wire()).operation_id == OP

    def test_a_header_that_agrees_with_the_key_extractor_is_accepted(self) -> None:
        env = decode_wire(
            b'{"order":"order-91827"}',
            wire(),
            key_extractor=lambda v: ("capture-payment", v["order"]),
        )
        assert env.operation_id == OP

    @pytest.mark.parametrize(
        ("header", "body"),
        [("job:45", b'{"id": 9016}'), ("custom:9017", b'{"id": 9017}')],
        ids=["other-operation", "other-namespace"],
    )
    def test_a_header_that_disagrees_with_the_key_extractor_is_refused(
        self, header: str, body: bytes
    ) -> None:
        # issue 13 item 15: the header used to win unchecked, applying one message under another
        # operation's id (which then refused the real one as a key-reuse conflict)
        with refused(
            OperationIdMismatch, R.OPERATION_ID_MISMATCH, "fix the producer's header"
        ) as info:
            decode_wire(body, wire(header), key_extractor=lambda v: ("job", v["id"]))
        assert header in str(info.value) and "the extractor decides" in str(info.value)

    def test_an_invalid_header_is_refused_even_when_the_extractor_decides(self) -> None:
        with refused(OperationIdMismatch, R.OPERATION_ID_MISMATCH, "fix the producer's header"):
            decode_wire(b'{"id": 1}', wire("job:1\x00"), key_extractor=lambda v: ("job", v["id"]))

    @pytest.mark.parametrize(
        ("ctype", "body", "received"),
        [
            (None, b'{"id": 7}', {"id": 7}),
            (JSON, b"[7]", [7]),
            (JSON, b'"7"', "7"),
            (JSON, b"7", 7),
            (TEXT, b"7", "7"),
            ("text/plain; charset=utf-8", "\u00e9".encode(), "\u00e9"),
            (BYTES, b"\x007", b"\x007"),
        ],
        ids=["json-default", "json-list", "json-str", "json-int", "text", "text-param", "bytes"],
    )
    def test_what_the_extractor_receives_per_content_type(
        self, ctype: str | None, body: bytes, received: Any
    ) -> None:
        seen: list[Any] = []

        def extractor(value: Any) -> str:
            seen.append(value)
            return "op-1"

        decode_wire(body, {}, content_type=ctype, key_extractor=extractor)
        assert seen == [received] and type(seen[0]) is type(received)

    def test_an_extractor_failure_names_the_content_type_and_the_python_type(self) -> None:
        # issue 13 item 9b: a text/plain body reaches a dict-minded extractor as a str
        with refused(
            InvalidOperationId, R.INVALID_OPERATION_ID, "fix the producer's content type"
        ) as info:
            decode_wire(b'{"id": 3}', {}, content_type=TEXT, key_extractor=lambda v: v["id"])
        msg = str(info.value)
        assert "content type text/plain" in msg and "received a str" in msg, msg
        assert "text/plain: str" in msg  # and says what each content type decodes to
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "received a bytes"):
            decode_wire(b"\x00", {}, content_type=BYTES, key_extractor=lambda v: v["id"])

    def test_extractor_returning_a_string(self) -> None:
        seen: list[Any] = []

        def extractor(value: Any) -> str:
            seen.append(value)
            return f"capture-payment:{value['order']}"

        env = decode_wire(b'{"order":"order-91827"}', {}, key_extractor=extractor)
        assert env.operation_id == OP
        assert seen == [{"order": "order-91827"}]  # the extractor sees the decoded value

    def test_extractor_returning_a_tuple(self) -> None:
        env = decode_wire(
            b'{"order":"a:b","line":3}',
            {},
            key_extractor=lambda v: ("capture-payment", v["order"], v["line"]),
        )
        assert env.operation_id == operation_id("capture-payment", "a:b", 3)
        assert env.operation_id == "capture-payment:a%3Ab:3"

    @pytest.mark.parametrize(
        ("derived", "next_step"),
        [
            ((), "return a str or a tuple"),
            (None, "return a str or a tuple"),
            (("capture-payment",), "needs at least one business part"),
            (("capture-payment", None), "pass the business field's value"),
            ("", "set the rs-operation-id header"),
            (42, "set the rs-operation-id header"),
            ("order\n1", "printable characters only"),
            (" order-1", "strip it at the producer"),
            ("x" * 300, "derive a shorter id"),
        ],
        ids=["empty-tuple", "none", "namespace-only", "none-part", "empty-str", "int",
             "newline", "whitespace", "too-long"],
    )  # fmt: skip
    def test_extractor_returning_something_unusable(self, derived: Any, next_step: str) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, next_step):
            decode_wire(b"{}", {}, key_extractor=lambda v: derived)

    def test_extractor_that_raises(self) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "make it accept") as info:
            decode_wire(b'{"other":1}', {}, key_extractor=lambda v: v["order"])
        assert "KeyError" in str(info.value)
        assert isinstance(info.value.__cause__, KeyError)

    def test_no_header_and_no_extractor(self) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, "set the header at the producer"):
            decode_wire(b'{"order":"91827"}', {})

    @pytest.mark.parametrize(
        ("op", "next_step"),
        [
            ("", "set the rs-operation-id header"),
            ("order\x001", "printable characters only"),
            ("order\u200b1", "printable characters only"),
            ("order-1 ", "strip it at the producer"),
            ("é" * 128, "derive a shorter id"),
        ],
    )
    def test_invalid_header_value(self, op: str, next_step: str) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, next_step):
            decode_wire(b"{}", wire(op))


class TestWireFingerprint:
    def test_match_accepted(self) -> None:
        fp = fingerprint({"a": 1, "b": [1, 2]})
        env = decode_wire(b'{"b":[1,2],"a":1}', wire(**{HEADER_FINGERPRINT: fp}))
        assert env.fingerprint == fp

    def test_match_is_recomputed_over_the_canonical_form(self) -> None:
        fp = fingerprint({"a": 1, "b": "ë"})
        body = b'{ "b" : "\\u00eb",\n  "a" : 1 }'
        assert decode_wire(body, wire(**{HEADER_FINGERPRINT: fp})).fingerprint == fp

    @pytest.mark.parametrize(
        "sent",
        [fingerprint({"a": 2}), "sha256:" + "0" * 64, "garbage", "", fingerprint({"a": 1}).upper()],
    )
    def test_mismatch(self, sent: str) -> None:
        with refused(FingerprintMismatch, R.FINGERPRINT_MISMATCH, "omit the header"):
            decode_wire(b'{"a":1}', wire(**{HEADER_FINGERPRINT: sent}))

    def test_tampered_body(self) -> None:
        env = Envelope.of(OP, {"amount": 100})
        with refused(FingerprintMismatch, R.FINGERPRINT_MISMATCH, "fingerprint the canonical JSON"):
            decode_wire(b'{"amount":1000}', env.wire_headers())

    def test_non_json_fingerprint_covers_raw_bytes(self) -> None:
        body = b"hello"
        ok = wire(**{HEADER_FINGERPRINT: fingerprint_bytes(body)})
        assert decode_wire(body, ok, content_type=TEXT).value == "hello"
        with refused(FingerprintMismatch, R.FINGERPRINT_MISMATCH, "omit the header"):
            decode_wire(b"hellO", ok, content_type=TEXT)


class TestPayloadFingerprint:
    """issue 13 item 3: one fingerprint of (body, content type), the same default content type
    everywhere. A plain client sends no content type; the runtime decoded such a body as JSON and
    fingerprinted the canonical form while redrive hashed the raw bytes."""

    @pytest.mark.parametrize(
        "ctype", [None, "", JSON, "application/json; charset=utf-8", "Application/JSON"]
    )
    def test_json_and_no_content_type_fingerprint_the_canonical_form(
        self, ctype: str | None
    ) -> None:
        body = b'{ "b": [1, 2],\n  "a": "\\u00eb" }'
        want = fingerprint({"a": "ë", "b": [1, 2]})
        assert payload_fingerprint(body, ctype) == want
        assert decode_wire(body, wire(), content_type=ctype).fingerprint == want
        assert (
            decode_wire(body, wire(), content_type=ctype, check_fingerprint=False).fingerprint
            == want
        )

    @pytest.mark.parametrize("ctype", [TEXT, "text/plain; charset=utf-8", BYTES])
    def test_other_content_types_fingerprint_the_bytes(self, ctype: str) -> None:
        body = b'{ "a": 1 }'
        assert payload_fingerprint(body, ctype) == fingerprint_bytes(body)
        assert decode_wire(body, wire(), content_type=ctype).fingerprint == fingerprint_bytes(body)

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=3), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        st.sampled_from([None, JSON, "application/json; charset=utf-8"]),
        st.booleans(),
    )
    @settings(max_examples=200, deadline=None)
    def test_equals_the_runtime_decode_for_any_json(
        self, value: Any, ctype: str | None, pretty: bool
    ) -> None:
        body = json.dumps(value, indent=2 if pretty else None, ensure_ascii=pretty).encode()
        assert (
            payload_fingerprint(body, ctype)
            == decode_wire(body, wire(), content_type=ctype).fingerprint
        )

    @pytest.mark.parametrize(
        ("body", "next_step"),
        [(b"{oops", "fix the producer's encoder"), (b"[" * 100_000, "fix the producer's encoder"),
         (b'{"a":1,"a":2}', "send each key once"), (b"[NaN]", "send finite numbers only"),
         (b"\xff", "fix the producer's encoder")],
        ids=["syntax", "deep", "duplicate-key", "nan", "utf-8"],
    )  # fmt: skip
    def test_unparseable_json_is_malformed(self, body: bytes, next_step: str) -> None:
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, next_step):
            payload_fingerprint(body, None)


class TestWirePublishedAt:
    EXPECTED = datetime(2026, 11, 26, 14, 31, 47, 123456, tzinfo=UTC).timestamp()

    @pytest.mark.parametrize(
        "sent",
        [
            "2026-11-26T14:31:47.123456Z",
            "2026-11-26T14:31:47.123456+00:00",
            "2026-11-26T16:31:47.123456+02:00",
            "2026-11-26T09:31:47.123456-05:00",
        ],
    )
    def test_parsed(self, sent: str) -> None:
        env = decode_wire(b"{}", wire(**{HEADER_PUBLISHED_AT: sent}), broker_timestamp=1.0)
        assert env.published_at == self.EXPECTED  # the header wins over the broker's timestamp

    @pytest.mark.parametrize(
        ("sent", "next_step"),
        [
            ("2026-11-26T14:31:47", "send UTC ending in 'Z'"),
            ("2026-11-26T14:31:47.123456", "send UTC ending in 'Z'"),
            ("2026-11-26", "send UTC ending in 'Z'"),
            ("yesterday", "send UTC such as"),
            ("", "send UTC such as"),
            ("2026-13-01T00:00:00Z", "send UTC such as"),
            ("1764167507", "send UTC such as"),
            # CPython 3.11 parsed these as the time before the NUL (issue 13, hostile input)
            ("2026-11-26T14:31:47Z\x00", "send UTC such as"),
            ("2026-11-26T14:31:47\x00Z", "send UTC such as"),
            ("2026-11-26T14:31:47Z\x00garbage", "send UTC such as"),
            ("2026-11-26T14:31:47\u00a0Z", "send UTC such as"),
        ],
    )
    def test_naive_or_garbage(self, sent: str, next_step: str) -> None:
        with refused(MalformedHeader, R.MALFORMED_HEADER, next_step):
            decode_wire(b"{}", wire(**{HEADER_PUBLISHED_AT: sent}))

    def test_broker_timestamp_fallback(self) -> None:
        assert decode_wire(b"{}", wire(), broker_timestamp=1764167507.5).published_at == (
            1764167507.5
        )
        assert decode_wire(b"{}", wire()).published_at is None


class TestWireHeaders:
    def test_reserved_and_content_type_stripped_user_headers_kept(self) -> None:
        headers = {
            HEADER_OPERATION_ID: OP,
            HEADER_FINGERPRINT: fingerprint({}),
            HEADER_PUBLISHED_AT: "2026-11-26T14:31:47Z",
            "content-type": JSON,
            "traceparent": "00-abc-def-01",
            "tenant": "acme",
        }
        env = decode_wire(b"{}", headers, key="order-91827")
        assert dict(env.headers) == {"traceparent": "00-abc-def-01", "tenant": "acme"}
        assert env.key == "order-91827"
        assert {
            HEADER_OPERATION_ID, HEADER_FINGERPRINT, HEADER_PUBLISHED_AT, HEADER_MALFORMED_TRANSPORT
        } == RESERVED_HEADERS  # fmt: skip


# =========================================================================== Envelope


class TestEnvelopeOf:
    @pytest.mark.parametrize("name", sorted(RESERVED_HEADERS))
    def test_refuses_reserved_header_names(self, name: str) -> None:
        # a producer programming error, not bad input from the wire: a plain ValueError (no reason)
        with pytest.raises(ValueError, match="reserved for replaysafe") as info:
            Envelope.of(OP, {}, headers={name: "x", "ok": "y"})
        assert type(info.value) is ValueError
        assert "pass the operation id and publish time as arguments" in str(info.value)

    @pytest.mark.parametrize(
        ("op", "next_step"),
        [
            ("", "set the rs-operation-id header"),
            ("a\nb", "printable characters only"),
            (" a", "strip it at the producer"),
            ("x" * 256, "derive a shorter id"),
            (None, "set the rs-operation-id header"),
        ],
    )
    def test_refuses_invalid_ids(self, op: Any, next_step: str) -> None:
        with refused(InvalidOperationId, R.INVALID_OPERATION_ID, next_step):
            Envelope.of(op, {})

    def test_refuses_unencodable_values(self) -> None:
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send JSON-native values only"):
            Envelope.of(OP, {"amount": float("nan")})

    def test_payload_is_canonical(self) -> None:
        env = Envelope.of(OP, {"b": "ë", "a": 1})
        assert env.payload == '{"a":1,"b":"ë"}'.encode()
        assert env.fingerprint == fingerprint_bytes(env.payload)
        assert env.content_type == JSON
        assert env.published_at is None
        assert HEADER_PUBLISHED_AT not in env.wire_headers()

    def test_with_published_at_keeps_the_first_stamp(self) -> None:
        env = Envelope.of(OP, {})
        first = env.with_published_at(100.0)
        assert first.published_at == 100.0
        assert first.with_published_at(200.0) is first
        assert first.operation_id == env.operation_id
        assert first.fingerprint == env.fingerprint

    @pytest.mark.parametrize(
        "ts",
        [
            datetime(2026, 11, 26, 14, 31, 47, 123456, tzinfo=UTC).timestamp(),
            datetime(2026, 11, 26, 14, 31, 47, 999999, tzinfo=UTC).timestamp(),
            datetime(2026, 11, 26, 14, 31, 47, 1, tzinfo=UTC).timestamp(),
            datetime(2000, 2, 29, 0, 0, 0, 0, tzinfo=UTC).timestamp(),
            0.0,
        ],
    )
    def test_round_trip_through_the_wire(self, ts: float) -> None:
        value = {"order": "91827", "amount": 100, "items": [{"sku": "Zoë-😀", "qty": 2}]}
        user = {"traceparent": "00-abc-def-01", "tenant": "acmé"}
        env = Envelope.of(OP, value, key="order-91827", headers=user, published_at=ts)
        headers = env.wire_headers()
        assert headers[HEADER_OPERATION_ID] == OP
        assert headers[HEADER_FINGERPRINT] == env.fingerprint
        assert headers[HEADER_PUBLISHED_AT].endswith("Z")
        assert headers[HEADER_PUBLISHED_AT] == format_time(ts)

        back = decode_wire(env.payload, headers, key="order-91827")
        assert back.operation_id == OP
        assert back.fingerprint == env.fingerprint
        assert back.value == value
        assert back.payload == env.payload
        assert back.key == "order-91827"
        assert dict(back.headers) == user
        assert back.published_at is not None
        assert abs(back.published_at - ts) < 1e-6
        expected = datetime.fromtimestamp(0, UTC) + timedelta(microseconds=round(ts * 1_000_000))
        assert datetime.fromtimestamp(back.published_at, UTC) == expected

    def test_published_at_in_another_zone_is_the_same_instant(self) -> None:
        cet = timezone(timedelta(hours=1))
        ts = datetime(2026, 11, 26, 15, 31, 47, 5, tzinfo=cet).timestamp()
        env = Envelope.of(OP, {}, published_at=ts)
        assert env.wire_headers()[HEADER_PUBLISHED_AT] == "2026-11-26T14:31:47.000005Z"


# =========================================================================== properties


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=INT64_MIN, max_value=INT64_MAX)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def shuffled_keys(value: Any, rnd: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: shuffled_keys(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [shuffled_keys(v, rnd) for v in value]
    return value


class TestProperties:
    @given(json_values, st.randoms(use_true_random=False))
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_canonical_round_trip_and_stable_fingerprint(self, value: Any, rnd: random.Random):
        canonical = canonical_json(value)
        decoded = decode_json(canonical)
        assert decoded == value
        assert canonical_json(decoded) == canonical  # canonical form is a fixed point

        reordered = shuffled_keys(value, rnd)
        assert reordered == value
        assert fingerprint(reordered) == fingerprint(value)

        # any other spelling of the same document has the same fingerprint
        pretty = json.dumps(reordered, indent=2, ensure_ascii=True).encode()
        assert fingerprint(decode_json(pretty)) == fingerprint(value)

    @given(json_values)
    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def test_wire_round_trip(self, value: Any) -> None:
        env = Envelope.of(OP, value)
        back = decode_wire(env.payload, env.wire_headers())
        assert back.value == value
        assert back.fingerprint == env.fingerprint
        assert back.operation_id == OP


# =========================================================================== deferred fingerprint


class TestDeferredFingerprint:
    """``decode_wire(check_fingerprint=False)`` (the runtime outside effectively-once) skips the
    header check and computes the fingerprint only when it is read, from the payload bytes."""

    def test_unchecked_decode_ignores_the_header_and_fingerprints_on_demand(self) -> None:
        body = b'{"b": [1, 2], "a": "\xc3\xab"}'
        headers = {HEADER_OPERATION_ID: OP, HEADER_FINGERPRINT: "sha256:" + "0" * 64}
        with refused(FingerprintMismatch, R.FINGERPRINT_MISMATCH, "omit the header"):
            decode_wire(body, headers)
        env = decode_wire(body, headers, check_fingerprint=False)
        assert env._fingerprint is None  # not computed by the decode
        env.value["a"] = "mutated by a handler"  # the fingerprint covers the bytes, not this
        assert env.fingerprint == fingerprint({"a": "ë", "b": [1, 2]})
        assert env._fingerprint == env.fingerprint  # computed once, then kept

    @pytest.mark.parametrize(
        ("body", "ctype"), [(b"caf\xc3\xa9", TEXT), (b"\x00\xffraw", BYTES)], ids=["text", "bytes"]
    )
    def test_unchecked_non_json_fingerprints_the_bytes(self, body: bytes, ctype: str) -> None:
        env = decode_wire(
            body, {HEADER_OPERATION_ID: OP}, content_type=ctype, check_fingerprint=False
        )
        assert env.fingerprint == fingerprint_bytes(body)

    def test_unchecked_decode_still_refuses_a_lone_surrogate(self) -> None:
        with refused(MalformedPayload, R.MALFORMED_PAYLOAD, "send valid Unicode text"):
            decode_wire(b'{"a": "\\ud800"}', {HEADER_OPERATION_ID: OP}, check_fingerprint=False)

    def test_envelope_stays_immutable_comparable_and_picklable(self) -> None:
        env = Envelope.of(OP, {"a": 1}, key="k", headers={"h": "v"}, published_at=5.0)
        lazy = Envelope(OP, env.payload, {"a": 1}, None, JSON, "k", {"h": "v"}, 5.0)
        assert lazy == env  # equality reads the deferred fingerprint
        assert "fingerprint='sha256:" in repr(lazy)
        with pytest.raises(AttributeError, match="cannot assign"):
            env.operation_id = "other"
        back = pickle.loads(pickle.dumps(env))
        assert back == env and back.fingerprint == env.fingerprint
        assert Envelope(OP, b"{}", {}, None).headers == {}
