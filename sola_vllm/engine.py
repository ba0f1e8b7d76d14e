"""The reference routed engine on transformers: the ground truth the vLLM plugin must match.

A frozen base model, a set of edits, per-sequence nearest-key routing by keys read entering the
route layer (the first edited layer unless configured, pooled as `EditShape.key_pool` says,
compared after the router's key map if one is configured; decision 1), the edit's LoRA applied
from the key token on (decision 2), and a route decided once per request at its key token and
kept for every decode step (decision 3).

Lifecycle: active edits route for every request, canary edits only for calls that opt in
(`generate(..., canary=True)`), staged and revoked edits stay loaded but never route.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sola_vllm.kernels.nearest_key import nearest_key_ref

from .arch import ARCHS, EditShape, resolve
from .config import RouterConfig, SolaConfig
from .edit import Edit, mismatch
from .keys import pool_keys
from .lora import LoraContext, apply_indices, install_routed_lora
from .routing import KeyTable


class EditMismatchError(ValueError):
    """An edit was trained for another base model or another layer set."""


@dataclass
class Route:
    edit_id: str | None
    distance: float
    key_form: str = "raw"  # the form of the nearest key (`config.KEY_FORMS`): its threshold

    def under(self, thresholds: dict[str, float]) -> str | None:
        """The edit this nearest key routes to under `thresholds` (one per key form, as
        `RouterConfig.thresholds`), or None."""
        routed = self.edit_id is not None and self.distance < thresholds[self.key_form]
        return self.edit_id if routed else None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    route: Route


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T]
    key_pos: torch.Tensor  # [B]: index of each row's last prompt token (the key token)


class RoutedEngine:
    def __init__(self, model, tokenizer, shape: EditShape, router: RouterConfig,
                 model_fingerprint: str, config: SolaConfig | None = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.shape = shape
        self._router = router
        self.config = config or SolaConfig(router=router)
        self.model_fingerprint = model_fingerprint
        self.spec = ARCHS[shape.arch]
        self.ctx = LoraContext()
        self.modules = install_routed_lora(model, shape, self.ctx)
        self.edits: dict[str, Edit] = {}
        self.active: set[str] = set()  # the engine's own state; the Edit objects stay untouched
        self.canary: set[str] = set()  # routed only for calls that opt in
        self.revoked: set[str] = set()  # their keys block routing (router.revoked_keys "block")
        self.key_map = router.load_key_map()  # None: keys compared as they are
        if self.key_map is not None:
            self.key_map.check_fits(model_fingerprint, model.config.hidden_size, shape.key_pool,
                                    shape.route_layer)
        self.table = KeyTable()  # active edits: what every request routes among
        self.canary_table = KeyTable()  # active and canary edits: for requests that opt in
        self._routing: KeyTable | None = None  # the table of the call in progress
        self._pending: _Batch | None = None  # prefill: routes decided in the route-layer hook
        self._slots: torch.Tensor | None = None  # [B] decided routes (-1 = none)
        self._distances: torch.Tensor | None = None
        self._forms: list[str] = []  # [B] the form of each row's nearest key
        self._apply_mask: torch.Tensor | None = None  # [B, T] for the current forward
        self.decoder_layers[shape.route_layer].register_forward_pre_hook(self._route_layer_hook,
                                                                         with_kwargs=True)
        self.key_layer_module.register_forward_pre_hook(self._key_layer_hook, with_kwargs=True)

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_path: str | Path | None = None,
                        config: SolaConfig | None = None,
                        dtype: torch.dtype = torch.float32) -> RoutedEngine:
        from .models import model_fingerprint, resolve_model

        path = resolve_model(model_path)
        config = config or SolaConfig()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        hf = model.config  # GPT2Config maps num_hidden_layers / hidden_size / ... itself
        shape = resolve(config.edit, hf.model_type, hf.num_hidden_layers)
        return cls(model, tokenizer, shape, config.router, model_fingerprint(path), config)

    @property
    def decoder_layers(self):
        return getattr(getattr(self.model, self.spec.backbone), self.spec.layers)

    @property
    def key_layer_module(self):
        return self.decoder_layers[self.shape.key_layer]

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_positions(self) -> int:
        return self.model.config.max_position_embeddings

    # --- edits ----------------------------------------------------------------------------------
    def check_compatible(self, edit: Edit) -> None:
        shape = self.shape
        problem = mismatch(edit, self.model_fingerprint, shape.fingerprint(), shape.layers,
                           shape.modules, "this engine")
        if problem:
            raise EditMismatchError(problem)

    def add(self, edit: Edit) -> None:
        self._load(edit)
        self._rebuild_table()

    def add_all(self, edits: list[Edit]) -> None:
        """`add` for many edits, with one routing-table rebuild at the end."""
        for edit in edits:
            self._load(edit)
        self._rebuild_table()

    def _load(self, edit: Edit) -> None:
        if edit.id in self.edits:
            raise ValueError(f"edit {edit.id} is already loaded")
        self.check_compatible(edit)
        if edit.keys.shape[1] != self.hidden_size:
            raise EditMismatchError(f"edit {edit.id} keys have dimension {edit.keys.shape[1]}, "
                                    f"the model's hidden size is {self.hidden_size}")
        for name, (a, b) in edit.lora.items():
            self.modules[name].set_adapter(edit.id, a, b, float(edit.scale))
        self.edits[edit.id] = edit
        self._state_set(edit.state).add(edit.id)

    def remove(self, edit_id: str) -> None:
        self._get(edit_id)
        for module in self.modules.values():
            module.drop_adapter(edit_id)
        del self.edits[edit_id]
        self._forget_state(edit_id)
        self._rebuild_table()

    def revoke(self, edit_id: str) -> None:
        """Stop routing to the edit: its keys block (`RouterConfig.revoked_keys`) or leave the
        table; its LoRA stays loaded for a later restore."""
        self.set_state(edit_id, "revoked")

    def restore(self, edit_id: str) -> None:
        self.set_state(edit_id, "active")

    def set_state(self, edit_id: str, state: str) -> None:
        """Route a loaded edit as its lifecycle state says: active for every call, canary for
        calls that opt in, staged / revoked for none."""
        self.set_states({edit_id: state})

    def set_states(self, states: dict[str, str]) -> None:
        """`set_state` for many loaded edits, with one routing-table rebuild; checked first."""
        from .edit import STATES

        for edit_id, state in states.items():
            self._get(edit_id)
            if state not in STATES:
                raise ValueError(f"edit state {state!r} is not one of {STATES}")
        for edit_id, state in states.items():
            self._forget_state(edit_id)
            self._state_set(state).add(edit_id)
        self._rebuild_table()

    def _state_set(self, state: str) -> set[str]:
        """The set that records `state` (a throwaway one for staged: it routes nothing)."""
        return {"active": self.active, "canary": self.canary,
                "revoked": self.revoked}.get(state, set())

    def _forget_state(self, edit_id: str) -> None:
        self.active.discard(edit_id)
        self.canary.discard(edit_id)
        self.revoked.discard(edit_id)

    def set_active(self, edit_ids) -> None:
        """Route to exactly these loaded edits (one table rebuild for many changes). Edits left
        out route nothing and block nothing, unless revoked (their keys then still block)."""
        edit_ids = set(edit_ids)
        unknown = sorted(edit_ids - self.edits.keys())
        if unknown:
            raise KeyError(f"edits {unknown[:5]} are not loaded")
        self.active = edit_ids
        self.canary -= edit_ids
        self.revoked -= edit_ids
        self._rebuild_table()

    @property
    def router(self) -> RouterConfig:
        return self._router

    @router.setter
    def router(self, router: RouterConfig) -> None:
        """Another router (metric, thresholds) for the loaded edits: the tables carry each
        key's threshold, so they are rebuilt. The key map stays the one loaded at start."""
        self._router = router
        self._rebuild_table()

    def _get(self, edit_id: str) -> Edit:
        if edit_id not in self.edits:
            raise KeyError(f"no edit {edit_id!r} is loaded")
        return self.edits[edit_id]

    def _rebuild_table(self) -> None:
        blocking = ([e for e in self.edits.values() if e.id in self.revoked]
                    if self.router.revoked_keys == "block" else [])
        thresholds = self.router.thresholds
        self.table = KeyTable.build([e for e in self.edits.values() if e.id in self.active],
                                    thresholds, self.key_map, blocking)
        self.canary_table = KeyTable.build([e for e in self.edits.values()
                                            if e.id in self.active or e.id in self.canary],
                                           thresholds, self.key_map, blocking)

    @property
    def routing_table(self) -> KeyTable:
        """The table of the call in progress (canary or not); the active one outside calls."""
        return self.table if self._routing is None else self._routing

    # --- tokenization ---------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str) or prompt == "":
            raise ValueError("prompt must be a non-empty string")
        ids = self.tokenizer(prompt, add_special_tokens=True).input_ids
        if len(ids) >= self.max_positions:
            raise ValueError(f"prompt is {len(ids)} tokens long; the model's context is "
                             f"{self.max_positions} tokens")
        return ids

    def _batch(self, prompts: list[str]) -> _Batch:
        if not prompts:
            raise ValueError("no prompts given")
        seqs = [self.encode(p) for p in prompts]
        width = max(len(s) for s in seqs)
        pad = self.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        return _Batch(ids, mask, torch.full((len(seqs),), width - 1))

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # --- routing --------------------------------------------------------------------------------
    def mapped(self, queries: torch.Tensor) -> torch.Tensor:
        """Raw keys or queries [S, d] into the space distances are taken in (the key map's)."""
        return queries.float() if self.key_map is None else self.key_map(queries)

    def route_keys(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """queries: raw [S, d] -> (slot int64 [S] (-1 = none), distance fp32 [S], the nearest
        key's form); each query routes below its nearest key's own threshold (its form's)."""
        table = self.routing_table
        slot, dist, index = nearest_key_ref(self.mapped(queries), table.keys, table.owners,
                                            table.thresholds, self.router.metric)
        return slot.long(), dist, [table.forms[i] if i >= 0 else "raw" for i in index.tolist()]

    def key_queries(self, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
        """The routing query of each prompt, raw fp32 [B, H]: its states entering the route
        layer, pooled as the shape says (what routing compares with the stored keys); computed
        `batch_size` prompts per forward."""
        if not prompts:
            raise ValueError("no prompts given")
        return torch.cat([self._key_queries(prompts[i:i + batch_size])
                          for i in range(0, len(prompts), batch_size)])

    @torch.inference_mode()
    def _key_queries(self, prompts: list[str]) -> torch.Tensor:
        from .train import residuals_at

        batch = self._batch(prompts)
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
        layer = self.shape.route_layer
        hidden = residuals_at(self, [layer], batch.input_ids, batch.attention_mask,
                              position_ids)[layer]
        return pool_keys(hidden, batch.attention_mask, batch.key_pos, self.shape.key_pool)

    def nearest(self, prompts: list[str] | None = None,
                queries: torch.Tensor | None = None) -> list[Route]:
        """Each prompt's nearest active key, whatever its distance (no threshold): the edit that
        owns it (None when no edit is active, or when the nearest key is a revoked edit's that
        blocks), the distance and the key's form. For calibrating thresholds.
        `queries` (from `key_queries`) may be given instead of the prompts."""
        if queries is None:
            queries = self.key_queries(prompts)
        if len(self.table) == 0:
            return [Route(None, float("inf")) for _ in range(queries.shape[0])]
        slot, dist, index = nearest_key_ref(self.mapped(queries), self.table.keys,
                                            self.table.owners, float("inf"), self.router.metric)
        return [Route(self.table.edit_ids[s] if s >= 0 else None, float(d), self.table.forms[i])
                for s, d, i in zip(slot.tolist(), dist.tolist(), index.tolist(), strict=True)]

    def _route_layer_hook(self, module, args, kwargs):
        """Prefill: decide every row's route from its states entering the route layer."""
        if self._apply_mask is None or self._pending is None:  # no routing to decide here
            return None
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, H]
        pending = self._pending
        queries = pool_keys(hidden, pending.attention_mask, pending.key_pos, self.shape.key_pool)
        self._slots, self._distances, self._forms = self.route_keys(queries)
        self._pending = None
        return None

    def _key_layer_hook(self, module, args, kwargs):
        if self._apply_mask is None:  # a plain forward outside the engine: no routing
            return None
        groups = apply_indices(self._slots, self._apply_mask)
        self.ctx.plan = [(self.routing_table.edit_ids[slot], idx) for slot, idx in groups.items()]
        return None

    def routes(self) -> list[Route]:
        ids = self.routing_table.edit_ids
        return [Route(ids[s] if s >= 0 else None, float(d), form)
                for s, d, form in zip(self._slots.tolist(), self._distances.tolist(),
                                      self._forms, strict=True)]

    # --- forward --------------------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, past, apply_mask):
        self._apply_mask = apply_mask
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids, past_key_values=past, use_cache=True)
        finally:
            self._apply_mask = None
            self.ctx.plan = []

    def _prefill(self, batch: _Batch):
        self._pending = batch
        width = batch.input_ids.shape[1]
        apply_mask = torch.arange(width)[None, :] >= batch.key_pos[:, None]  # [B, T]
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
        return self._forward(batch.input_ids, batch.attention_mask, position_ids, None, apply_mask)

    @contextlib.contextmanager
    def _opted_in(self, canary: bool):
        """Route the calls inside among active edits, or (canary=True) active and canary ones."""
        self._routing = self.canary_table if canary else self.table
        try:
            yield
        finally:
            self._routing = None

    @torch.inference_mode()
    def forward_logits(self, prompts: list[str],
                       canary: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[Route]]:
        """One routed prefill: logits fp32 [B, T, vocab] (left-padded), attention mask [B, T],
        and each prompt's route. `canary`: the prompts opt in to canary edits."""
        batch = self._batch(prompts)
        with self._opted_in(canary):
            out = self._prefill(batch)
            return out.logits.float(), batch.attention_mask, self.routes()

    def last_logits(self, prompts: list[str]) -> tuple[torch.Tensor, list[Route]]:
        """Next-token logits after each prompt, fp32 [B, vocab], and each prompt's route."""
        logits, _, routes = self.forward_logits(prompts)
        return logits[:, -1], routes

    @torch.inference_mode()
    def teacher_forced(self, prompts: list[str],
                       targets: list[list[int]]) -> tuple[list[list[int]], list[Route]]:
        """Feed each prompt followed by its target token ids in one routed forward (the route is
        decided at the prompt's last token, the LoRA applied from there on, as in decoding).
        -> per row the argmax prediction for each target position, and each row's route."""
        if len(prompts) != len(targets) or not prompts:
            raise ValueError("need one target per prompt, and at least one prompt")
        seqs = [self.encode(p) + list(t) for p, t in zip(prompts, targets, strict=True)]
        width = max(len(s) for s in seqs)
        pad = self.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        key_pos = torch.tensor([width - len(t) - 1 for t in targets])  # last prompt token
        out = self._prefill(_Batch(ids, mask, key_pos))
        predicted = []
        for row, t in enumerate(targets):
            cols = torch.arange(len(t)) + key_pos[row]
            predicted.append(out.logits[row, cols].argmax(-1).tolist())
        return predicted, self.routes()

    def generate(self, prompts: list[str], max_new_tokens: int = 32,
                 canary: bool = False) -> list[Generation]:
        """Greedy decoding with a KV cache; each row's route is decided at its key token.
        `canary`: the prompts opt in to canary edits (else only active edits route)."""
        with self._opted_in(canary):
            return self._generate(prompts, max_new_tokens)

    @torch.inference_mode()
    def _generate(self, prompts: list[str], max_new_tokens: int) -> list[Generation]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        batch = self._batch(prompts)
        out = self._prefill(batch)
        routes = self.routes()
        eos = self.tokenizer.eos_token_id
        mask, num_rows = batch.attention_mask, len(prompts)
        positions = mask.sum(-1, keepdim=True) - 1  # [B, 1]
        tokens: list[list[int]] = [[] for _ in range(num_rows)]
        done = torch.zeros(num_rows, dtype=torch.bool)
        for step in range(max_new_tokens):
            next_ids = out.logits[:, -1].argmax(-1)  # [B]
            for row in range(num_rows):
                if not done[row]:
                    tokens[row].append(int(next_ids[row]))
            done |= next_ids == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(num_rows, 1, dtype=mask.dtype)], dim=1)
            positions = positions + 1
            out = self._forward(next_ids[:, None], mask, positions, out.past_key_values,
                                torch.ones(num_rows, 1, dtype=torch.bool))
        return [Generation(self.tokenizer.decode(t, skip_special_tokens=True), t, r)
                for t, r in zip(tokens, routes, strict=True)]

    def train(self, prompts: list[str], target: str, **kwargs) -> Edit:
        """Train one edit on this engine's frozen base model (see `train.train_edit`)."""
        from .train import train_edit

        return train_edit(self, prompts, target, **kwargs)
