"""The services the suite relies on are really there (with CI=true a missing one fails)."""

from __future__ import annotations


def test_postgres(pg_dsn: str) -> None:
    import psycopg

    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_redis(redis_url: str) -> None:
    import redis

    assert redis.Redis.from_url(redis_url).ping()


def test_moto_server_answers(sqs_endpoint: str) -> None:
    import urllib.request

    with urllib.request.urlopen(sqs_endpoint + "/moto-api/", timeout=10) as r:
        assert r.status == 200


def test_tansu_answers(kafka_bootstrap: str) -> None:
    from confluent_kafka.admin import AdminClient

    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=20)
    assert md.brokers


def test_rabbitmq_port(amqp_url: str) -> None:
    assert amqp_url.startswith("amqp://")
