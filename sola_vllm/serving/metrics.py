"""SoLA series on vLLM's Prometheus `/metrics`: hits per edit, routed vs not routed requests,
loaded edits by state, capacity in use.

The counts live in the worker (`provenance.RequestLog`, `SolaRuntime`); `/metrics` is served
by the API server process from prometheus_client's global REGISTRY (vLLM 0.32 with one API
server, which is all `sola-vllm serve` runs). prometheus_client calls `collect()`
synchronously on the event loop, so it cannot await an RPC: a background task fetches a
snapshot (`sola_observe`) and `collect()` reports the latest one.

The task fetches one at start and then only after a scrape, at most once per `interval_s`: a
scrape reports the snapshot fetched after the previous scrape (`sola_metrics_age_seconds` says
how old). It never polls an engine nobody scrapes. Every RPC wakes vLLM's worker, which then
spins on its message queue for a second (`shm_broadcast`'s busy loop, sched_yield): polling
every second kept an idle server's worker at a full core, taken from the requests of anything
else on the machine (measured: 90 % of a core, idle, before this).

Series (label cardinality: one `edit_id` per edit loaded since start, at most `max_edits` at a
time; revoked edits keep their series and count):

    sola_edit_hits_total{edit_id}        requests routed to the edit (counter)
    sola_requests_total{outcome}         requests routed ("routed") or answered by the base model
                                         ("unrouted"); key captures are not counted (counter)
    sola_edits{state}                    loaded edits by state (gauge)
    sola_edit_slots_used / _max, sola_keys_used / _max, sola_requests_in_flight (gauges)
    sola_request_log_entries             routing decisions kept for provenance lookups (gauge)
    sola_metrics_age_seconds             age of the snapshot this scrape reports (gauge)
    sola_metrics_refresh_errors_total    snapshots that failed (counter)
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("vllm.sola_vllm")
INTERVAL_ENV = "SOLA_VLLM_METRICS_INTERVAL"
_BASE_STATES = ("active", "revoked")  # always reported, 0 when none


@dataclass(slots=True)
class MetricsConfig:
    interval_s: float = 1.0  # at most one snapshot RPC per interval, and only after a scrape

    def __post_init__(self) -> None:
        if not (isinstance(self.interval_s, int | float) and math.isfinite(self.interval_s)
                and 0.05 <= self.interval_s <= 3600):
            raise ValueError(f"metrics interval must be 0.05..3600 seconds, got "
                             f"{self.interval_s!r}")

    @classmethod
    def from_env(cls, environ=os.environ) -> MetricsConfig:
        raw = environ.get(INTERVAL_ENV) or "1.0"
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{INTERVAL_ENV} must be a number of seconds, got {raw!r}") from None
        return cls(value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class SolaCollector(Collector):
    """Reports the latest worker snapshot (nothing before the first one arrives)."""

    def __init__(self):
        self.snapshot: dict | None = None
        self.taken_at = 0.0  # time.monotonic() of the snapshot
        self.scraped_at = 0.0  # time.monotonic() of the latest scrape: asks for a new snapshot
        self.errors = 0

    def update(self, snapshot: dict) -> None:
        self.snapshot, self.taken_at = snapshot, time.monotonic()

    def describe(self):
        return []  # no names to check at registration: collect() needs a snapshot

    def collect(self):
        self.scraped_at = time.monotonic()
        snap = self.snapshot
        yield CounterMetricFamily("sola_metrics_refresh_errors", "SoLA metric snapshots that "
                                  "failed", value=self.errors)
        if snap is None:
            return
        yield _gauge("sola_metrics_age_seconds", "Age of the SoLA snapshot in this scrape",
                     time.monotonic() - self.taken_at)
        hits = CounterMetricFamily("sola_edit_hits", "Requests routed to each edit",
                                   labels=["edit_id"])
        for edit_id, count in sorted(snap["edit_hits"].items()):
            hits.add_metric([edit_id], count)
        yield hits
        requests = CounterMetricFamily("sola_requests", "Requests by routing outcome",
                                       labels=["outcome"])
        requests.add_metric(["routed"], snap["routed"])
        requests.add_metric(["unrouted"], snap["unrouted"])
        yield requests
        yield CounterMetricFamily("sola_incomplete_pooled_keys", "Requests given the base "
                                  "model because some of their prompt states never reached "
                                  "the router (mean-pooled keys)",
                                  value=snap["stats"].get("incomplete_pooled_keys", 0))
        yield from self._gauges(snap)

    @staticmethod
    def _gauges(snap: dict):
        states = {**dict.fromkeys(_BASE_STATES, 0), **snap["edit_states"]}
        edits = GaugeMetricFamily("sola_edits", "Edits loaded in the engine, by state",
                                  labels=["state"])
        for state, count in sorted(states.items()):
            edits.add_metric([state], count)
        yield edits
        stats = snap["stats"]
        yield _gauge("sola_edit_slots_used", "Edit slots in use", stats["edits"])
        yield _gauge("sola_edit_slots_max", "Edit slots (fixed at start)", stats["max_edits"])
        yield _gauge("sola_keys_used", "Routing key rows in use", stats["keys_in_use"])
        yield _gauge("sola_keys_max", "Routing key rows (fixed at start)", stats["max_keys"])
        yield _gauge("sola_requests_in_flight", "Requests past their routing decision, not "
                     "yet finished",
                     stats["requests_in_flight"])
        yield _gauge("sola_request_log_entries", "Routing decisions kept for "
                     "/v1/sola/requests lookups", snap["logged"])


IDLE_TICK_S = 0.1  # how often the refresher looks for a new scrape (local, no RPC)


class MetricsRefresher:
    """Keeps `collector` fed: one `sola_observe` RPC at start, then one after each scrape, at
    most one per `config.interval_s` (see the module docstring for why not on a timer)."""

    def __init__(self, rpc, collector: SolaCollector, config: MetricsConfig):
        self.rpc = rpc  # async (method, *args) -> result, e.g. EditManager.rpc
        self.collector = collector
        self.config = config
        self.task: asyncio.Task | None = None
        self._failing = False
        self.asked_at = -math.inf  # time.monotonic() the latest refresh started

    async def refresh(self) -> bool:
        try:
            self.collector.update(await self.rpc("sola_observe"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an engine that is busy or gone must not stop the loop
            self.collector.errors += 1
            if not self._failing:  # log once per run of failures, not every interval
                logger.warning("sola-vllm: metrics snapshot failed: %s", exc)
            self._failing = True
            return False
        self._failing = False
        return True

    def wanted(self) -> bool:
        """A snapshot is due: none asked for yet, or a scrape came after the last one."""
        return self.asked_at == -math.inf or self.collector.scraped_at > self.asked_at

    async def _run(self) -> None:
        while True:
            if self.wanted():
                self.asked_at = time.monotonic()
                await self.refresh()
                await asyncio.sleep(self.config.interval_s)
            else:
                await asyncio.sleep(IDLE_TICK_S)

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(),
                                                               name="sola-metrics")

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None


# the collector registered on REGISTRY by this process (a re-initialized app replaces it)
_registered: list[SolaCollector] = []


def install_metrics(rpc, config: MetricsConfig | None = None) -> MetricsRefresher:
    """Register the SoLA collector on prometheus_client's REGISTRY (what vLLM's /metrics
    serves with one API server) and start refreshing it."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        logger.warning("sola-vllm: PROMETHEUS_MULTIPROC_DIR is set, so vLLM's /metrics reads "
                       "multiprocess files only: the sola_* series will not appear there")
    while _registered:
        REGISTRY.unregister(_registered.pop())
    collector = SolaCollector()
    REGISTRY.register(collector)
    _registered.append(collector)
    refresher = MetricsRefresher(rpc, collector, config or MetricsConfig.from_env())
    refresher.start()
    return refresher
