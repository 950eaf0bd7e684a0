"""Prometheus exposition of replaysafe's signals (extra ``metrics``: prometheus-client).

The names come from :mod:`replaysafe.observe`; this module only translates a set of
:class:`~replaysafe.observe.Stats` (one per worker) into metric families at scrape time, so the hot
path never touches prometheus-client.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from replaysafe.errors import MissingExtra
from replaysafe.observe import BUCKETS, Labels, Stats, Summary

try:  # the extra is optional; importing this module without it names the extra to install
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.exposition import ThreadingWSGIServer, generate_latest
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("metrics", "prometheus_client") from exc

StatsSource = Callable[[], Iterable[Stats]]


def _label_names(keys: Iterable[Labels]) -> list[str]:
    names: set[str] = set()
    for labels in keys:
        names.update(k for k, _ in labels)
    return sorted(names)


def _values(labels: Labels, names: list[str]) -> list[str]:
    d = dict(labels)
    return [d.get(n, "") for n in names]


class StatsCollector:
    """A prometheus-client collector over the Stats of the live workers."""

    def __init__(self, source: StatsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        counters: dict[str, dict[Labels, float]] = {}
        hists: dict[str, dict[Labels, Summary]] = {}
        gauges: dict[str, dict[Labels, float]] = {}
        tops: dict[str, dict[Labels, list[tuple[str, int]]]] = {}
        for stats in self._source():
            with stats._lock:
                counter_items = list(stats.counters.items())
                hist_items = [(k, v) for k, v in stats.summaries.items()]
                top_items = [(k, v.top(10)) for k, v in stats.topk.items()]
            for (name, labels), n in counter_items:
                counters.setdefault(name, {}).setdefault(labels, 0.0)
                counters[name][labels] += n
            for (name, labels), summ in hist_items:
                merged = hists.setdefault(name, {}).setdefault(labels, Summary())
                merged.merge(summ)
            for (name, labels), value in stats.read_gauges().items():
                gauges.setdefault(name, {})[labels] = value
            for (name, labels), top in top_items:
                tops.setdefault(name, {})[labels] = top
        for name, series in sorted(counters.items()):
            names = _label_names(series)
            family = CounterMetricFamily(name.removesuffix("_total"), name, labels=names)
            for labels, value in series.items():
                family.add_metric(_values(labels, names), value)
            yield family
        for name, hseries in sorted(hists.items()):
            names = _label_names(hseries)
            hfamily = HistogramMetricFamily(name, name, labels=names)
            for labels, summ in hseries.items():
                cumulative, running = [], 0
                for bound, n in zip(BUCKETS, summ.buckets, strict=True):
                    running += n
                    cumulative.append((repr(bound), float(running)))
                cumulative.append(("+Inf", float(summ.count)))
                hfamily.add_metric(_values(labels, names), cumulative, summ.total)
            yield hfamily
        for name, gseries in sorted(gauges.items()):
            names = _label_names(gseries)
            gfamily = GaugeMetricFamily(name, name, labels=names)
            for labels, value in gseries.items():
                gfamily.add_metric(_values(labels, names), value)
            yield gfamily
        for name, tseries in sorted(tops.items()):
            # the keys are operation ids, often derived from business fields (an e-mail, an
            # account): they never become label values (a TSDB keeps them, beyond any redaction,
            # and each new one is a new series). Exported: the count of the rank-th hottest key,
            # so an alert can say "one key came back 40 times"; `replaysafe inspect --top` (the
            # ledger's hot operations) and Stats.top() in process name them.
            names = [*_label_names(tseries), "rank"]
            tfamily = GaugeMetricFamily(
                name, f"{name}: approximate counts of the top keys by rank (keys not exported)",
                labels=names,
            )  # fmt: skip
            for labels, top in tseries.items():
                for rank, (_, n) in enumerate(top, 1):
                    tfamily.add_metric([*_values(labels, names[:-1]), str(rank)], float(n))
            yield tfamily


def registry_for(source: StatsSource) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(source))
    return registry


def render(source: StatsSource) -> str:
    """The Prometheus text exposition of the workers' signals, as of now."""
    return generate_latest(registry_for(source)).decode("utf-8")


#: ``() -> (ready, body)`` for ``/readyz`` (``replaysafe.runtime.health.Health.status``)
Readiness = Callable[[], tuple[bool, str]]


class _Quiet(WSGIRequestHandler):
    """No access log line per scrape or probe on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _routes(metrics: Any, readiness: Readiness | None) -> Any:
    """``/healthz`` (the process answers: 200), ``/readyz`` (``readiness``: 200 or 503 with a
    short text body saying what is not reachable), anything else ``/metrics``."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            status, body = "200 OK", "alive\n"
        elif path == "/readyz" and readiness is not None:
            ready, body = readiness()
            status = "200 OK" if ready else "503 Service Unavailable"
        else:
            result: list[bytes] = metrics(environ, start_response)
            return result
        data = body.encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                ("Content-Length", str(len(data)))])  # fmt: skip
        return [data]

    return app


def serve(
    port: int, source: StatsSource, addr: str = "127.0.0.1", readiness: Readiness | None = None
) -> Any:
    """Serve ``/metrics`` (Prometheus text format), ``/healthz`` and, with ``readiness``,
    ``/readyz`` on ``addr:port`` (``0.0.0.0`` or ``::`` for every interface) from a daemon
    thread; returns the server (``shutdown()`` stops it). Raises ``OSError`` when the address
    cannot be bound."""
    family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class Server(ThreadingWSGIServer):
        address_family = family

    app = _routes(make_wsgi_app(registry_for(source)), readiness)
    httpd = make_server(addr, port, app, Server, handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, name="replaysafe-metrics", daemon=True)
    thread.start()
    return httpd
