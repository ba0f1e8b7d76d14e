"""CUDA graphs with SoLA routing: piecewise graphs, split at the router.

What a replayed graph cannot do is run Python: the router decides each request's edit on the
host (`SolaRuntime.route`: which tokens are key tokens, nearest key, the per-request table), so
it must run at every step. The LoRA apply, once its inputs are on the device, need not:

- `sola::route` is a splitting op (`graph_compilation_config`): vLLM's piecewise backend cuts
  the compiled forward there and runs it eagerly between captured pieces, as it does attention.
  It writes the step's token slots and the punica kernels' metadata (`PunicaMeta`) into
  buffers allocated once, at fixed addresses, for the padded token count of the step.
- `sola::lora_apply` stays inside the captured pieces. With the punica backend it launches a
  fixed grid (`max_segments` groups; CTAs of the no-edit group and the padding exit on the
  device) that reads only those buffers and the slot-stacked weights, which edits write in
  place. What the capture recorded is right for every later step: a replay applies the edits
  the eager router just chose. vLLM captures with dummy batches (`runtime.step` is None: every
  slot -1); the metadata never takes the "no LoRA" host shortcut, so nothing is skipped.

Hence the conditions `check_graphs` enforces at engine start: graphs only in PIECEWISE mode
(FULL graphs would capture the router too), with `sola::route` among the splitting ops, and
the punica apply (the torch apply's `nonzero`/`unique` have data-dependent shapes). vLLM's
breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH=1) break only at vLLM's own ops: refused.

Status: tested on CPU: the split with vLLM's own `split_graph` and replays of recorded kernel
launches against the eager apply (tests/test_cuda_graphs.py), and the default model under
vLLM's piecewise compilation with these splitting ops, forced on CPU, giving the eager engine's
tokens (tests/test_vllm_plugin.py, tests/piecewise_engine.py). No graph has been captured on a
GPU yet, so CUDA engines stay eager unless graphs are asked for (`serve --cuda-graphs`,
`SolaLLM(cuda_graphs=True)`).
"""

from __future__ import annotations

ROUTE_OP = "sola::route"
_HINT = ("Start with sola-vllm serve --cuda-graphs (SolaLLM(cuda_graphs=True)): piecewise "
         "graphs split at the router; or with --enforce-eager")


def vllm_default_splitting_ops() -> list[str]:
    """The splitting ops vLLM itself would use for piecewise graphs (attention and KV-cache
    update ops), computed by the installed vLLM on a throwaway config."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode

    config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode="PIECEWISE")
    config.set_splitting_ops_for_v1("naive")
    return list(config.splitting_ops)


def graph_compilation_config() -> dict:
    """vLLM's `compilation_config` for CUDA graphs with SoLA: piecewise, split at vLLM's ops
    and at the router."""
    return {"mode": 3,  # CompilationMode.VLLM_COMPILE: graphs need the compiled forward
            "cudagraph_mode": "PIECEWISE",
            "splitting_ops": [*vllm_default_splitting_ops(), ROUTE_OP]}


def graphs_blocker(compilation_config, apply_choice: str, breakable: bool = False) -> str | None:
    """Why this engine's CUDA-graph settings would replay a stale route, or None.
    apply_choice: the apply backend chosen for the model ("torch" or "punica");
    breakable: vLLM's breakable CUDA graphs are enabled."""
    mode = getattr(compilation_config, "cudagraph_mode", None)
    if mode is None or mode.name == "NONE":
        return None
    if mode.has_full_cudagraphs():
        return (f"cudagraph_mode {mode.name} captures whole forwards, the router with them; "
                "sola-vllm needs PIECEWISE graphs split at the router")
    if breakable:
        return ("vLLM's breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH=1) would capture "
                "the router; use the compiled piecewise graphs")
    if ROUTE_OP not in (getattr(compilation_config, "splitting_ops", None) or []):
        return (f"cudagraph_mode {mode.name} without {ROUTE_OP!r} among the splitting ops "
                "would capture the router")
    if apply_choice != "punica":
        return (f"the {apply_choice!r} apply is not graph-safe (data-dependent shapes); CUDA "
                "graphs need the punica apply")
    return None


def check_graphs(vllm_config, apply_choice: str) -> None:
    """Refuse, at engine start, CUDA-graph settings that would replay a stale route."""
    from vllm.compilation.breakable_cudagraph import is_breakable_cudagraph_enabled

    blocker = graphs_blocker(vllm_config.compilation_config, apply_choice,
                             is_breakable_cudagraph_enabled())
    if blocker:
        raise ValueError(f"sola-vllm cannot route under these CUDA graphs: {blocker}. {_HINT}")
