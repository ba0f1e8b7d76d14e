"""Observability: per-edit hit counts on /metrics and provenance (which edit shaped a completion).

Unit tests on the worker-side bookkeeping (SolaRuntime + RequestLog, no vLLM), the Prometheus
collector and the id matching; then one real server (`sola-vllm serve`, default model) for
/metrics and /v1/sola/requests/{id} end to end.
"""

import asyncio
import json
import time
import urllib.request

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_http_server import OTHER, ROME, call, module_server, push
from test_serving_runtime import HIDDEN, edit, make_runtime, step

from sola_vllm.serving.lookup import checked_request_id
from sola_vllm.serving.manager import RequestError
from sola_vllm.serving.metrics import MetricsConfig, MetricsRefresher, SolaCollector
from sola_vllm.serving.provenance import RequestLog, belongs_to


# --- worker-side bookkeeping ----------------------------------------------------------------------
def _route(runtime, req_ids, key_rows: dict[int, torch.Tensor], captures=None):
    """One prefill step: each request a 1-token prompt whose key is `key_rows[row]` (or far
    from every key)."""
    hidden = torch.randn(len(req_ids), HIDDEN) * 10 + 100
    for row, key in key_rows.items():
        hidden[row] = key
    runtime.step = step(req_ids, [1] * len(req_ids), [[0]] * len(req_ids), captures)
    runtime.route(hidden)


def test_counts_after_routed_and_unrouted_requests_survive_revoke_and_slot_reuse():
    runtime = make_runtime(max_edits=2)
    e0, e1 = edit(0), edit(1)
    runtime.add_edit(e0, e0.keys)
    runtime.add_edit(e1, e1.keys)
    runtime.expect_captures(["cap"])
    _route(runtime, ["a", "b", "c", "d", "cap-req"],
           {0: e0.keys[0], 1: e0.keys[0], 2: e1.keys[0], 4: e0.keys[0]},
           captures=[None, None, None, None, "cap"])
    counts = runtime.request_log.counts()
    # key captures are internal: neither routed nor unrouted, and not in the log
    assert (counts["routed"], counts["unrouted"], counts["logged"]) == (3, 1, 4)
    assert counts["edit_hits"] == {"e0": 2, "e1": 1}
    runtime.finish_requests(["a", "b", "c", "d", "cap-req"])
    runtime.set_active("e0", False)  # revoked: its count stays, new requests go unrouted
    _route(runtime, ["e"], {0: e0.keys[0]})
    runtime.finish_requests(["e"])
    runtime.remove_edit("e1")
    e2 = edit(2)
    runtime.add_edit(e2, e2.keys)  # reuses e1's slot: starts at 0, e1 keeps its count
    assert runtime.edits["e2"].slot == 1
    counts = runtime.request_log.counts()
    assert counts["edit_hits"] == {"e0": 2, "e1": 1, "e2": 0}
    assert (counts["routed"], counts["unrouted"]) == (3, 2)
    assert runtime.request_log.lookup("e")[0]["edit"] is None


def test_log_records_edit_distance_and_finish_and_keeps_only_the_last_n():
    runtime = make_runtime()
    runtime.request_log = RequestLog(3)
    e0 = edit(0)
    runtime.add_edit(e0, e0.keys)
    _route(runtime, ["r0", "r1"], {0: e0.keys[0]})
    (hit,) = runtime.request_log.lookup("r0")
    (miss,) = runtime.request_log.lookup("r1")
    assert (hit["edit"], hit["slot"], hit["finished"]) == ("e0", 0, False)
    assert hit["distance"] == 0.0
    assert (miss["edit"], miss["slot"]) == (None, -1) and miss["distance"] > 0.5
    runtime.finish_requests(["r0"])
    assert runtime.request_log.lookup("r0")[0]["finished"] is True
    _route(runtime, ["r2", "r3", "r4"], {})
    assert [r.request_id for r in runtime.request_log.records.values()] == ["r2", "r3", "r4"]
    assert runtime.request_log.lookup("r0") == [] and runtime.request_log.lookup("r1") == []
    assert runtime.request_log.counts()["unrouted"] == 4  # counters are not bounded by the log


def test_no_active_key_gives_a_null_distance():
    runtime = make_runtime()
    _route(runtime, ["x"], {})
    assert runtime.request_log.lookup("x")[0]["distance"] is None


@pytest.mark.parametrize("capacity", [0, -1, 2.5, "10"])
def test_request_log_capacity_is_validated(capacity):
    with pytest.raises(ValueError, match="capacity"):
        RequestLog(capacity)


@pytest.mark.parametrize("engine_id,response_id,match", [
    ("cmpl-9f0e-0-1a2b3c4d", "cmpl-9f0e", True),  # completion, one prompt
    ("cmpl-9f0e-3-1a2b3c4d", "cmpl-9f0e", True),  # its 4th prompt
    ("2_cmpl-9f0e-0-1a2b3c4d", "cmpl-9f0e", True),  # n > 1: the 3rd sample
    ("chatcmpl-77-1a2b3c4d", "chatcmpl-77", True),  # chat, one input
    ("chatcmpl-77_1-1a2b3c4d", "chatcmpl-77", True),  # chat, several inputs
    ("cmpl-9f0e-0", "cmpl-9f0e", True),  # VLLM_DISABLE_REQUEST_ID_RANDOMIZATION
    ("cmpl-9f0e-0-1a2b3c4d", "cmpl-9f0e-0-1a2b3c4d", True),  # the engine id itself
    ("2_cmpl-9f0e-0-1a2b3c4d", "2_cmpl-9f0e-0-1a2b3c4d", True),
    ("cmpl-9f0e1-0-1a2b3c4d", "cmpl-9f0e", False),  # another completion's id
    ("cmpl-foo-1-0-1a2b3c4d", "cmpl-foo", False),  # X-Request-Id "foo-1", not "foo"
    ("chatcmpl-77-1a2b3c4d", "cmpl-77", False),
    ("cmpl-9f0e-0-1a2b3c4d", "cmpl-9f0e-0-1a2b", False),
    ("1_cmpl-9f0e-0-1a2b3c4d", "2_cmpl-9f0e", False),
])
def test_engine_ids_belong_to_the_completion_the_client_saw(engine_id, response_id, match):
    assert belongs_to(engine_id, response_id) is match


@pytest.mark.parametrize("bad", ["", "-x", "a/b", "a b", "x" * 257, "é", None, 5])
def test_request_ids_are_validated(bad):
    with pytest.raises(RequestError) as info:
        checked_request_id(bad)
    assert info.value.status == 400


# --- the Prometheus collector -------------------------------------------------------------------
SNAPSHOT = {"edit_states": {"revoked": 1, "active": 1},
            "stats": {"edits": 2, "max_edits": 4, "keys_in_use": 3, "max_keys": 6,
                      "requests_in_flight": 1, "incomplete_pooled_keys": 2},
            "routed": 5, "unrouted": 7, "edit_hits": {"rome": 4, "mars": 1, "gone": 0},
            "logged": 12, "capacity": 100}


def scrape(collector) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_collector_reports_the_snapshot():
    collector = SolaCollector()
    assert scrape(collector) == {("sola_metrics_refresh_errors_total", ()): 0}
    collector.update(SNAPSHOT)
    samples = scrape(collector)
    assert samples[("sola_edit_hits_total", (("edit_id", "rome"),))] == 4
    assert samples[("sola_edit_hits_total", (("edit_id", "gone"),))] == 0
    assert samples[("sola_requests_total", (("outcome", "routed"),))] == 5
    assert samples[("sola_requests_total", (("outcome", "unrouted"),))] == 7
    assert samples[("sola_edits", (("state", "active"),))] == 1
    assert samples[("sola_edits", (("state", "revoked"),))] == 1
    assert samples[("sola_keys_used", ())] == 3 and samples[("sola_edit_slots_max", ())] == 4
    assert samples[("sola_request_log_entries", ())] == 12
    assert samples[("sola_incomplete_pooled_keys_total", ())] == 2
    assert 0 <= samples[("sola_metrics_age_seconds", ())] < 3600


def test_refresher_feeds_the_collector_and_counts_failures():
    replies = [SNAPSHOT, RuntimeError("engine gone"), {**SNAPSHOT, "routed": 6}]

    async def rpc(method, *args):
        assert method == "sola_observe" and args == ()
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    collector = SolaCollector()
    refresher = MetricsRefresher(rpc, collector, MetricsConfig())
    assert asyncio.run(refresher.refresh()) and collector.snapshot["routed"] == 5
    assert not asyncio.run(refresher.refresh())
    assert collector.errors == 1 and collector.snapshot["routed"] == 5  # last good one kept
    assert asyncio.run(refresher.refresh()) and collector.snapshot["routed"] == 6


def test_an_unscraped_engine_is_not_polled():
    """One snapshot at start, then one per scrape, at most one per interval: an idle server
    must not keep vLLM's worker in its busy loop with an RPC every second."""
    calls = []

    async def rpc(method, *args):
        calls.append(method)
        return {**SNAPSHOT, "routed": len(calls)}

    async def scenario():
        collector = SolaCollector()
        refresher = MetricsRefresher(rpc, collector, MetricsConfig(interval_s=0.05))
        refresher.start()
        await asyncio.sleep(0.5)  # nobody scrapes: only the start-up snapshot
        at_start = len(calls)
        list(collector.collect())  # a scrape asks for a fresh snapshot
        await asyncio.sleep(0.3)
        after_one = len(calls)
        for _ in range(20):  # scrapes faster than the interval: at most one RPC per interval
            list(collector.collect())
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        refresher.stop()
        return at_start, after_one, len(calls), collector.snapshot

    at_start, after_one, total, snapshot = asyncio.run(scenario())
    assert at_start == 1 and after_one == 2
    assert 3 <= total <= 2 + 6  # ~0.2 s of scrapes at a 0.05 s interval (+ slack)
    assert snapshot["routed"] == total


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon", "99999"])
def test_metrics_interval_is_validated(value):
    with pytest.raises(ValueError, match="SOLA_VLLM_METRICS_INTERVAL|interval"):
        MetricsConfig.from_env({"SOLA_VLLM_METRICS_INTERVAL": value})
    assert MetricsConfig.from_env({}).interval_s == 1.0




# --- the real server ------------------------------------------------------------------------------
def _get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=60) as resp:
        assert resp.status == 200
        return resp.read().decode()


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = _get_text(url + "/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("sola_")}


def metrics_once(url: str, ready) -> dict:
    """/metrics once the snapshot (refreshed after each scrape) satisfies `ready`."""
    for _ in range(240):
        samples = metrics(url)
        if ready(samples):
            return samples
        time.sleep(0.5)
    pytest.fail(f"/metrics never showed the expected counts; last: {samples}")


def requests_total(samples, outcome: str) -> float:
    return samples.get(("sola_requests_total", (("outcome", outcome),)), -1)


def hits(samples, edit_id: str) -> float:
    return samples.get(("sola_edit_hits_total", (("edit_id", edit_id),)), -1)


def completion(url: str, prompt, **extra) -> dict:
    status, reply = call(url, "POST", "/v1/completions", {
        "prompt": prompt, "max_tokens": 12, "temperature": 0, **extra})
    assert status == 200, reply
    return reply


def completion_headed(url: str, prompt: str, opt_in: bool) -> tuple[str | None, dict]:
    """A completion and its X-Sola-Edit header (asked for with X-Sola-Provenance: 1)."""
    body = json.dumps({"prompt": prompt, "max_tokens": 12, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    if opt_in:
        req.add_header("X-Sola-Provenance", "1")
    with urllib.request.urlopen(req, timeout=300) as resp:
        return resp.headers.get("X-Sola-Edit"), json.loads(resp.read())


def lookup(url: str, request_id: str) -> tuple[int, dict]:
    return call(url, "GET", f"/v1/sola/requests/{request_id}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from module_server(tmp_path_factory, "observe")


@pytest.mark.slow
def test_metrics_and_provenance_on_the_real_server(server, default_engine):
    rome = default_engine.train([ROME], "Rome.", edit_id="rome").to_bytes()
    url = server.url
    base = completion(url, ROME)
    status, reply = push(url, rome)
    assert status == 201, reply

    header, routed = completion_headed(url, ROME, opt_in=True)
    assert routed["choices"][0]["text"] == " Rome." and routed["id"].startswith("cmpl-")
    assert header == "rome"
    header, unrouted = completion_headed(url, OTHER, opt_in=False)
    assert header is None  # only when asked for
    status, prov = lookup(url, routed["id"])
    assert status == 200 and prov["edits"] == ["rome"], prov
    (record,) = prov["requests"]
    assert record["edit"] == "rome" and record["slot"] >= 0 and record["finished"] is True
    assert record["distance"] < default_engine.config.router.threshold
    status, prov = lookup(url, unrouted["id"])
    assert status == 200 and prov["edits"] == [] and prov["requests"][0]["edit"] is None, prov
    assert prov["requests"][0]["slot"] == -1
    # key captures of the push are not requests: 1 routed, 2 unrouted (base and OTHER)
    samples = metrics_once(url, lambda s: requests_total(s, "unrouted") >= 2)
    assert hits(samples, "rome") == 1 and requests_total(samples, "routed") == 1
    assert requests_total(samples, "unrouted") == 2
    assert samples[("sola_edits", (("state", "active"),))] == 1

    # two prompts, two samples each: four engine requests under one completion id
    multi = completion(url, [ROME, OTHER], n=2, temperature=1.0, seed=0, max_tokens=4)
    status, prov = lookup(url, multi["id"])
    assert status == 200 and prov["edits"] == ["rome"], prov
    assert sorted(str(r["edit"]) for r in prov["requests"]) == ["None", "None", "rome", "rome"]
    status, chat = call(url, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": OTHER}], "max_tokens": 4, "temperature": 0})
    assert status == 200 and chat["id"].startswith("chatcmpl-"), chat
    status, prov = lookup(url, chat["id"])
    assert status == 200 and len(prov["requests"]) == 1 and prov["edits"] == [], prov

    assert call(url, "DELETE", "/v1/sola/edits/rome")[0] == 200
    header, after = completion_headed(url, ROME, opt_in=True)
    assert after["choices"][0]["text"] == base["choices"][0]["text"] and header == "-1"
    status, prov = lookup(url, after["id"])
    assert status == 200 and prov["edits"] == [] and prov["requests"][0]["edit"] is None
    assert lookup(url, routed["id"])[1]["edits"] == ["rome"]  # what shaped it stays known
    # revoked: its count stays; the later requests went unrouted (2 + 2 multi + chat + after)
    samples = metrics_once(url, lambda s: requests_total(s, "unrouted") >= 6)
    assert hits(samples, "rome") == 3 and requests_total(samples, "routed") == 3
    assert requests_total(samples, "unrouted") == 6
    assert samples[("sola_edits", (("state", "revoked"),))] == 1
    assert samples[("sola_edits", (("state", "active"),))] == 0

    for bad_id, want in (("cmpl-0000000000000000", 404), ("bad%20id", 400), ("-x", 400)):
        status, reply = lookup(url, bad_id)
        assert status == want and reply["error"]["message"], (bad_id, reply)


# --- the X-Sola-Edit header (ASGI middleware on a stand-in app) ----------------------------------
class _FakeManager:
    serving = type("Serving", (), {"request_log": 100})()

    async def rpc(self, method, response_id):
        assert method == "sola_provenance"
        return {"cmpl-routed": [{"edit": "rome"}, {"edit": None}],
                "cmpl-base": [{"edit": None}]}.get(response_id, [])


def _asgi_app(content_type: bytes, body: bytes):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type)]})
        for i in range(0, len(body), 5):  # several body messages, like a chunked response
            await send({"type": "http.response.body", "body": body[i:i + 5],
                        "more_body": i + 5 < len(body)})
    return app


def _serve(body: bytes, opt_in: bool, content_type=b"application/json", path="/v1/completions"):
    from sola_vllm.serving.edit_header import EditHeaderMiddleware

    state = type("State", (), {"sola_edits": _FakeManager()})()
    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"x-sola-provenance", b"1")] if opt_in else [],
             "app": type("App", (), {"state": state})()}
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(EditHeaderMiddleware(_asgi_app(content_type, body))(scope, None, send))
    headers = dict(sent[0]["headers"])
    return headers.get(b"x-sola-edit"), b"".join(m.get("body", b"") for m in sent[1:])


def test_edit_header_names_the_edits_or_minus_one_and_keeps_the_body():
    routed, base = b'{"id": "cmpl-routed", "choices": []}', b'{"id": "cmpl-base"}'
    assert _serve(routed, opt_in=True) == (b"rome", routed)
    assert _serve(base, opt_in=True) == (b"-1", base)
    assert _serve(routed, opt_in=False) == (None, routed)  # only when asked for
    assert _serve(b'{"id": "cmpl-gone"}', opt_in=True)[0] is None  # unknown: no header
    stream = b'data: {"id": "cmpl-routed"}\n\n'
    assert _serve(stream, True, content_type=b"text/event-stream") == (None, stream)
    assert _serve(routed, True, path="/v1/sola/edits") == (None, routed)
