"""SolaRuntime: the edits, keys and per-request routes of one vLLM model (in its worker).

Capacity is preallocated at start: `max_edits` LoRA slots (in the apply backend chosen once by
`apply_backend.make_lora_backend`: fp32 `LoraStacks`, or the model-dtype stacks of vLLM's Triton
kernels on CUDA) and `max_keys` key rows ([K, d] fp32). An edit's keys route to its
slot while it is active; revoking it clears the keys' owners, so no new request routes to it,
while requests already routed keep their edit until they finish (decision 3: a response is
either wholly edited or wholly base). With `revoked_keys="block"` (`config.RouterConfig`) a
revoked edit's keys stay in the routed table, owned by no edit (-1) and after every routed key:
a request whose nearest key is one runs the base model. Routes are decided once per request
at its key token and kept by request id until the request finishes, so they survive preemption
and recompute.

Lifecycle: an active edit routes for every request, a canary edit only for requests that opt
in (`"vllm_xargs": {"sola_canary": true}`, or a request id in the configured canary fraction);
staged and revoked edits route for none. A request that does not opt in routes exactly as if
the canary edits were not there.

Keys (`ServingConfig.key_pool`, `route_layer`): the router reads the residual stream entering
the route layer. "last": a request's query is its key token's state. "mean": the fp32 mean of
its prompt states (`keys.pool_keys`), summed across prefill chunks by `pooling.MeanPooler`; a
prefix-cache hit's skipped blocks add the sums kept per KV block (`block_sums.BlockSums`,
under the V1 runner; Model Runner V2 refuses prefix caching with mean keys), and a request
whose prompt positions did not all reach the router otherwise routes to no edit and is counted
(`incomplete_pooled_keys`). Captures record the raw query either way.

Key map (`ServingConfig.key_map`, a `key_map.KeyMap` loaded and checked against the model and
the keys at start): stored keys and captures stay raw; the routed key table and each query are
mapped before the nearest-key search (the Triton router's start check runs on the mapped
width), and pre-flight reports take distances after the map, as the reference engine does.
"""

from __future__ import annotations

import heapq
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..edit import STATES, Edit, mismatch
from ..key_map import KeyMap
from ..preflight import KeyGroup, check
from ..routing import key_thresholds
from .apply_backend import Kernels, make_lora_backend
from .config import ServingConfig
from .pooling import MeanPooler
from .provenance import RequestLog
from .route_kernel import choose_router, make_nearest, prepare_keys, self_check
from .staging import PinnedStaging, device_index

UNDECIDED = -2
MAX_PENDING_CAPTURES = 4096


class CapacityError(ValueError):
    """Edit or key capacity (fixed at start) is exhausted, or the edit's rank is too large."""


@dataclass
class StepMeta:
    """Per-step token layout, set by the runner hook before the forward."""

    num_tokens: int
    tok_row: np.ndarray  # [T] int64: row of each scheduled token
    tok_pos: np.ndarray  # [T] int64: position of each token in its sequence
    row_prompt_len: np.ndarray  # [n] int64: original prompt length per row
    req_ids: list[str]  # [n]
    captures: list[str | None]  # [n]: key-capture id of capture requests
    canary: list[bool] = field(default_factory=list)  # [n]: the request opts in to canaries
    # mean keys with prefix caching (`block_sums.BlockSums`): the rows' KV block tables
    # ([n, >= blocks per row] physical block ids), their block size and the KV cache's block
    # count; None where the runner does not give them (prefix-cache hits then stay incomplete)
    row_blocks: np.ndarray | None = None
    block_size: int = 0
    num_kv_blocks: int = 0


class RoutedKeys(NamedTuple):
    """The keys a request routes among (`SolaRuntime.routed_keys`), on the model's device."""

    keys: torch.Tensor  # [N, k] fp32, mapped
    owners: torch.Tensor  # [N] int32 edit slots (-1: a blocking key)
    prepared: torch.Tensor | None  # what the router precomputes of them (`prepare_keys`)
    thresholds: torch.Tensor  # [N] fp32: each key's threshold (its form's)


@dataclass
class _Search:
    """One launched nearest-key search: the step's key tokens it routes (token indices, with
    their requests) and its results on the model's device (edit slot int32, distance fp32)."""

    tokens: np.ndarray
    req_ids: list[str]
    slots: torch.Tensor
    dists: torch.Tensor


@dataclass
class LoraTarget:
    """One edited HF module inside a vLLM linear: its output columns [offset, offset+out)."""

    name: str  # lora_name(layer, module)
    offset: int
    out_features: int
    in_features: int


@dataclass
class _SlotInfo:
    slot: int
    key_rows: list[int]
    rank: int
    scale: float
    state: str  # the lifecycle state it routes by: active, canary, or staged / revoked (none)
    # (revoked keys may block: `SolaRuntime.routed_keys`)
    summary: dict
    forms: list[str]  # each key row's form (`Edit.forms`)

    @property
    def routed(self) -> bool:
        return self.state in ("active", "canary")

    @property
    def active(self) -> bool:  # routed for every request
        return self.state == "active"


class SolaRuntime:
    def __init__(self, config: ServingConfig, hidden_size: int, targets: list[list[LoraTarget]],
                 max_num_tokens: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", max_seqs: int | None = None,
                 kernels: Kernels | None = None):
        """dtype, device: the model's (they pick the apply backend, see `make_lora_backend`);
        max_seqs: requests per step; kernels: replace vLLM's LoRA ops (tests)."""
        self.config = config
        self.hidden_size = hidden_size
        self.targets = targets  # per patched vLLM linear: the edited modules it holds
        self.lora = make_lora_backend(config, targets, max_num_tokens, dtype=dtype,
                                      device=device, max_seqs=max_seqs, kernels=kernels)
        self.key_map = load_key_map(config, hidden_size, device)  # None: raw distances
        key_dim = hidden_size if self.key_map is None else self.key_map.out_dim
        self.router = choose_router(config.router, device)  # "torch" or "triton"
        self._nearest = make_nearest(self.router)
        if self.router == "triton":  # a wrong kernel stops the engine at start
            self_check(self._nearest, key_dim, device, config.metric, config.threshold)
        # vLLM builds models under the model dtype and device as torch's defaults, and runs
        # the forward outside them: name both explicitly, here and per forward (`route`)
        on = dict(device=device)
        self.keys = torch.zeros(config.max_keys, hidden_size, dtype=torch.float32, **on)
        self.key_owner = torch.full((config.max_keys,), -1, dtype=torch.int32, **on)
        self.key_threshold = torch.zeros(config.max_keys, dtype=torch.float32, **on)
        # per slot: a canary edit, routed only for requests that opt in
        self.slot_canary = torch.zeros(config.max_edits, dtype=torch.bool, **on)
        self.tok_slot = torch.full((max_num_tokens,), -1, dtype=torch.int32, **on)
        self._slot_staging = (PinnedStaging(max_num_tokens, torch.int32)
                              if self.tok_slot.is_cuda else None)
        self.edits: dict[str, _SlotInfo] = {}
        self.slot_edit: list[str | None] = [None] * config.max_edits
        # lowest free slot first; key rows in the order they were freed (O(1) per add/remove)
        self.free_slots = list(range(config.max_edits))  # a heap
        self.free_key_rows = deque(range(config.max_keys))
        self.routes: dict[str, int] = {}  # request id -> edit slot (-1: base model)
        self.captures: dict[str, torch.Tensor] = {}  # capture id -> fp32 key
        self.expected: set[str] = set()  # capture ids announced by an RPC (clients can't forge)
        self.hits = np.zeros(config.max_edits, dtype=np.int64)  # routed requests per slot
        self.request_log = RequestLog(config.request_log)  # provenance and hit counts
        self.recomputed_keys = 0  # key tokens seen again (preemption + recompute): route kept
        # "mean" keys: per-request sums across prefill chunks; keys missing prompt states
        self.pooler = MeanPooler(hidden_size) if config.key_pool == "mean" else None
        self.incomplete_keys = 0
        self.step: StepMeta | None = None
        self._forward = self.lora.prepare(self.tok_slot[:0])  # this forward's apply state
        self._key_tables: dict[bool, tuple] = {}  # opted in -> see routed_keys

    # --- edits ----------------------------------------------------------------------------------
    def check_edit(self, edit: Edit, keys: torch.Tensor) -> None:
        """Every reason to refuse an edit, checked before anything changes."""
        cfg = self.config
        problem = mismatch(edit, cfg.model_fingerprint, cfg.shape_fingerprint, cfg.layers,
                           cfg.modules, "this server")
        if problem:
            raise ValueError(problem)
        if edit.id in self.edits:
            raise ValueError(f"edit {edit.id} is already loaded")
        if edit.rank > cfg.max_rank:
            raise CapacityError(f"edit {edit.id} has rank {edit.rank}; the server's max rank is "
                                f"{cfg.max_rank}")
        if not self.free_slots:
            raise CapacityError(f"all {cfg.max_edits} edit slots are in use")
        if keys.ndim != 2 or keys.shape[1] != self.hidden_size or keys.shape[0] == 0:
            raise ValueError(f"edit {edit.id}: keys of shape {tuple(keys.shape)}, expected "
                             f"[n, {self.hidden_size}]")
        if not bool(torch.isfinite(keys).all()):
            raise ValueError(f"edit {edit.id}: keys hold NaN or Inf")
        if len(edit.forms()) != keys.shape[0]:
            raise ValueError(f"edit {edit.id}: {keys.shape[0]} keys for {len(edit.forms())} "
                             "key forms")
        if keys.shape[0] > len(self.free_key_rows):
            raise CapacityError(f"edit {edit.id} needs {keys.shape[0]} key rows; "
                                f"{len(self.free_key_rows)} of {cfg.max_keys} are free")
        for name, (a, b) in edit.lora.items():
            if name not in self.lora.names():
                raise ValueError(f"edit {edit.id}: module {name} is not edited by this server")
            if (a.shape[1], b.shape[0]) != self.lora.in_out(name):
                raise ValueError(f"edit {edit.id}: {name} has A {tuple(a.shape)}, B "
                                 f"{tuple(b.shape)}, which do not fit the model's module")

    def add_edit(self, edit: Edit, keys: torch.Tensor, active: bool = True) -> dict:
        keys = keys.float()
        self.check_edit(edit, keys)
        slot = heapq.heappop(self.free_slots)
        rows = [self.free_key_rows.popleft() for _ in range(keys.shape[0])]
        self.lora.write(slot, edit.lora, edit.rank, float(edit.scale))
        self.keys[rows] = keys.to(self.keys.device)  # RPCs and the store hand CPU keys
        self.key_threshold[rows] = key_thresholds(edit.forms(), self.config.thresholds,
                                                  self.keys.device)
        self.slot_edit[slot] = edit.id
        self.hits[slot] = 0
        self.request_log.loaded(edit.id)
        summary = {k: v for k, v in edit.summary().items() if k != "train_info"}
        self.edits[edit.id] = _SlotInfo(slot, rows, edit.rank, float(edit.scale), "staged",
                                        summary, edit.forms())
        if active:  # staged otherwise: it routes and blocks nothing, the routed table stands
            self.set_active(edit.id, True)
        return self.describe(edit.id)

    def add_edits(self, edits: list[Edit], keys: list[torch.Tensor],
                  active: bool = True) -> list[dict]:
        """All or nothing: every edit is checked, against the capacity left for the whole
        batch too, before the first is added."""
        keys = [k.float() for k in keys]
        ids = [e.id for e in edits]
        if len(set(ids)) != len(ids):
            twice = sorted(i for i in set(ids) if ids.count(i) > 1)
            raise ValueError(f"the batch names an edit twice: {twice}")
        for edit, edit_keys in zip(edits, keys, strict=True):
            self.check_edit(edit, edit_keys)
        if len(edits) > len(self.free_slots):
            raise CapacityError(f"{len(edits)} edits need as many slots; "
                                f"{len(self.free_slots)} of {self.config.max_edits} are free")
        rows = sum(k.shape[0] for k in keys)
        if rows > len(self.free_key_rows):
            raise CapacityError(f"{len(edits)} edits need {rows} key rows; "
                                f"{len(self.free_key_rows)} of {self.config.max_keys} are free")
        return [self.add_edit(e, k, active) for e, k in zip(edits, keys, strict=True)]

    def set_active(self, edit_id: str, active: bool) -> dict:
        return self.set_state(edit_id, "active" if active else "revoked")

    def set_state(self, edit_id: str, state: str) -> dict:
        """Route a loaded edit as its lifecycle state says (see the module docstring)."""
        info = self._info(edit_id)
        if state not in STATES:
            raise ValueError(f"edit state {state!r} is not one of {STATES}")
        info.state = state
        self.key_owner[info.key_rows] = info.slot if info.routed else -1
        self.slot_canary[info.slot] = state == "canary"
        self._key_tables = {}
        return self.describe(edit_id)

    def remove_edit(self, edit_id: str) -> None:
        """Free an edit's slot and keys. Refused while a request still routes to it."""
        info = self._info(edit_id)
        if info.slot in self.routes.values():
            raise ValueError(f"edit {edit_id} is still used by in-flight requests")
        self.set_state(edit_id, "staged")  # its keys leave the routed table, blocking or not
        self.free_key_rows.extend(info.key_rows)
        self.lora.clear(info.slot)  # a freed slot adds exact zeros until it is written again
        self.slot_edit[info.slot] = None
        heapq.heappush(self.free_slots, info.slot)
        del self.edits[edit_id]

    def describe(self, edit_id: str) -> dict:
        info = self._info(edit_id)
        return {**info.summary, "state": info.state,
                "slot": info.slot, "hits": int(self.hits[info.slot])}

    def state_counts(self) -> dict[str, int]:
        """Loaded edits by state. Allocates nothing per edit: it runs every second (metrics)
        and, with thousands of edits, per-edit objects cost the engine loop garbage
        collections (a list of per-edit dicts took ~140 ms at 10,000 edits)."""
        counts = dict.fromkeys(STATES, 0)
        for info in self.edits.values():
            counts[info.state] += 1
        return counts

    def list_edits(self) -> list[dict]:
        return [self.describe(edit_id) for edit_id in self.edits]

    def stats(self) -> dict:
        return {"edits": len(self.edits), "max_edits": self.config.max_edits,
                "keys_in_use": self.config.max_keys - len(self.free_key_rows),
                "max_keys": self.config.max_keys, "requests_in_flight": len(self.routes),
                "pending_captures": len(self.captures) + len(self.expected),
                "routed_requests": self.request_log.routed,
                "unrouted_requests": self.request_log.unrouted,
                "recomputed_key_tokens": self.recomputed_keys,
                "incomplete_pooled_keys": self.incomplete_keys}

    def _info(self, edit_id: str) -> _SlotInfo:
        if edit_id not in self.edits:
            raise KeyError(f"no edit {edit_id!r} is loaded")
        return self.edits[edit_id]

    def active_keys(self) -> RoutedKeys:
        """The keys every request routes among (active edits); see `routed_keys`."""
        return self.routed_keys(opted_in=False)

    def routed_keys(self, opted_in: bool) -> RoutedKeys:
        """The keys a request routes among (`RoutedKeys`: keys [N, k], owner slots, what the
        router precomputes of them, per-key thresholds): active edits' keys, plus canary
        edits' when it opts in, then revoked edits' keys owned by -1 when they block
        (`revoked_keys`), mapped by the key map if there is one (k = its width, else d).
        Rebuilt only after a change: a step with key tokens then only maps and normalizes its
        queries."""
        if opted_in not in self._key_tables:  # rows listed on the host: no wait for the GPU
            states = ("active", "canary") if opted_in else ("active",)
            routed = sorted(row for info in self.edits.values() if info.state in states
                            for row in info.key_rows)
            rows = device_index(np.asarray(routed + self._blocking_rows(), dtype=np.int64),
                                self.keys.device)
            keys = self.mapped(self.keys[rows]).contiguous()
            prepared = prepare_keys(self.router, keys, self.config.metric)
            self._key_tables[opted_in] = RoutedKeys(keys, self.key_owner[rows].contiguous(),
                                                    prepared, self.key_threshold[rows].contiguous())
        return self._key_tables[opted_in]

    def _blocking_rows(self) -> list[int]:
        """Key rows of revoked edits when revoked keys block (their owner is -1), else none."""
        if self.config.revoked_keys != "block":
            return []
        return [row for info in self.edits.values() if info.state == "revoked"
                for row in info.key_rows]

    def opts_in(self, req_id: str, flag: bool) -> bool:
        """A request sees canary edits when it asks to, or when its id hashes into the
        configured canary fraction (deterministic: the same id, the same answer)."""
        fraction = self.config.canary_fraction
        return flag or (fraction > 0 and zlib.crc32(req_id.encode()) / 2**32 < fraction)

    # --- pre-flight check -------------------------------------------------------------------
    def key_groups(self) -> list[KeyGroup]:
        """The routed edits' keys (active and canary), as this engine captured them."""
        return [self.loaded_group(edit_id) for edit_id, info in self.edits.items() if info.routed]

    def preflight(self, new: KeyGroup, probes: list[str],
                  probe_keys: torch.Tensor | None) -> dict:
        """The pre-flight report of `new` against the routed edits (see `preflight`)."""
        return check(new, self.key_groups(), self.config.thresholds, self.config.metric,
                     probes or None, probe_keys, key_map=self.key_map)

    def loaded_group(self, edit_id: str) -> KeyGroup:
        info = self._info(edit_id)
        return KeyGroup(edit_id, info.state, self.keys[info.key_rows].clone(),
                        list(info.summary.get("prompts", [])), list(info.forms))

    def expect_captures(self, capture_ids: list[str]) -> None:
        """Only announced capture ids record keys: a request carrying any other
        `sola_capture` value is served and routed like every other request."""
        if len(self.expected) + len(self.captures) + len(capture_ids) > MAX_PENDING_CAPTURES:
            raise CapacityError(f"more than {MAX_PENDING_CAPTURES} key captures pending")
        self.expected.update(capture_ids)

    def drop_captures(self, capture_ids: list[str]) -> None:
        for capture_id in capture_ids:
            self.expected.discard(capture_id)
            self.captures.pop(capture_id, None)

    def take_captures(self, capture_ids: list[str]) -> torch.Tensor:
        missing = [c for c in capture_ids if c not in self.captures]
        if missing:
            raise ValueError(f"no key was captured for {missing}")
        return torch.stack([self.captures.pop(c) for c in capture_ids])

    def finish_requests(self, req_ids) -> None:
        for req_id in req_ids:
            self.routes.pop(req_id, None)
            self.request_log.finish(req_id)
            if self.pooler is not None:
                self.pooler.drop(req_id)

    # --- forward: routing at the key layer, LoRA apply in the edited linears -------------------
    def route(self, hidden: torch.Tensor) -> None:
        """hidden: [T, d], the residual stream entering the route layer. Decides the route of
        every request whose key token (its prompt's last token) is in this step, and writes
        each token's edit slot (-1 = none) into `tok_slot[:T]`. The searches' results reach
        the token slots and the apply's state on the device; the host reads them (one wait
        for the GPU, in steps with key tokens only) after all of that is queued."""
        num_tokens = hidden.shape[0]
        step = self.step
        slots = torch.full((num_tokens,), -1, dtype=torch.int32)
        searches: list[_Search] = []
        if step is not None and step.num_tokens <= num_tokens:  # else dummy/profile: no routing
            rows, pos = step.tok_row, step.tok_pos
            key_pos = step.row_prompt_len[rows] - 1  # [T]
            if self.pooler is not None:  # before the key tokens: their own states count
                pending = np.array([r not in self.routes for r in step.req_ids], dtype=bool)
                self.pooler.accumulate(hidden, step, pending)
            searches = self._decide(hidden, np.flatnonzero(pos == key_pos), rows)
            row_slot = np.array([self.routes.get(r, -1) for r in step.req_ids], dtype=np.int64)
            slots[: step.num_tokens] = torch.from_numpy(np.where(pos >= key_pos,
                                                                 row_slot[rows], -1))
        self.set_token_slots(slots, searches)
        for search in searches:
            self._record(search)

    def set_token_slots(self, slots: torch.Tensor, searches: Sequence[_Search] = ()) -> None:
        """Write each token's edit slot (int32 [T], -1 = none; decided on the host, then the
        `searches` of this step's key tokens scattered over it on the device) into the
        model-device buffer, and prepare the apply once per forward from it (routed tokens, or
        the kernels' metadata): every edited linear reuses it."""
        num_tokens = slots.shape[0]
        if num_tokens > self.tok_slot.shape[0]:
            raise RuntimeError(f"{num_tokens} tokens in one forward; the buffer holds "
                               f"{self.tok_slot.shape[0]}")
        device_slots = self.tok_slot[:num_tokens]
        if self._slot_staging is None:
            device_slots.copy_(slots)
        else:  # no stream sync mid-forward
            self._slot_staging.copy(device_slots, slots)
        # a search's tokens are key tokens: a request is decided in the step of its key token,
        # and none of its tokens follow that one in the same step
        for search in searches:
            device_slots[device_index(search.tokens, device_slots.device)] = search.slots
        self._forward = self.lora.prepare(device_slots)

    def _decide(self, hidden: torch.Tensor, is_key: np.ndarray,
                rows: np.ndarray) -> list[_Search]:
        """Routes what the host can decide (captures, incomplete keys: no edit) and launches
        the search of the others, one per group of requests that see the same keys."""
        step = self.step
        # key tokens of requests routed in an earlier step: recomputed after preemption
        self.recomputed_keys += sum(step.req_ids[int(rows[t])] in self.routes for t in is_key)
        todo = [int(t) for t in is_key if step.req_ids[int(rows[t])] not in self.routes]
        queries = self._queries(hidden, todo, rows)  # raw fp32, None: incomplete key
        routable = []
        for t, query in zip(todo, queries, strict=True):
            row = int(rows[t])
            capture_id = step.captures[row]
            if capture_id is not None and capture_id in self.expected:
                # capture requests only record their key; they never route
                self.expected.discard(capture_id)
                if query is not None:
                    self.captures[capture_id] = query.clone()
                self.routes[step.req_ids[row]] = -1
            elif query is None:  # never a guessed route: the base model answers
                self.routes[step.req_ids[row]] = -1
                self.request_log.record(step.req_ids[row], -1, None, float("inf"))
            else:
                routable.append((t, query))
        opted = [self.opts_in(step.req_ids[int(rows[t])],
                              bool(step.canary[int(rows[t])]) if step.canary else False)
                 for t, _ in routable]
        searches = []
        for opted_in in (False, True):  # each request routes among the keys it may see
            group = [tq for tq, o in zip(routable, opted, strict=True) if o == opted_in]
            if group:
                searches.append(self._search(torch.stack([q for _, q in group]),
                                             [t for t, _ in group], rows, opted_in))
        return searches

    def _queries(self, hidden: torch.Tensor, todo: list[int],
                 rows: np.ndarray) -> list[torch.Tensor | None]:
        """The raw query (fp32 [d]) of each key token in `todo`: its state ("last") or its
        request's pooled prompt states ("mean"; None when some never reached the router)."""
        if self.pooler is None:  # a device index: a list index would wait for the GPU
            return list(hidden[device_index(np.asarray(todo, dtype=np.int64),
                                            hidden.device)].float()) if todo else []
        queries = [self.pooler.take(self.step.req_ids[int(rows[t])]) for t in todo]
        self.incomplete_keys += sum(q is None for q in queries)
        return queries

    def mapped(self, x: torch.Tensor) -> torch.Tensor:
        """Raw keys or queries [..., d] into the space distances are taken in (the key map's)."""
        return x.float() if self.key_map is None else self.key_map(x)

    def _search(self, queries: torch.Tensor, todo: list[int], rows: np.ndarray,
                opted_in: bool) -> _Search:
        """Launches the nearest-key search of the key tokens `todo` (queries: raw fp32
        [n_key, d]); nothing is read back here."""
        table = self.routed_keys(opted_in)
        slots, dists, _ = self._nearest(self.mapped(queries), table.keys, table.owners,
                                        table.thresholds, self.config.metric, table.prepared)
        req_ids = [self.step.req_ids[int(rows[t])] for t in todo]
        return _Search(np.asarray(todo, dtype=np.int64), req_ids, slots, dists)

    def _record(self, search: _Search) -> None:
        """The host's side of a search: routes, hit counts, the request log."""
        for req_id, slot, dist in zip(search.req_ids, search.slots.tolist(),
                                      search.dists.tolist(), strict=True):
            self.routes[req_id] = slot
            if slot >= 0:
                self.hits[slot] += 1
            self.request_log.record(req_id, slot, self.slot_edit[slot] if slot >= 0 else None,
                                    dist)

    def apply(self, group: int, y: torch.Tensor, x: torch.Tensor) -> None:
        """y: [T, out] base output of linear `group` (updated in place), x: [T, in] its input.
        Adds each routed token's LoRA delta (see `LoraStacks.apply`, `PunicaBackend.apply`);
        tokens with slot -1 are never written."""
        if y.shape[0] != self._forward.num_tokens:
            raise RuntimeError(f"the router saw {self._forward.num_tokens} tokens in this "
                               f"forward, an edited linear {y.shape[0]}")
        self.lora.apply(group, y, x, self._forward)


def load_key_map(config: ServingConfig, hidden_size: int, device) -> KeyMap | None:
    """The configured key map on the model's device, or None; a map fitted for another model
    or another kind of key raises `KeyMapError` (a ValueError): the engine does not start."""
    if config.key_map is None:
        return None
    key_map = KeyMap.load(config.key_map)
    key_map.check_fits(config.model_fingerprint, hidden_size, config.key_pool,
                       config.route_layer)
    return key_map.to(device)
