"""SQSConfig: the SQS broker's settings as one frozen, validated value with one URL parser."""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

import pytest

from replaysafe.brokers.sqs import SQSConfig, SQSOptions
from replaysafe.errors import ConfigurationError
from replaysafe.failpoints import Failpoints

try:
    import aiobotocore  # noqa: F401
except ImportError:  # the broker needs its driver; the config alone does not
    HAS_DRIVER = False
else:
    HAS_DRIVER = True

needs_driver = pytest.mark.skipif(not HAS_DRIVER, reason="aiobotocore is not installed")


def test_frozen() -> None:
    config = SQSConfig(region="eu-west-1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.wait_time = 5  # type: ignore[misc]


def test_defaults_are_the_constructor_defaults() -> None:
    config = SQSConfig()
    assert (config.wait_time, config.visibility_timeout, config.delete_window) == (20, None, 0.01)
    assert (config.default_group, config.max_retries, config.max_message_bytes) == (
        "rs-no-key", 3, 1_048_576,
    )  # fmt: skip


def test_the_secret_stays_out_of_repr() -> None:
    config = SQSConfig(aws_access_key_id="AKID", aws_secret_access_key="s3cr3t",
                       aws_session_token="t0ken")  # fmt: skip
    assert "AKID" in repr(config)
    assert "s3cr3t" not in repr(config) and "t0ken" not in repr(config)


@pytest.mark.parametrize(
    ("options", "says", "todo"),
    [
        ({"wait_time": 25}, "wait_time must be whole seconds from 0 to 20", "pass an int"),
        ({"wait_time": 1.5}, "wait_time", "pass an int"),
        ({"visibility_timeout": 0}, "visibility_timeout must be whole seconds", "or None"),
        ({"delete_window": -1.0}, "delete_window must be >= 0", "pass 0"),
        ({"default_group": "no spaces allowed"}, "not a valid SQS MessageGroupId", "pick such"),
        ({"max_retries": 0}, "max_retries", "raise them"),
        ({"max_message_bytes": 10}, "max_message_bytes >= 1024", "raise them"),
        ({"endpoint_url": "http://k:s3cr3t@127.0.0.1:4566"}, "carries credentials",
         "pass them as aws_access_key_id"),
    ],
)  # fmt: skip
def test_bad_values_say_what_is_wrong_and_what_to_do(
    options: dict[str, Any], says: str, todo: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        SQSConfig(**options)
    assert says in str(info.value) and todo in str(info.value)
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "keywords"),
    [
        ("sqs://eu-west-1", {"region": "eu-west-1"}),
        ("sqs://", {}),
        ("sqs://sqs.eu-west-1.amazonaws.com", {"endpoint_url": "https://sqs.eu-west-1.amazonaws.com"}),
        ("sqs+http://k:s@127.0.0.1:4566/eu-west-1?wait_time=5&delete_window=0.5",
         {"endpoint_url": "http://127.0.0.1:4566", "region": "eu-west-1", "wait_time": 5,
          "delete_window": 0.5, "aws_access_key_id": "k", "aws_secret_access_key": "s"}),
        ("sqs+http://127.0.0.1:4566?visibility_timeout=60&default_group=g&max_retries=2",
         {"endpoint_url": "http://127.0.0.1:4566", "region": "us-east-1",
          "visibility_timeout": 60, "default_group": "g", "max_retries": 2}),
    ],
)  # fmt: skip
def test_from_url_equals_the_keyword_form(url: str, keywords: dict[str, Any]) -> None:
    assert SQSConfig.from_url(url) == SQSConfig(**keywords)


def test_from_url_overrides_win() -> None:
    fps = Failpoints()
    config = SQSConfig.from_url("sqs://eu-west-1?wait_time=5", wait_time=1, failpoints=fps)
    assert config == SQSConfig(region="eu-west-1", wait_time=1, failpoints=fps)


def test_from_url_validates_what_it_parsed() -> None:
    with pytest.raises(ConfigurationError, match="wait_time must be whole seconds"):
        SQSConfig.from_url("sqs://eu-west-1?wait_time=99")


def test_options_name_the_config_fields() -> None:
    """The broker's keyword typing (SQSOptions) and the config name the same options."""
    fields = {f.name: f.type for f in dataclasses.fields(SQSConfig)}
    assert set(get_type_hints(SQSOptions)) == set(fields)


@needs_driver
def test_broker_from_config_keywords_and_url_agree() -> None:
    from replaysafe.brokers.sqs import SQSBroker

    config = SQSConfig(region="eu-west-1", wait_time=5)
    assert SQSBroker(config=config).config is config
    assert SQSBroker(region="eu-west-1", wait_time=5).config == config
    assert SQSBroker.from_url("sqs://eu-west-1?wait_time=5").config == config


@needs_driver
def test_config_and_another_option_are_refused() -> None:
    from replaysafe.brokers.sqs import SQSBroker

    with pytest.raises(ConfigurationError) as info:
        SQSBroker(config=SQSConfig(region="eu-west-1"), wait_time=5)
    assert "wait_time" in str(info.value) and "pass one or the other" in str(info.value)


@needs_driver
def test_the_broker_constructor_still_validates() -> None:
    from replaysafe.brokers.sqs import SQSBroker

    with pytest.raises(ConfigurationError, match="wait_time must be whole seconds"):
        SQSBroker(region="eu-west-1", wait_time=21)
