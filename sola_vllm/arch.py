"""Per-architecture facts: where the decoder layers live, which linear modules may carry an edit,
and the default layer set. The routing key is read entering the first edited layer (decision 1),
or an earlier `route_layer` when configured.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import EditConfig, fingerprint


@dataclass(frozen=True, slots=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    backbone: str  # attribute of the CausalLM holding the decoder stack
    layers: str  # attribute of the backbone holding the decoder layers
    modules: tuple[str, ...]  # editable linear modules, relative to a decoder layer
    default_modules: tuple[str, ...]
    default_layer_fraction: float  # first default edited layer = round(fraction * num_layers)
    default_num_layers: int  # default number of consecutive edited layers
    conv1d: bool = False  # GPT-2 stores Linear weights transposed ([in, out]) in Conv1D
    absolute_positions: str | None = None  # backbone attribute adding learned positions (GPT-2)

    def default_layers(self, num_layers: int) -> tuple[int, ...]:
        first = min(round(self.default_layer_fraction * num_layers), num_layers - 1)
        last = min(first + self.default_num_layers, num_layers)
        return tuple(range(first, last))

    def module_path(self, layer: int, module: str) -> str:
        """Path of an edited module inside the CausalLM, e.g. `model.layers.24.mlp.down_proj`."""
        return f"{self.backbone}.{self.layers}.{layer}.{module}"


_LLAMA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("llama", ("llama",), "model", "layers", _LLAMA_MODULES,
                 ("mlp.up_proj", "mlp.down_proj"), 0.8, 3),
        ArchSpec("qwen2", ("qwen2", "qwen3"), "model", "layers", _LLAMA_MODULES,
                 ("mlp.up_proj", "mlp.down_proj"), 0.8, 3),
        ArchSpec("gpt2", ("gpt2",), "transformer", "h",
                 ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
                 ("mlp.c_fc", "mlp.c_proj"), 0.8, 3, conv1d=True,
                 absolute_positions="wpe"),
    )
}


def arch_for(model_type: str) -> ArchSpec:
    for spec in ARCHS.values():
        if model_type in spec.model_types:
            return spec
    known = sorted(t for s in ARCHS.values() for t in s.model_types)
    raise ValueError(f"model type {model_type!r} is not supported; supported: {known}")


@dataclass(frozen=True, slots=True)
class EditShape:
    """An `EditConfig` resolved against one model: concrete layers and modules."""

    arch: str
    num_layers: int
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    rank: int
    scale: float
    key_pool: str = "last"  # how routing keys pool the route layer's states (KEY_POOLS)
    route_layer: int | None = None  # resolved: the first edited layer when not given

    def __post_init__(self) -> None:
        if self.route_layer is None:
            object.__setattr__(self, "route_layer", self.layers[0])
        if self.route_layer > self.layers[0]:
            raise ValueError(f"route_layer {self.route_layer} comes after the first edited "
                             f"layer {self.layers[0]}: the route must be decided before an "
                             "edit applies")

    @property
    def key_layer(self) -> int:
        """The first edited layer: training starts there (its input is cached)."""
        return self.layers[0]

    @property
    def default_keys(self) -> bool:
        """Keys as the paper reads them: the last token, entering the first edited layer."""
        return self.key_pool == "last" and self.route_layer == self.layers[0]

    def fingerprint(self) -> str:
        """What an edit must share with the engine it loads into: its layer set and, when not
        the paper's, how its keys were read (so default-keyed stores keep their fingerprint)."""
        data = {"arch": self.arch, "layers": list(self.layers), "modules": list(self.modules)}
        if not self.default_keys:
            data["keys"] = {"pool": self.key_pool, "layer": self.route_layer}
        return fingerprint(data)

    def describe_keys(self) -> str:
        pooled = "last-token" if self.key_pool == "last" else f"{self.key_pool}-pooled"
        return f"{pooled} keys entering layer {self.route_layer}"


def resolve(config: EditConfig, model_type: str, num_layers: int) -> EditShape:
    spec = arch_for(model_type)
    layers = config.layers if config.layers is not None else spec.default_layers(num_layers)
    for layer in layers:
        if layer >= num_layers:
            raise ValueError(f"layer {layer} does not exist: the model has {num_layers} layers "
                             f"(0..{num_layers - 1})")
    modules = config.modules if config.modules is not None else spec.default_modules
    for module in modules:
        if module not in spec.modules:
            raise ValueError(f"module {module!r} is not an editable {spec.name} module; "
                             f"choose from {list(spec.modules)}")
    return EditShape(spec.name, num_layers, tuple(layers), tuple(modules), config.rank,
                     float(config.scale), config.key_pool, config.route_layer)
