"""The HTTP half of `serving_throughput.py`: plain vLLM's API server and `sola-vllm serve` on
loopback, both up at once, measured under the same streaming load from concurrent clients.

The plain server is vLLM's own entry point with no plugin loaded (`VLLM_PLUGINS=""`). Edits reach
the sola-vllm server the way users push them: one `POST /v1/sola/edits` of the artifact's bytes
each (the push latency is recorded too).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from serving_workload import ROOT, edit_prompts, mix, percentiles, synthetic_edits, zsre_prompts

SERVER_FLAGS = ["--enforce-eager", "--max-model-len", "1024", "--dtype", "bfloat16",
                "--gpu-memory-utilization", "0.5", "--disable-log-stats"]
READY_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], env: dict, port: int, log: Path):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as resp:
                    self.model = json.loads(resp.read())["data"][0]["id"]
                    return
            except OSError:
                time.sleep(2)
        raise TimeoutError(f"server not ready in {READY_TIMEOUT_S} s; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


def start_servers(model: Path, store: Path, max_edits: int, logs: Path,
                  plain: bool = True) -> tuple[Server | None, Server]:
    """Plain vLLM (unless `plain` is False) and sola-vllm, started together, both ready."""
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, VLLM_PLUGINS="", VLLM_CPU_KVCACHE_SPACE="2")
    env.pop("SOLA_VLLM_PREFIX_GUARD", None)
    port = free_port()
    plain = plain and Server([sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
                    "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                    "--served-model-name", model.name, *SERVER_FLAGS], env, port,
                   logs / "plain.log")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2")
    env.pop("VLLM_PLUGINS", None)
    port = free_port()
    cli = str(Path(sys.executable).parent / "sola-vllm")
    sola = Server([cli, "serve", "--store", str(store),
                   "--port", str(port), "--max-edits", str(max(max_edits, 1)),
                   "--max-keys", str(max(max_edits, 1)), *SERVER_FLAGS], env, port,
                  logs / "sola.log")
    for server in (plain, sola):
        if server:
            server.wait_ready()
    return plain or None, sola


# --- load ----------------------------------------------------------------------------------------
async def _one(session, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    started, first, last, tokens = time.perf_counter(), None, None, 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": first - started, "tokens": tokens,
            "tpot": (last - first) / (tokens - 1) if tokens > 1 else None}


async def _load(url: str, model: str, prompts: list[str], max_tokens: int,
                concurrency: int) -> dict:
    import aiohttp

    queue = list(reversed(prompts))
    done: list[dict] = []

    async def client(session) -> None:
        while queue:
            done.append(await _one(session, url, model, queue.pop(), max_tokens))

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in done)
    return {"requests": len(done), "seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "ttft_s": percentiles([r["ttft"] for r in done]),
            "tpot_s": percentiles([r["tpot"] for r in done if r["tpot"] is not None])}


def load(server: Server, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    return asyncio.run(_load(server.url, server.model, prompts, max_tokens, concurrency))


# --- edits ---------------------------------------------------------------------------------------
def push(server: Server, blob: bytes) -> float:
    """Synthetic edits are forced past the pre-flight collision check: the filler prompts are
    near each other on purpose, and zsRE holds questions about the same subject."""
    req = urllib.request.Request(server.url + "/v1/sola/edits?force=true", data=blob,
                                 method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        resp.read()
    return time.perf_counter() - started


def routed_requests(server: Server) -> int:
    with urllib.request.urlopen(server.url + "/v1/sola/edits", timeout=600) as resp:
        return int(json.loads(resp.read())["stats"]["routed_requests"])


def default_serving():
    """The ServingConfig `sola-vllm serve` runs with on an empty store (same default
    configuration, `default_config`, same model)."""
    from sola_vllm.default_config import default_config
    from sola_vllm.models import fetch_default_model
    from sola_vllm.serving.llm import serving_config

    model = fetch_default_model(progress=False)
    return serving_config(model, default_config(model).config)


# --- the sweep -----------------------------------------------------------------------------------
def http_sweep(args, results: dict, paired) -> None:
    from sola_vllm.config import EditConfig
    from sola_vllm.models import fetch_default_model

    model = fetch_default_model(progress=False)
    questions, unrelated = zsre_prompts()
    work = Path(tempfile.mkdtemp(prefix="sola-bench-http-"))
    plain, sola = start_servers(model, work / "store", args.http_edits, work)
    results["logs"] = str(work)
    try:
        requests = args.requests * 2  # several waves of `concurrency` clients

        def run(server, batch):
            return lambda: load(server, batch, args.max_tokens, args.concurrency)

        plain_batch = unrelated[:requests]
        # a full-size unmeasured run on each server first: a cold server's first runs are
        # slow, which made first pairs read several percent off (see serving_throughput.warm)
        load(plain, plain_batch, args.max_tokens, args.concurrency)
        load(sola, plain_batch, args.max_tokens, args.concurrency)
        paired("http_sola_0_edits_0pct_routed", run(sola, plain_batch), run(plain, plain_batch),
               results, {"edits": 0, "routed_percent": 0}, args.repeats)
        prompts = edit_prompts(args.http_edits, questions)
        edits = synthetic_edits(default_serving(), prompts, EditConfig().rank)
        push_s = [push(sola, e.to_bytes()) for e in edits]
        results["push_s"] = percentiles(push_s)
        results["push_count"] = len(push_s)
        print(f"  pushed {len(push_s)} edits over HTTP: p50 {results['push_s']['p50'] * 1e3:.0f}"
              f" ms, p99 {results['push_s']['p99'] * 1e3:.0f} ms", flush=True)
        load(sola, plain_batch, args.max_tokens, args.concurrency)  # settle after the pushes
        for percent in args.routed:
            # plain vLLM serves the configuration's own prompts: each pair compares equal work
            batch = mix(prompts, unrelated, requests, percent)
            resident = set(prompts)
            before = routed_requests(sola)
            name = f"http_sola_{args.http_edits}_edits_{percent}pct_routed"
            paired(name, run(sola, batch), run(plain, batch), results,
                   {"edits": args.http_edits, "routed_percent": percent,
                    "expected_routed": sum(p in resident for p in batch)}, args.repeats)
            results[name]["routed_requests"] = (routed_requests(sola) - before) // args.repeats
    finally:
        plain.stop()
        sola.stop()


__all__ = ["http_sweep", "Server", "load", "push", "start_servers", "ROOT"]
