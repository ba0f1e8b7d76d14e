"""sola-vllm: reversible, routed knowledge edits (SoLA, arXiv 2603.11239) served by vLLM.

Names load lazily, so vLLM's plugin entry point (`sola_vllm.plugin`) imports nothing heavy.
"""

__all__ = ["Edit", "EditStore", "RoutedEngine", "SolaConfig", "SolaLLM"]

_WHERE = {"Edit": ".edit", "EditStore": ".store", "RoutedEngine": ".engine",
          "SolaConfig": ".config", "SolaLLM": ".serving.llm"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'sola_vllm' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(_WHERE[name], __name__), name)
