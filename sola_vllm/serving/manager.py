"""EditManager: the edit store (the durable source of truth) and the running engine, kept in step.

Every change is committed to the store before it is acknowledged and is never left half done:

* add: validate -> capture the prompts' (and probes') keys in the engine -> load the edit
  unrouted and run its pre-flight check (one RPC: its keys against the routed edits', probes;
  a collision refuses it unless forced) -> `store.add` in its initial state (on failure: unload
  it again) -> route it as that state says (RPC, sent);
* lifecycle transitions (stage / canary / promote / revoke / restore): the store first, then
  the RPC (on failure: the store change is undone by the inverse transition).

RPCs that cannot fail once their preconditions hold (routing an edit just loaded, unrouting
one) are *sent*, not awaited (`send`): vLLM's engine core reads utility calls and requests from
one socket in order, and runs a utility call before it schedules any request received after it,
so a request sent after the acknowledgement already sees the change. Under load this saves
waiting for the engine step in progress (up to a whole step, ~1 s with 64 sequences on CPU);
the reply is still checked in the background, and a refusal is logged (and undone in the store
where it routed an edit).

Changes are serialized by one asyncio lock; store I/O and training run in threads, so the
engine keeps serving completions meanwhile. Failures raise `RequestError`, which carries the
HTTP status and error type the API answers with.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SolaConfig
from ..edit import Edit, mismatch, validate_id
from ..journal import TRANSITIONS, inverse_op, transition_problem
from ..preflight import collision_message
from ..store import EditStore, StoreError, TransitionError, UnknownEditError
from .config import ServingConfig

logger = logging.getLogger("vllm.sola_vllm")  # under vLLM's logger: its handlers and format

STORE_ENV = "SOLA_VLLM_STORE"
MODEL_ENV = "SOLA_VLLM_MODEL"
CONFIG_ENV = "SOLA_VLLM_CONFIG"
MAX_BODY_ENV = "SOLA_VLLM_MAX_BODY_BYTES"
DEFAULT_MAX_BODY = 64 * 1024 * 1024
_LOAD_CHUNK = 32  # edits whose keys are captured concurrently at start-up


def _ignore(exc: BaseException) -> None:
    """For sent RPCs whose caller awaits the reply itself."""


def _unless_not_loaded(exc: BaseException) -> None:
    if not (isinstance(exc, RequestError) and exc.status == 404):
        logger.error("sola-vllm: the engine refused to unroute an edit: %s", exc)


class RequestError(Exception):
    """A refused request: HTTP status, error type and a message naming the problem."""

    def __init__(self, status: int, kind: str, message: str, detail: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message
        self.detail = detail  # a JSON report sent with the error (the pre-flight check)


@dataclass(slots=True)
class Settings:
    store: Path
    model: str | None = None
    config: SolaConfig = field(default_factory=SolaConfig)
    max_body_bytes: int = DEFAULT_MAX_BODY

    @classmethod
    def from_env(cls, environ=os.environ, default_model: str | None = None) -> Settings:
        if not environ.get(STORE_ENV):
            raise ValueError(f"{STORE_ENV} is not set: start the server with `sola-vllm serve`, "
                             "or set it to the edit store directory")
        try:
            config = SolaConfig.from_dict(json.loads(environ.get(CONFIG_ENV) or "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{CONFIG_ENV} is not valid JSON: {exc}") from exc
        limit = environ.get(MAX_BODY_ENV) or str(DEFAULT_MAX_BODY)
        if not limit.isdigit() or int(limit) <= 0:
            raise ValueError(f"{MAX_BODY_ENV} must be a positive number of bytes, got {limit!r}")
        return cls(Path(environ[STORE_ENV]), environ.get(MODEL_ENV) or default_model, config,
                   int(limit))


def check_fits(edit: Edit, serving: ServingConfig) -> None:
    """Refuse an edit made for another base model or layer set, or too large a rank."""
    problem = mismatch(edit, serving.model_fingerprint, serving.shape_fingerprint,
                       serving.layers, serving.modules, "this server")
    if problem:
        raise RequestError(422, "edit_mismatch", problem)
    if edit.rank > serving.max_rank:
        raise RequestError(422, "capacity_exceeded", f"edit {edit.id} has rank {edit.rank}; "
                           f"this server's max rank is {serving.max_rank}")


def serving_view(info: dict | None) -> dict | None:
    """What the engine adds to the store's summary of an edit."""
    if info is None:
        return None
    return {k: info[k] for k in ("state", "slot", "hits", "key_drift_vs_reference") if k in info}


def checked_id(edit_id: object) -> str:
    try:
        return validate_id(edit_id)
    except ValueError as exc:
        raise RequestError(400, "invalid_id", str(exc)) from None


def _rpc_error(reply: dict) -> RequestError:
    kind, message = reply.get("type", ""), reply.get("error", "the engine refused")
    if kind == "KeyError":
        return RequestError(404, "not_found", message)
    if kind == "CapacityError":
        return RequestError(422, "capacity_exceeded", message)
    if "already loaded" in message:
        return RequestError(409, "conflict", message)
    if "no key was captured" in message:  # the worker's capture buffer is full
        return RequestError(503, "capture_failed", message)
    return RequestError(422, "invalid_edit", message)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _disk_error(exc: StoreError) -> RequestError | None:
    """A full or read-only disk under the store: the store undid its partial write (see
    `EditStore._write_new`), the caller undoes the engine side; the client is told why."""
    cause = exc.__cause__
    code = cause.errno if isinstance(cause, OSError) else None
    if code in _DISK_FULL:
        return RequestError(507, "insufficient_storage", f"the edit store's disk is full; "
                            f"nothing was changed: {exc}")
    if code in _READ_ONLY:
        return RequestError(503, "store_read_only", f"the edit store cannot be written "
                            f"(read-only or no permission); nothing was changed: {exc}")
    return None


def _store_error(exc: StoreError) -> RequestError:
    message = str(exc)
    disk = _disk_error(exc)
    if disk is not None:
        return disk
    if isinstance(exc, UnknownEditError):
        return RequestError(404, "not_found", message)
    if isinstance(exc, TransitionError):
        return RequestError(409, "conflict", message)
    if "already" in message:
        return RequestError(409, "conflict", message)
    if "does not fit" in message:
        return RequestError(422, "edit_mismatch", message)
    if "timed out" in message:  # another process holds the store's writer lock
        return RequestError(503, "store_busy", message)
    return RequestError(500, "store_error", message)


class EditManager:
    def __init__(self, engine_client, serving: ServingConfig, settings: Settings):
        self.client = engine_client
        self.serving = serving
        self.settings = settings
        self.store = EditStore(settings.store)
        self.lock = asyncio.Lock()
        self._train_lock = asyncio.Lock()
        self._trainer = None
        self._tokenizer = None  # for chat forms in pre-flight checks (`_trained_prompts`)
        self._sent: set[asyncio.Task] = set()  # RPCs sent, their replies not yet in

    # --- engine -------------------------------------------------------------------------------
    async def rpc(self, method: str, *args) -> Any:
        replies = await self.client.collective_rpc(method, args=args)
        for reply in replies:
            if not reply["ok"]:
                raise _rpc_error(reply)
        return replies[0]["result"]

    async def send(self, method: str, *args, on_error=None) -> asyncio.Task:
        """Put a worker RPC on its way to the engine and return without waiting for it to run
        (see the module docstring for why the order is kept). `on_error(exc)` is called if the
        worker refuses it; without one the refusal is logged. The task is returned for callers
        that want the reply later."""
        task = asyncio.ensure_future(self.rpc(method, *args))
        self._sent.add(task)
        task.add_done_callback(functools.partial(self._settled, method, on_error))
        # the task runs on the next turn of the loop, up to its first suspension: by then the
        # message has been handed to the engine's input socket (or queued on it, in order)
        await asyncio.sleep(0)
        return task

    def _settled(self, method: str, on_error, task: asyncio.Task) -> None:
        self._sent.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if on_error is not None:
            on_error(task.exception())
        else:
            logger.error("sola-vllm: the engine refused %s: %s", method, task.exception())

    async def settle(self) -> None:
        """Wait for the replies of every RPC sent so far (tests; shutdown)."""
        if self._sent:
            await asyncio.gather(*list(self._sent), return_exceptions=True)

    async def _run_capture(self, prompt: str, capture_id: str) -> None:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        params = SamplingParams(max_tokens=1, temperature=0,
                                extra_args={"sola_capture": capture_id})
        try:
            parsed = parse_model_prompt(self.client.model_config, prompt)
            (engine_input,) = await self.client.renderer.render_cmpl_async([parsed])
            async for _ in self.client.generate(engine_input, params, capture_id):
                pass
        except (ValueError, TypeError, VLLMClientError) as exc:
            raise RequestError(422, "invalid_prompt", f"prompt {prompt[:80]!r}: {exc}") from exc

    async def _capture(self, prompts: list[str]) -> list[str]:
        ids = [f"sola-cap-{uuid.uuid4().hex}" for _ in prompts]
        # sent: the engine registers the ids before it sees the capture requests sent after
        expecting = await self.send("sola_expect_captures", ids, on_error=_ignore)
        results = await asyncio.gather(*(self._run_capture(p, c)
                                         for p, c in zip(prompts, ids, strict=True)),
                                       return_exceptions=True)
        (expected,) = await asyncio.gather(expecting, return_exceptions=True)
        # a refused expectation (too many pending captures) explains the rest: reported first
        failed = [r for r in (expected, *results) if isinstance(r, BaseException)]
        if failed:
            await self._drop(ids)
            raise failed[0]
        return ids

    async def _drop(self, capture_ids: list[str]) -> None:
        await self.send("sola_drop_captures", capture_ids)

    async def _add_captured(self, edit: Edit, ids: list[str], active: bool) -> dict:
        try:
            return await self.rpc("sola_add_edit", edit.to_bytes(), ids, active)
        finally:
            await self._drop(ids)

    async def load(self, edit: Edit, active: bool) -> dict:
        """Load an edit into the engine. Its keys are captured first: each prompt runs for one
        token with a capture id and the worker keeps its key-token residual, so routing keys
        come from this engine's own numerics."""
        return await self._add_captured(edit, await self._capture(edit.prompts), active)

    async def loaded(self) -> dict[str, dict]:
        return {e["id"]: serving_view(e) for e in await self.rpc("sola_list_edits")}

    # --- store --------------------------------------------------------------------------------
    async def in_store(self, fn, *args, **kwargs) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except StoreError as exc:
            raise _store_error(exc) from exc

    def _has_store(self) -> bool:
        return self.store.exists()

    async def exists(self, edit_id: str) -> bool:
        if not self._has_store():
            return False
        try:
            await self.in_store(self.store.history, edit_id)
        except RequestError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # --- start-up -----------------------------------------------------------------------------
    async def load_store(self) -> None:
        """Load every active edit of the store into the engine. Problems
        (corrupt files, foreign edits, capacity) are logged; the server starts anyway."""
        if not self._has_store():
            logger.info("sola-vllm: no edit store at %s yet (created by the first push)",
                        self.store.path)
            return
        loaded = await self.in_store(self.store.load)
        for problem in loaded.problems:
            logger.warning("sola-vllm: edit store problem: %s", problem)
        # staged edits stay in the store only: they would hold capacity, and a transition that
        # routes them loads them on demand. Revoked edits are loaded when their keys block
        # (`revoked_keys`), after every routed edit so these get the capacity first.
        routed = [e for e in loaded.edits if e.state in ("active", "canary")]
        blocking = [e for e in loaded.edits if e.state == "revoked" and self._blocks()]
        done, blocked = await self._load_all(routed), await self._load_all(blocking)
        logger.info("sola-vllm: serving %d of %d routed edits from %s (%d canary); %d of %d "
                    "revoked edits' keys block; %d edits staged or revoked, not loaded",
                    done, len(routed), self.store.path, sum(e.state == "canary" for e in routed),
                    blocked, len(blocking),
                    len(loaded.edits) - len(routed) - blocked)

    def _blocks(self) -> bool:
        """Revoked edits' keys block routing (`config.RouterConfig.revoked_keys`)."""
        return self.serving.revoked_keys == "block"

    async def _load_all(self, edits: list[Edit]) -> int:
        """Load `edits` `_LOAD_CHUNK` at a time, in order; -> how many loaded."""
        done = 0
        for start in range(0, len(edits), _LOAD_CHUNK):
            done += await self._load_chunk(edits[start:start + _LOAD_CHUNK])
        return done

    async def _load_chunk(self, edits: list[Edit]) -> int:
        """Keys of the whole chunk are captured concurrently; edits are loaded in store order
        (key rows, and so routing ties, follow it)."""
        async def capture(edit: Edit) -> list[str]:
            check_fits(edit, self.serving)
            return await self._capture(edit.prompts)

        captured = await asyncio.gather(*(capture(e) for e in edits), return_exceptions=True)
        done = 0
        for edit, ids in zip(edits, captured, strict=True):
            try:
                if isinstance(ids, BaseException):
                    raise ids
                await self._add_captured(edit, ids, active=edit.state == "active")
                if edit.state in ("canary", "revoked"):
                    await self.rpc("sola_set_state", edit.id, edit.state)
                done += 1
            except RequestError as exc:
                logger.warning("sola-vllm: edit %s is not served: %s", edit.id, exc.message)
        return done

    # --- changes --------------------------------------------------------------------------------
    async def add(self, edit: Edit, author: str = "", note: str = "", state: str = "active",
                  force: bool = False, probes: list[str] | None = None) -> dict:
        check_fits(edit, self.serving)
        # shielded: a client that disconnects must not interrupt a change halfway
        return await asyncio.shield(self._add(edit, author, note, state, force, probes))

    async def _add(self, edit: Edit, author: str, note: str, state: str, force: bool,
                   probes: list[str] | None) -> dict:
        probes = list(probes or [])
        async with self.lock:
            if await self.exists(edit.id):
                raise RequestError(409, "conflict", f"edit {edit.id} already exists (edits are "
                                   "immutable: push it under a new id)")
            ids = await self._capture(edit.prompts + probes)
            key_ids, probe_ids = ids[:len(edit.prompts)], ids[len(edit.prompts):]
            try:
                loaded = await self.rpc("sola_load_checked", edit.to_bytes(), key_ids, probes,
                                        probe_ids)
            finally:
                await self._drop(ids)
            check = loaded["check"]
            try:
                if check["collisions"] and not force:
                    raise RequestError(409, "edit_collision", collision_message(check), check)
                await self.in_store(self.store.add, edit, author=author, note=note, state=state)
            except BaseException:
                await self._unload(edit.id)
                raise
            await self._route_new(edit.id, state)
        return {"edit": {**edit.summary(), "state": state},
                "serving": {**serving_view(loaded["serving"]), "state": state}, "check": check}

    async def _route_new(self, edit_id: str, state: str) -> None:
        """Sent: routing an edit just loaded cannot be refused; if it were, the stored edit is
        revoked again (under the lock) so store and engine agree."""
        def failed(exc: BaseException) -> None:
            logger.error("sola-vllm: edit %s was stored but the engine failed to route it (%s); "
                         "revoking it in the store", edit_id, exc)
            asyncio.ensure_future(self._undo_locked(self.store.revoke, edit_id,
                                                    "activation failed"))

        await self.send("sola_set_state", edit_id, state, on_error=failed)

    async def _undo_locked(self, fn, edit_id: str, why: str) -> None:
        async with self.lock:
            await self._undo(fn, edit_id, why)

    async def check(self, prompts: list[str], probes: list[str] | None = None,
                    name: str = "new edit") -> dict:
        """The pre-flight report of an edit with these prompts, which is not added: its keys
        (its prompts' chat forms' too when the config trains them) and the probes' are
        captured in the engine, as an add would."""
        from ..chat_form import prompt_forms

        given = prompts
        if self.settings.config.train.chat_form:
            prompts = await asyncio.to_thread(self._trained_prompts, prompts)
        ids = await self._capture(prompts)
        probe_ids: list[str] = []
        try:
            probe_ids = await self._capture(probes) if probes else []
            return await self.rpc("sola_check_captured", name, prompts, ids, probes or [],
                                  probe_ids, prompt_forms(given, prompts))
        finally:
            await self._drop(ids + probe_ids)

    async def _unload(self, edit_id: str) -> None:
        try:
            await self.rpc("sola_remove_edit", edit_id)
        except RequestError as exc:
            logger.error("sola-vllm: could not unload edit %s: %s", edit_id, exc.message)

    async def transition(self, edit_id: str, op: str, author: str = "", note: str = "") -> dict:
        """One lifecycle step (`journal.TRANSITIONS`), journaled with author and note."""
        edit_id = checked_id(edit_id)
        if op not in TRANSITIONS:
            raise RequestError(404, "not_found", f"no lifecycle step {op!r}; expected one of "
                               f"{list(TRANSITIONS)}")
        return await asyncio.shield(self._transition(edit_id, op, author, note))

    async def _transition(self, edit_id: str, op: str, author: str, note: str) -> dict:
        target = TRANSITIONS[op][1]
        routed = target in ("active", "canary")
        async with self.lock:
            if not self._has_store():
                raise RequestError(404, "not_found", f"no edit {edit_id!r} in the store")
            previous = (await self.in_store(self.store.get, edit_id)).state
            problem = transition_problem(op, edit_id, previous)
            if problem:  # before anything is loaded
                raise RequestError(409, "conflict", problem)
            await self.in_store(self.store.transition, edit_id, op, author=author, note=note)
            if routed:
                serving = await self._route_loaded(edit_id, target, op, previous)
            else:
                # sent: unrouting cannot be refused (an edit not loaded routes nothing anyway)
                blocks = target == "revoked" and self._blocks()
                await self.send("sola_set_state", edit_id, target,
                                on_error=self._block_later(edit_id) if blocks
                                else _unless_not_loaded)
                serving = {"state": target}
            edit = await self.in_store(self.store.get, edit_id)
            history = await self.in_store(self.store.history, edit_id)
        return {"edit": edit.summary(), "history": history, "serving": serving}

    async def _route_loaded(self, edit_id: str, target: str, op: str, previous: str) -> dict:
        """Route an edit whose store transition is written; loaded on demand (staged and revoked
        edits are not loaded at start-up, and it may have failed to load). On failure the store
        transition is undone."""
        try:
            try:
                return serving_view(await self.rpc("sola_set_state", edit_id, target))
            except RequestError as exc:
                if exc.status != 404:
                    raise
            edit = await self.in_store(self.store.get, edit_id)
            check_fits(edit, self.serving)
            await self.load(edit, active=False)
            return serving_view(await self.rpc("sola_set_state", edit_id, target))
        except BaseException:
            undo = functools.partial(self.store.transition, op=inverse_op(op, previous))
            await self._undo(undo, edit_id, "engine refused the change")
            raise

    def _block_later(self, edit_id: str):
        """on_error of a revocation whose keys block: an edit the engine has not loaded (it was
        staged, or failed to load) is loaded in the background, so its keys block as they would
        after a restart."""
        def failed(exc: BaseException) -> None:
            if isinstance(exc, RequestError) and exc.status == 404:
                asyncio.ensure_future(self._load_blocking(edit_id))
            else:
                _unless_not_loaded(exc)

        return failed

    async def _load_blocking(self, edit_id: str) -> None:
        """A revocation is never refused: where the engine cannot take the edit, the store's
        change stands and the problem is logged (the edit routes nothing either way)."""
        async with self.lock:
            try:
                edit = await self.in_store(self.store.get, edit_id)
                if edit.state != "revoked":  # restored or staged meanwhile
                    return
                check_fits(edit, self.serving)
                await self.load(edit, active=False)
                await self.rpc("sola_set_state", edit_id, "revoked")
            except RequestError as exc:
                logger.warning("sola-vllm: revoked edit %s is not loaded, so its keys do not "
                               "block: %s", edit_id, exc.message)

    async def _undo(self, fn, edit_id: str, why: str) -> None:
        try:
            await self.in_store(fn, edit_id, note=f"undone: {why}")
        except RequestError as exc:
            logger.error("sola-vllm: could not undo a change of edit %s: %s", edit_id,
                         exc.message)

    # --- reading --------------------------------------------------------------------------------
    async def describe(self, edit_id: str) -> dict:
        edit_id = checked_id(edit_id)
        if not self._has_store():
            raise RequestError(404, "not_found", f"no edit {edit_id!r} in the store")
        edit = await self.in_store(self.store.get, edit_id)
        history = await self.in_store(self.store.history, edit_id)
        return {"edit": edit.summary(), "history": history,
                "serving": serving_view(await self.rpc("sola_describe_edit", edit_id))}

    async def list(self) -> dict:
        serving = await self.loaded()
        stats = await self.rpc("sola_stats")
        if not self._has_store():
            return {"edits": [], "problems": [], "stats": stats}
        edits = await self.in_store(self.store.list)
        problems = await self.in_store(self.store.problems)
        for summary in edits:
            summary["serving"] = serving.get(summary["id"])
        return {"edits": edits, "problems": problems, "stats": stats}

    # --- server-side training ---------------------------------------------------------------------
    async def train(self, prompts: list[str], target: str, edit_id: str | None,
                    author: str, note: str) -> Edit:
        """Train an edit on the server, as the server's config says (its chat forms too
        under train.chat_form, keyed as chat-form keys: `RouterConfig.chat_threshold`)."""
        if edit_id is not None and await self.exists(edit_id):
            raise RequestError(409, "conflict", f"edit {edit_id} already exists")
        async with self._train_lock:  # one training at a time: the reference engine is shared
            engine = await asyncio.to_thread(self._training_engine)
            try:
                return await asyncio.to_thread(engine.train, prompts, target, edit_id=edit_id,
                                               author=author, note=note)
            except ValueError as exc:
                raise RequestError(422, "invalid_edit", str(exc)) from exc

    def _trained_prompts(self, prompts: list[str]) -> list[str]:
        from ..chat_form import trained_prompts

        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from ..models import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model(self.settings.model))
        try:
            return trained_prompts(self._tokenizer, prompts, True)
        except ValueError as exc:
            raise RequestError(422, "invalid_request", str(exc)) from exc

    def _training_engine(self):
        if self._trainer is None:
            from ..engine import RoutedEngine

            engine = RoutedEngine.from_pretrained(self.settings.model, self.settings.config)
            if (engine.model_fingerprint != self.serving.model_fingerprint
                    or engine.shape.fingerprint() != self.serving.shape_fingerprint):
                raise RequestError(503, "training_unavailable", "server-side training is "
                                   f"unavailable: the model {self.settings.model} or the SoLA "
                                   "config given to the server does not match what it serves")
            self._trainer = engine
        return self._trainer
