"""Offline Python API: a vLLM `LLM` with the SoLA plugin, hot edits and greedy generation.

    llm = SolaLLM()                            # default model, CPU-friendly defaults
    llm.add_edit(edit)                         # an `Edit` (e.g. from EditStore.get or train)
    llm.generate(["The capital of France is"]) # routed per request inside vLLM
    llm.revoke("rome")                         # new requests get the exact base model again
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..arch import resolve
from ..config import SolaConfig
from ..edit import Edit
from .config import ServingConfig
from .runner_hooks import PREFIX_GUARD_ENV

WORKER_EXTENSION = "sola_vllm.serving.worker_ext.SolaWorkerExtension"


class SolaRpcError(ValueError):
    """A worker refused a request (bad edit, unknown id, capacity...)."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]


def serving_config(model_path: Path, config: SolaConfig, **capacity) -> ServingConfig:
    """What the workers serve: the edit shape (keys read as `config.edit` says) and the router
    (metric, threshold, key map). A key map that does not fit the model or the keys is refused
    here, before vLLM starts (the worker checks again)."""
    from transformers import AutoConfig

    from ..key_map import resolve_path
    from ..models import model_fingerprint

    hf = AutoConfig.from_pretrained(model_path)
    shape = resolve(config.edit, hf.model_type, hf.num_hidden_layers)
    fingerprint = model_fingerprint(model_path)
    key_map = None
    if config.router.key_map is not None:
        config.router.load_key_map().check_fits(fingerprint, hf.hidden_size, shape.key_pool,
                                                shape.route_layer)
        key_map = str(resolve_path(config.router.key_map).resolve())
    return ServingConfig.from_shape(shape, hf.model_type, fingerprint,
                                    metric=config.router.metric,
                                    threshold=config.router.threshold,
                                    chat_threshold=config.router.chat_threshold, key_map=key_map,
                                    revoked_keys=config.router.revoked_keys,
                                    **capacity)


def engine_kwargs(model_path: Path, serving: ServingConfig, cuda_graphs: bool = False) -> dict:
    """What vLLM needs to build the plugin's model; also sets the prefix-cache guard.
    On CUDA the engine runs eager unless `cuda_graphs`: then piecewise CUDA graphs split at
    the router (`graphs.graph_compilation_config`; not yet run on a GPU). Mean-pooled keys
    turn prefix caching off where Model Runner V2 may run (see `check_prefix_caching`)."""
    os.environ[PREFIX_GUARD_ENV] = "1"
    # either model runner is hooked (V1 and Model Runner V2); vLLM picks it as usual
    kwargs = {"model": str(model_path),
              "hf_overrides": {"architectures": [serving.architecture],
                               "sola": serving.to_dict()},
              "worker_extension_cls": WORKER_EXTENSION}
    if serving.key_pool == "mean" and mrv2_may_run():
        kwargs["enable_prefix_caching"] = False
    if cuda_graphs:
        kwargs["compilation_config"] = cuda_graphs_config()
    elif on_cuda():
        kwargs["enforce_eager"] = True
    return kwargs


def check_prefix_caching(serving: ServingConfig, enabled: bool | None) -> None:
    """Refuse prefix caching with mean-pooled keys where Model Runner V2 may run: a cached
    block's tokens never pass the router, and only the V1 runner's hooks keep each KV block's
    state sums to stand in for them (`block_sums`); the worker refuses it too, knowing its
    runner (`models.check_pooled_prefix_caching`). `enabled`: what the user asked for (None:
    nothing)."""
    if enabled and serving.key_pool == "mean" and mrv2_may_run():
        raise ValueError("prefix caching cannot serve mean-pooled routing keys (edit.key_pool "
                         "'mean') under vLLM's Model Runner V2 (CUDA's default): cached prompt "
                         "blocks skip the router, so their states would be missing from the "
                         "key; leave prefix caching off, or run the V1 runner "
                         "(VLLM_USE_V2_MODEL_RUNNER=0)")


def mrv2_may_run() -> bool:
    """Whether vLLM may pick Model Runner V2: asked for by VLLM_USE_V2_MODEL_RUNNER, or, unset,
    on CUDA (where vLLM prefers it); CPU engines run the V1 runner unless asked."""
    value = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower()
    if value in ("0", "false"):
        return False
    if value in ("1", "true"):
        return True
    return on_cuda()


def cuda_graphs_config() -> dict:
    """`graphs.graph_compilation_config`, refused where it cannot help: CPU engines capture
    no CUDA graphs."""
    from .graphs import graph_compilation_config

    if not on_cuda():
        raise ValueError("CUDA graphs need a CUDA device; this machine has none (drop "
                         "--cuda-graphs / cuda_graphs=True)")
    return graph_compilation_config()


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class SolaLLM:
    def __init__(self, model: str | Path | None = None, config: SolaConfig | None = None, *,
                 max_edits: int = 1024, max_keys: int = 4096, max_rank: int = 8,
                 apply: str = "auto", router: str = "auto", cuda_graphs: bool = False,
                 **llm_kwargs):
        """apply: how routed LoRA deltas are added ("auto", "torch" or "punica", see
        `ServingConfig.apply`); router: the nearest-key search ("auto", "torch" or "triton",
        `ServingConfig.router`); cuda_graphs: on CUDA, piecewise graphs split at the router
        instead of eager (see `graphs`)."""
        from vllm import LLM

        from ..models import resolve_model

        self.model_path = resolve_model(model)
        self.config = config or SolaConfig()
        self.serving = serving_config(self.model_path, self.config, max_edits=max_edits,
                                      max_keys=max_keys, max_rank=max_rank, apply=apply,
                                      router=router)
        # the caller's vLLM options win (enforce_eager included), but never prefix caching
        # with mean-pooled keys under Model Runner V2
        check_prefix_caching(self.serving, llm_kwargs.get("enable_prefix_caching"))
        kwargs = engine_kwargs(self.model_path, self.serving, cuda_graphs)
        self.llm = LLM(**{**kwargs, **llm_kwargs})

    def close(self) -> None:
        """Stop the engine's processes now (instead of at interpreter exit)."""
        self.llm.llm_engine.engine_core.shutdown()

    # --- edits ----------------------------------------------------------------------------------
    def _rpc(self, method: str, *args):
        replies = self.llm.collective_rpc(method, args=args)
        for reply in replies:
            if not reply["ok"]:
                raise SolaRpcError(reply["error"])
        return replies[0]["result"]

    def capture_keys(self, prompts: list[str]) -> list[str]:
        """Run the prompts through this engine (one token each) and keep each key-token
        residual in the worker, so serving keys come from the serving engine's numerics."""
        from vllm import SamplingParams

        ids = [f"cap-{uuid.uuid4().hex}" for _ in prompts]
        self._rpc("sola_expect_captures", ids)
        params = [SamplingParams(max_tokens=1, extra_args={"sola_capture": c}) for c in ids]
        self.llm.generate(list(prompts), params, use_tqdm=False)
        return ids

    def add_edit(self, edit: Edit, active: bool = True) -> dict:
        return self.add_edits([edit], active)[0]

    def add_edits(self, edits: list[Edit], active: bool = True, chunk: int = 64,
                  capture_chunk: int = 1024) -> list[dict]:
        """Hot-add edits: their prompts' keys are captured in batched passes of up to
        `capture_chunk` edits (the worker holds at most MAX_PENDING_CAPTURES pending keys), then
        added with one RPC per `chunk` edits, each all or nothing. A refused chunk raises; the
        chunks before it stay added."""
        results = []
        for first in range(0, len(edits), capture_chunk):
            results += self._add_captured(edits[first:first + capture_chunk], active, chunk)
        return results

    def _add_captured(self, edits: list[Edit], active: bool, chunk: int) -> list[dict]:
        ids = self.capture_keys([p for edit in edits for p in edit.prompts])
        per_edit, start = [], 0
        for edit in edits:
            per_edit.append(ids[start:start + len(edit.prompts)])
            start += len(edit.prompts)
        results = []
        try:
            for first in range(0, len(edits), chunk):
                blobs = [e.to_bytes() for e in edits[first:first + chunk]]
                results += self._rpc("sola_add_edits", blobs, per_edit[first:first + chunk],
                                     active)
        finally:
            self.llm.collective_rpc("sola_drop_captures", args=(ids,))
        return results

    def revoke(self, edit_id: str) -> dict:
        return self._rpc("sola_set_active", edit_id, False)

    def restore(self, edit_id: str) -> dict:
        return self._rpc("sola_set_active", edit_id, True)

    def remove(self, edit_id: str) -> None:
        self._rpc("sola_remove_edit", edit_id)

    def list_edits(self) -> list[dict]:
        return self._rpc("sola_list_edits")

    def stats(self) -> dict:
        return self._rpc("sola_stats")

    # --- generation -----------------------------------------------------------------------------
    def generate(self, prompts: list[str], max_tokens: int = 32, **sampling) -> list[Completion]:
        """Greedy by default (temperature 0)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=sampling.pop("temperature", 0),
                                **sampling)
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [Completion(o.outputs[0].text, list(o.outputs[0].token_ids)) for o in outputs]
