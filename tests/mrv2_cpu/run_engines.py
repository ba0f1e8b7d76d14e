"""Runs vLLM engines under Model Runner V2 on CPU for tests/test_mrv2.py, in a process of its
own (the Triton switch of `sitecustomize.py` beside this file is process-wide).

    python run_engines.py SPEC.json OUT.json

SPEC: {"edits": [paths of Edit.to_bytes() files], "max_tokens": n, "engines": [{"name": str,
"plugin": bool, "options": {LLM kwargs}, "steps": [{"generate": [prompts]} | {"revoke": id} |
{"restore": id} | {"stats": true}], "env"?: {variables set before it is built}}]}.
OUT: {"runner": {name: [runner class, model state class]}, "results": {name: [one result per
step]}}; engines are built one after another."""

import json
import os
import sys
from pathlib import Path


def runner_info(worker) -> list[str]:
    runner = worker.model_runner
    state = getattr(runner, "model_state", None)
    return [f"{type(runner).__module__}.{type(runner).__qualname__}", type(state).__name__]


def build(engine: dict, edits: list):
    if engine["plugin"]:
        from sola_vllm.serving.llm import SolaLLM

        llm = SolaLLM(**engine["options"])
        llm.add_edits(edits)
        return llm, llm.llm
    from vllm import LLM

    from sola_vllm.models import fetch_default_model

    llm = LLM(model=str(fetch_default_model(progress=False)), **engine["options"])
    return llm, llm


def run_step(llm, vllm_llm, step: dict, max_tokens: int):
    from vllm import SamplingParams

    if "generate" in step:
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        outs = vllm_llm.generate(step["generate"], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    if "revoke" in step:
        return llm.revoke(step["revoke"])["state"]
    if "restore" in step:
        return llm.restore(step["restore"])["state"]
    return llm.stats()


def main(spec_path: str, out_path: str) -> None:
    from sola_vllm.edit import Edit

    spec = json.loads(Path(spec_path).read_text())
    edits = [Edit.from_bytes(Path(p).read_bytes()) for p in spec["edits"]]
    out = {"runner": {}, "results": {}}
    for engine in spec["engines"]:
        saved = dict(os.environ)
        os.environ.update(engine.get("env", {}))  # read by vLLM when the engine is built
        llm, vllm_llm = build(engine, edits)
        os.environ.clear()
        os.environ.update(saved)
        try:
            out["runner"][engine["name"]] = vllm_llm.collective_rpc(runner_info)[0]
            out["results"][engine["name"]] = [run_step(llm, vllm_llm, s, spec["max_tokens"])
                                              for s in engine["steps"]]
        finally:
            vllm_llm.llm_engine.engine_core.shutdown()
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:])
