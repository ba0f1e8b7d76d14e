"""Worker RPCs (`--worker-extension-cls sola_vllm.serving.worker_ext.SolaWorkerExtension`).

vLLM runs them between engine steps, so a change is visible from the next scheduled step on.
Arguments and results are plain msgpack-able values: edits travel as the artifact's bytes.
Expected failures come back as {"ok": False, "error": ...}; nothing is half-applied.
"""

from __future__ import annotations

import torch

from ..edit import Edit, EditFormatError
from .runtime import CapacityError

_EXPECTED = (ValueError, KeyError, EditFormatError, CapacityError)


def _result(fn):
    def wrapper(self, *args):
        try:
            return {"ok": True, "result": fn(self, *args)}
        except _EXPECTED as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return {"ok": False, "error": str(message), "type": type(exc).__name__}

    wrapper.__name__ = fn.__name__
    return wrapper


def _add_edits(runtime, artifacts: list, capture_ids: list, active: bool) -> list[dict]:
    edits = [Edit.from_bytes(bytes(a)) for a in artifacts]
    for edit, ids in zip(edits, capture_ids, strict=True):
        if len(ids) != len(edit.prompts):
            raise ValueError(f"edit {edit.id} has {len(edit.prompts)} prompts but "
                             f"{len(ids)} captured keys were named")
    wanted = [str(c) for ids in capture_ids for c in ids]
    keys = runtime.take_captures(wanted)  # [sum of prompts, d]; refuses missing ones
    per_edit = list(torch.split(keys, [len(ids) for ids in capture_ids]))
    summaries = runtime.add_edits(edits, per_edit, active=bool(active))
    for summary, edit, edit_keys in zip(summaries, edits, per_edit, strict=True):
        drift = 1 - torch.nn.functional.cosine_similarity(edit_keys, edit.keys.float(),
                                                          dim=-1)
        summary["key_drift_vs_reference"] = [float(d) for d in drift]
    return summaries


class SolaWorkerExtension:
    def _sola(self):
        model = self.model_runner.get_model()
        runtime = getattr(model, "sola", None)
        if runtime is None:
            raise ValueError("this vLLM model was not built with the sola-vllm plugin")
        return runtime

    @_result
    def sola_add_edit(self, artifact: bytes, capture_ids: list, active: bool = True) -> dict:
        """Load an edit; its routing keys are the ones this engine captured for its prompts."""
        (summary,) = _add_edits(self._sola(), [artifact], [capture_ids], active)
        return summary

    @_result
    def sola_add_edits(self, artifacts: list, capture_ids: list, active: bool = True) -> list:
        """`sola_add_edit` for many edits in one call, all or nothing (capture_ids[i] names
        the keys captured for artifacts[i]'s prompts)."""
        if len(artifacts) != len(capture_ids):
            raise ValueError(f"{len(artifacts)} artifacts but {len(capture_ids)} capture lists")
        return _add_edits(self._sola(), artifacts, capture_ids, active)

    @_result
    def sola_load_checked(self, artifact: bytes, capture_ids: list, probes: list,
                          probe_capture_ids: list) -> dict:
        """Load an edit unrouted and return its pre-flight report (its keys against the routed
        edits', the probes routed), in one call so an add under load waits for one engine step.
        All or nothing: an edit whose check fails is unloaded again."""
        runtime = self._sola()
        probe_keys = runtime.take_captures(list(probe_capture_ids)) if probe_capture_ids else None
        (summary,) = _add_edits(runtime, [artifact], [capture_ids], False)
        try:
            check = runtime.preflight(runtime.loaded_group(summary["id"]), list(probes),
                                      probe_keys)
        except BaseException:
            runtime.remove_edit(summary["id"])
            raise
        return {"serving": summary, "check": check}

    @_result
    def sola_describe_edit(self, edit_id: str) -> dict | None:
        """One loaded edit's serving state, or None when it is not loaded."""
        runtime = self._sola()
        return runtime.describe(str(edit_id)) if str(edit_id) in runtime.edits else None

    @_result
    def sola_set_active(self, edit_id: str, active: bool) -> dict:
        return self._sola().set_active(str(edit_id), bool(active))

    @_result
    def sola_set_state(self, edit_id: str, state: str) -> dict:
        """Route a loaded edit by its lifecycle state (active, canary, staged, revoked)."""
        return self._sola().set_state(str(edit_id), str(state))

    @_result
    def sola_check_captured(self, name: str, prompts: list, capture_ids: list, probes: list,
                            probe_capture_ids: list, forms: list | None = None) -> dict:
        """The pre-flight report of an edit that is not loaded: its prompts' keys captured,
        of the given key forms (None: every one "raw")."""
        from ..preflight import KeyGroup

        runtime = self._sola()
        keys = runtime.take_captures(list(capture_ids))
        probe_keys = runtime.take_captures(list(probe_capture_ids)) if probe_capture_ids else None
        group = KeyGroup(str(name), "new", keys, list(prompts),
                         None if forms is None else [str(f) for f in forms])
        return runtime.preflight(group, list(probes), probe_keys)

    @_result
    def sola_remove_edit(self, edit_id: str) -> None:
        self._sola().remove_edit(str(edit_id))

    @_result
    def sola_list_edits(self) -> list:
        return self._sola().list_edits()

    @_result
    def sola_stats(self) -> dict:
        return self._sola().stats()

    @_result
    def sola_expect_captures(self, capture_ids: list) -> None:
        self._sola().expect_captures([str(c) for c in capture_ids])

    @_result
    def sola_drop_captures(self, capture_ids: list) -> None:
        self._sola().drop_captures([str(c) for c in capture_ids])

    @_result
    def sola_observe(self) -> dict:
        """Counters and gauges for /metrics (see `metrics.py`): loaded edits by state,
        requests routed / not routed, hits per edit id, capacity in use."""
        runtime = self._sola()
        return {"edit_states": runtime.state_counts(), "stats": runtime.stats(),
                **runtime.request_log.counts()}

    @_result
    def sola_provenance(self, response_id: str) -> list:
        """The logged routing decisions of one completion (see `provenance.belongs_to`)."""
        return self._sola().request_log.lookup(str(response_id))
