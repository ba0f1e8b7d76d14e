"""Run by tests/test_vllm_plugin.py in a process of its own: the plugin under vLLM's piecewise
compilation split at the router, what `sola-vllm serve --cuda-graphs` configures
(`graphs.graph_compilation_config`), minus the CUDA-graph capture this machine cannot do.

On CPU vLLM otherwise compiles whole graphs (DYNAMO_TRACE_ONCE) and never splits them, so this
process patches the CPU platform's config hook to keep VLLM_COMPILE with the graph config's
splitting ops, and runs the engine in process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the patch
reaches it. vLLM's defunctionalization pass is skipped: it names CUDA-only ops that the CPU
build lacks (Inductor lowers the mutating ops itself).

argv: model path, JSON file {"edits": [edit files], "prompts": [...], "revoke": edit id,
"max_tokens": n}. Prints one line "RESULT {json}": the split pieces holding sola ops, the greedy
tokens of the prompts, and the tokens after revoking.
"""

import json
import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"  # split afresh, so the pieces are seen
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def force_piecewise(pieces: list) -> None:
    import vllm.compilation.backends as backends
    from vllm.compilation.passes.utility.fix_functionalization import FixFunctionalizationPass
    from vllm.config.compilation import CompilationMode, CUDAGraphMode
    from vllm.platforms.cpu import CpuPlatform

    from sola_vllm.serving.graphs import graph_compilation_config

    original = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        original(cls, vllm_config)
        compilation = vllm_config.compilation_config
        compilation.mode = CompilationMode.VLLM_COMPILE
        compilation.backend = "inductor"
        compilation.splitting_ops = graph_compilation_config()["splitting_ops"]
        compilation.cudagraph_mode = CUDAGraphMode.NONE  # no CUDA here: pieces run uncaptured
        compilation.compile_sizes = []

    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    FixFunctionalizationPass.__call__ = lambda self, graph: None
    split = backends.split_graph

    def recording_split(graph, splitting_ops):
        split_gm, items = split(graph, splitting_ops)
        for item in items:
            ops = [str(n.target) for n in item.graph.graph.nodes if n.op == "call_function"]
            sola = sorted({op.removesuffix(".default") for op in ops if op.startswith("sola.")})
            if sola:
                pieces.append({"sola_ops": sola, "ops": len(ops),
                               "eager": item.is_splitting_graph, "id": item.graph_id})
        return split_gm, items

    backends.split_graph = recording_split


def main() -> None:
    model, spec_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    pieces: list = []
    force_piecewise(pieces)
    from sola_vllm.edit import Edit
    from sola_vllm.serving.llm import SolaLLM

    llm = SolaLLM(model, max_edits=8, max_keys=16, dtype="float32", enforce_eager=False,
                  max_model_len=512, seed=0)
    try:
        llm.add_edits([Edit.from_bytes(Path(p).read_bytes()) for p in spec["edits"]])
        tokens = [c.token_ids for c in llm.generate(spec["prompts"], spec["max_tokens"])]
        llm.revoke(spec["revoke"])
        revoked = [c.token_ids for c in llm.generate(spec["prompts"], spec["max_tokens"])]
    finally:
        llm.close()
    print("RESULT " + json.dumps({"pieces": pieces, "tokens": tokens, "revoked": revoked}),
          flush=True)


if __name__ == "__main__":
    main()
