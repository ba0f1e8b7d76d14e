"""vLLM's Triton LoRA kernels runnable on CPU, in Triton's interpreter (TRITON_INTERPRET=1, set
by tests/conftest.py). On the CPU wheel vLLM disables Triton (HAS_TRITON is False and
`triton.jit` is a no-op placeholder), so the installed op modules cannot launch; these are the
same kernel sources re-executed with the real triton."""

import contextlib
import importlib.util
import os
import sys


def small_tiles(op_type, *args, **kwargs):
    """Interpreter-sized tiles (split-K 2 keeps the atomic-add path); the GPU uses vLLM's."""
    if op_type == "shrink":
        return dict(block_m=16, block_n=16, block_k=32, split_k=2, num_warps=4, num_ctas=1,
                    group_size_m=8, num_stages=2, max_nreg=None)
    return dict(block_m=16, block_n=32, block_k=16, num_warps=4, num_ctas=1, num_stages=2,
                max_nreg=None)


@contextlib.contextmanager
def _patched(obj, **attrs):
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


def interpreted_vllm_ops(small: bool):
    """vLLM's `_lora_shrink`/`_lora_expand` re-executed from their source files with the real
    triton (see `interpreted_vllm_modules`)."""
    mods = interpreted_vllm_modules(small)
    return mods["lora_shrink_op"].lora_shrink, mods["lora_expand_op"].lora_expand


def interpreted_vllm_modules(small: bool) -> dict:
    """vLLM's LoRA op modules ("kernel_utils", "lora_shrink_op", "lora_expand_op") re-executed
    from their source files with the real triton (the installed modules hold
    placeholder-decorated functions). Registration is skipped through the modules' own
    `except AttributeError` fallback; sys.modules and `vllm.triton_utils` are restored
    afterwards."""
    import triton
    import triton.language as tl
    import vllm.lora.ops.triton_ops as pkg
    import vllm.triton_utils as triton_utils
    import vllm.utils.torch_utils as torch_utils

    def skip_registration(*args, **kwargs):
        raise AttributeError("not registered: interpreter copy")

    names = ["kernel_utils", "lora_shrink_op", "lora_expand_op"]
    saved = {n: sys.modules[f"{pkg.__name__}.{n}"] for n in names}
    mods = {}
    try:
        with _patched(triton_utils, triton=triton, tl=tl), \
                _patched(torch_utils, direct_register_custom_op=skip_registration):
            for n in names:
                full = f"{pkg.__name__}.{n}"
                spec = importlib.util.spec_from_file_location(
                    full, os.path.join(os.path.dirname(pkg.__file__), f"{n}.py"))
                mods[n] = importlib.util.module_from_spec(spec)
                sys.modules[full] = mods[n]  # so lora_*_op import this kernel_utils copy
                spec.loader.exec_module(mods[n])
    finally:
        sys.modules.update(saved)
    if small:
        for n in ("lora_shrink_op", "lora_expand_op"):
            mods[n].get_lora_op_configs = small_tiles
    return mods


def clear_pointer_caches() -> None:
    """vLLM caches weight pointers (and offset_start) keyed by data_ptr only: a freed test
    tensor's address reused by the next test would hit a stale entry."""
    from vllm.lora.ops.triton_ops import utils

    utils._LORA_A_PTR_DICT.clear()
    utils._LORA_B_PTR_DICT.clear()
