"""RabbitMQConfig: frozen, validated once, the one URL parser; the broker takes it as ``config=``.

No server needed: nothing here connects."""

from __future__ import annotations

import dataclasses

import pytest

from replaysafe.brokers.rabbitmq import RabbitMQBroker, RabbitMQConfig
from replaysafe.errors import ConfigurationError
from replaysafe.failpoints import Failpoints
from replaysafe.testing import FakeClock

pytest.importorskip("aio_pika")

URL = "amqp://app:s3cret@rabbit.example:5672/vh"


def test_config_is_frozen() -> None:
    config = RabbitMQConfig(url=URL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.queue_type = "classic"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.url = "amqp://other/"  # type: ignore[misc]


def test_defaults_are_the_constructor_defaults() -> None:
    config = RabbitMQConfig()
    assert config.url == "amqp://guest:guest@127.0.0.1:5672/"
    assert (config.queue_type, config.delivery_limit, config.management_url) == (
        "quorum",
        None,
        None,
    )
    assert (config.confirm_timeout, config.connect_timeout, config.reconnect_interval) == (
        10.0,
        10.0,
        1.0,
    )
    assert RabbitMQBroker().config == config


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"url": "http://u:s3cret@host/"}, "use amqp://user:password@host:5672/vhost"),
        ({"queue_type": "stream"}, "use 'quorum'"),
        ({"confirm_timeout": 0}, "pass a positive number of seconds"),
        ({"connect_timeout": -1.0}, "pass a positive number of seconds"),
        ({"reconnect_interval": float("nan")}, "pass a positive number of seconds"),
        ({"queue_type": "classic", "delivery_limit": 5}, "leave it None"),
        ({"delivery_limit": 0}, "a value >= 1"),
    ],
)
def test_bad_values_say_what_to_do(options: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as info:
        RabbitMQConfig(**options)  # type: ignore[arg-type]
    assert "s3cret" not in str(info.value)
    # the constructor refuses them the same way (validated in one place)
    with pytest.raises(ConfigurationError, match=says):
        RabbitMQBroker(**options)  # type: ignore[arg-type]


def test_from_url_equals_the_keyword_form() -> None:
    clock, failpoints = FakeClock(), Failpoints()
    opts = {
        "clock": clock,
        "failpoints": failpoints,
        "queue_type": "quorum",
        "confirm_timeout": 3.0,
        "delivery_limit": 7,
        "management_url": "",
    }
    from_url = RabbitMQConfig.from_url(URL, **opts)
    assert from_url == RabbitMQConfig(url=URL, **opts)  # type: ignore[arg-type]
    broker = RabbitMQBroker.from_url(URL, **opts)
    assert broker.config == from_url
    keywords = RabbitMQBroker(URL, **opts)  # type: ignore[arg-type]
    assert keywords.config == from_url
    assert (broker.url, broker.queue_type, broker.delivery_limit) == (
        keywords.url,
        keywords.queue_type,
        keywords.delivery_limit,
    )
    assert broker.clock is clock and broker.failpoints is failpoints
    # the URL goes to aio-pika whole: its query parameters are the driver's
    with_query = RabbitMQConfig.from_url(URL + "?heartbeat=5")
    assert with_query.url == URL + "?heartbeat=5"


def test_config_plus_another_option_is_refused() -> None:
    config = RabbitMQConfig(url=URL, queue_type="classic")
    assert RabbitMQBroker(config=config).config is config
    with pytest.raises(ConfigurationError, match="not both") as info:
        RabbitMQBroker(config=config, queue_type="quorum")  # type: ignore[call-overload]
    assert "queue_type" in str(info.value)
    with pytest.raises(ConfigurationError, match="not both"):
        RabbitMQBroker(URL, config=config)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="must be a RabbitMQConfig"):
        RabbitMQBroker(config={"url": URL})  # type: ignore[arg-type]


def test_repr_and_derived_values_hide_the_password() -> None:
    config = RabbitMQConfig(url=URL)
    assert "s3cret" not in repr(config) and "***" in repr(config)
    assert config.password == "s3cret"
    assert config.management_api == "http://rabbit.example:15672"
    assert RabbitMQConfig(url="amqps://[::1]/").management_api == "https://[::1]:15672"
    assert RabbitMQConfig(url=URL, management_url="").management_api == ""
    changed = dataclasses.replace(config, queue_type="classic")
    assert changed.queue_type == "classic" and config.queue_type == "quorum"
    with pytest.raises(ConfigurationError):
        dataclasses.replace(config, confirm_timeout=0)
