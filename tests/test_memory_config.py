"""MemoryConfig: the memory broker's settings, frozen and checked once; ``MemoryConfig.from_url``
is the one parser of the ``memory`` URL; a broker takes a config or keywords, never both."""

from __future__ import annotations

import dataclasses

import pytest

from replaysafe.brokers import broker_from_url
from replaysafe.brokers.base import RedeliveryKind
from replaysafe.brokers.memory import MemoryBroker, MemoryConfig
from replaysafe.clock import SYSTEM_CLOCK
from replaysafe.errors import ConfigurationError
from replaysafe.failpoints import FAILPOINTS, Failpoints
from replaysafe.testing import FakeClock


def test_the_defaults_are_the_constructors() -> None:
    config = MemoryConfig()
    assert config.clock is SYSTEM_CLOCK
    assert config.failpoints is None
    assert config.default_mode is RedeliveryKind.NACK
    broker = MemoryBroker()
    assert broker.config == config
    assert broker.clock is SYSTEM_CLOCK and broker.failpoints is FAILPOINTS


def test_a_config_is_frozen() -> None:
    config = MemoryConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.default_mode = RedeliveryKind.OFFSET_REWIND  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.clock = FakeClock()  # type: ignore[misc]


def test_a_mode_value_becomes_the_enum() -> None:
    config = MemoryConfig(default_mode="offset_rewind")  # type: ignore[arg-type]
    assert config.default_mode is RedeliveryKind.OFFSET_REWIND


@pytest.mark.parametrize(
    ("options", "wrong", "todo"),
    [
        ({"default_mode": "fifo"}, "default_mode='fifo' is not a redelivery model", "use one of"),
        ({"default_mode": 3}, "default_mode=3 is not a redelivery model", "'offset_rewind'"),
        ({"clock": 1.5}, "clock=1.5 is not a Clock", "pass replaysafe.clock.SYSTEM_CLOCK"),
        ({"clock": object()}, "is not a Clock", "or leave clock out"),
        ({"failpoints": {"x": 1}}, "is not a replaysafe.failpoints.Failpoints", "Failpoints()"),
    ],
)
def test_bad_settings_are_refused_saying_what_to_do(
    options: dict[str, object], wrong: str, todo: str
) -> None:
    for make in (MemoryConfig, MemoryBroker):
        with pytest.raises(ConfigurationError) as caught:
            make(**options)
        assert wrong in str(caught.value)
        assert todo in str(caught.value)


def test_from_url_equals_the_keyword_form() -> None:
    clock, fps = FakeClock(), Failpoints()
    assert MemoryConfig.from_url("memory") == MemoryConfig()
    assert MemoryConfig.from_url(
        "memory", clock=clock, failpoints=fps, default_mode="visibility_timeout"
    ) == MemoryConfig(clock=clock, failpoints=fps, default_mode=RedeliveryKind.VISIBILITY_TIMEOUT)
    broker = MemoryBroker.from_url("memory", clock=clock, default_mode=RedeliveryKind.OFFSET_REWIND)
    assert broker.config == MemoryConfig(clock=clock, default_mode=RedeliveryKind.OFFSET_REWIND)
    assert broker.clock is clock
    assert broker.capabilities("anything").redelivery is RedeliveryKind.OFFSET_REWIND
    # broker_from_url means the same
    same = broker_from_url("memory", clock=clock)
    assert isinstance(same, MemoryBroker)
    assert same.config == MemoryConfig.from_url("memory", clock=clock)


@pytest.mark.parametrize("url", ["memory://", "memory?default_mode=nack", "amqp://u:hunter2@h/"])
def test_from_url_refuses_anything_but_memory(url: str) -> None:
    with pytest.raises(ConfigurationError, match="pass its settings as keywords") as caught:
        MemoryConfig.from_url(url)
    assert "hunter2" not in str(caught.value)


def test_config_and_another_option_are_refused() -> None:
    config = MemoryConfig(default_mode=RedeliveryKind.VISIBILITY_TIMEOUT)
    with pytest.raises(ConfigurationError, match=r"config= and also clock; pass one or the other"):
        MemoryBroker(config=config, clock=FakeClock())
    with pytest.raises(ConfigurationError, match=r"also default_mode, failpoints"):
        MemoryBroker(config=config, failpoints=Failpoints(), default_mode=RedeliveryKind.NACK)
    broker = MemoryBroker(config=config)
    assert broker.config is config
    assert broker.capabilities("q").redelivery is RedeliveryKind.VISIBILITY_TIMEOUT
