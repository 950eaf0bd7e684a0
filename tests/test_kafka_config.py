"""KafkaConfig: the Kafka broker's one configuration, frozen, validated once, built from keywords or
from its one URL parser (issue 15, item 1). No Kafka broker is needed: nothing here connects."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from replaysafe.brokers.kafka import KafkaBroker, KafkaConfig
from replaysafe.errors import ConfigurationError

URL = "kafka+ssl://alice:s3cr%40t@h1:9092,h2:9093/?client.id=billing&sasl.mechanism=SCRAM-SHA-256"


def test_a_config_is_frozen_and_its_mappings_read_only() -> None:
    source = {"client.id": "billing"}
    cfg = KafkaConfig(bootstrap_servers="h:9092", config=source)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.session_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.config["client.id"] = "other"  # type: ignore[index]
    source["client.id"] = "changed later"  # the caller's dict is not the config's
    assert cfg.config == {"client.id": "billing"}


@pytest.mark.parametrize(
    ("options", "wrong", "todo"),
    [
        ({"session_timeout": 0}, "session_timeout must be > 0", "pass a positive number"),
        ({"drain_timeout": -1}, "drain_timeout must be >= 0", "pass 0 or a positive number"),
        (
            {"session_timeout": 3, "heartbeat_interval": 3},
            "heartbeat_interval must be > 0 and shorter than session_timeout",
            "lower it",
        ),
        ({"auto_offset_reset": "smallest"}, "auto_offset_reset must be", "pass one of those"),
        (
            {"consumer_config": {"enable.auto.commit": True}},
            "enable.auto.commit=True is refused",
            "remove the setting",
        ),
        ({"bootstrap_servers": ""}, "bootstrap_servers must be a non-empty", "host:port"),
    ],
)
def test_a_bad_value_is_refused_saying_what_to_do(
    options: dict[str, Any], wrong: str, todo: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        KafkaConfig(**{"bootstrap_servers": "h:9092", **options})
    assert wrong in str(info.value) and todo in str(info.value)


def test_the_heartbeat_defaults_to_a_tenth_of_the_session() -> None:
    assert KafkaConfig(bootstrap_servers="h:9092", session_timeout=6).heartbeat == 0.6
    assert KafkaConfig(bootstrap_servers="h:9092", heartbeat_interval=0.2).heartbeat == 0.2


def test_from_url_equals_the_keyword_form_and_keeps_the_password_out_of_sight() -> None:
    cfg = KafkaConfig.from_url(URL, session_timeout=6, config={"client.id": "override"})
    assert cfg == KafkaConfig(
        bootstrap_servers="h1:9092,h2:9093",
        session_timeout=6,
        config={
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-256",
            "sasl.username": "alice",
            "sasl.password": "s3cr@t",
            "client.id": "override",  # an explicit config wins over the query
        },
    )
    assert cfg.display is not None and cfg.display.startswith("kafka+ssl://alice:***@h1:9092")
    assert "s3cr" not in repr(cfg)


@pytest.mark.parametrize("url", ["amqp://bob:hunter2@h:5672", "kafka://", "kafka://h1:9092,"])
def test_from_url_refuses_what_is_no_kafka_url(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        KafkaConfig.from_url(url)
    assert "hunter2" not in str(info.value) and "use kafka://" in str(info.value)


def test_the_broker_takes_a_config_or_keywords_and_keeps_it() -> None:
    pytest.importorskip("confluent_kafka")
    cfg = KafkaConfig.from_url(URL, poll_interval=0.05)
    by_config = KafkaBroker(config=cfg)
    assert by_config.config is cfg
    assert KafkaBroker.from_url(URL, poll_interval=0.05).config == cfg
    by_keywords = KafkaBroker("h:9092", session_timeout=6, config={"client.id": "x"})
    assert by_keywords.config == KafkaConfig(
        bootstrap_servers="h:9092", session_timeout=6, config={"client.id": "x"}
    )
    assert by_keywords._common["client.id"] == "x"
    assert by_keywords._consumer_base["heartbeat.interval.ms"] == 600


@pytest.mark.parametrize(
    ("other", "name"),
    [
        ({"session_timeout": 10.0}, "session_timeout"),  # even when it equals the default
        ({"bootstrap_servers": "h:9092"}, "bootstrap_servers"),
        ({"_display": "x"}, "display"),
    ],
)
def test_a_config_plus_another_option_is_refused(other: dict[str, Any], name: str) -> None:
    pytest.importorskip("confluent_kafka")
    cfg = KafkaConfig(bootstrap_servers="h:9092")
    with pytest.raises(ConfigurationError) as info:
        KafkaBroker(config=cfg, **other)
    assert f"config= and also {name}" in str(info.value)
    assert "not both" in str(info.value)
