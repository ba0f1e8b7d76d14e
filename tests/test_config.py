"""Every invalid configuration value raises a ValueError that names it."""

import pytest

from sola_vllm.arch import ARCHS, resolve
from sola_vllm.config import EditConfig, RouterConfig, SolaConfig, TrainConfig


@pytest.mark.parametrize("make, named", [
    (lambda: EditConfig(rank=0), "0"),
    (lambda: EditConfig(rank=-3), "-3"),
    (lambda: EditConfig(rank=2.5), "2.5"),
    (lambda: EditConfig(scale=float("nan")), "nan"),
    (lambda: EditConfig(layers=(3, 3)), "duplicate"),
    (lambda: EditConfig(layers=(-1,)), "-1"),
    (lambda: EditConfig(modules=("",)), "''"),
    (lambda: RouterConfig(metric="manhattan"), "manhattan"),
    (lambda: RouterConfig(threshold=0), "0"),
    (lambda: RouterConfig(threshold=float("inf")), "inf"),
    (lambda: TrainConfig(steps=0), "0"),
    (lambda: TrainConfig(lr=-1.0), "-1.0"),
    (lambda: TrainConfig(optimizer="lion"), "lion"),
    (lambda: TrainConfig(schedule="linear"), "linear"),
    (lambda: TrainConfig(seed="7"), "'7'"),
])
def test_invalid_values_are_named(make, named):
    with pytest.raises(ValueError) as info:
        make()
    assert named in str(info.value)


def test_from_dict_round_trips_and_rejects_unknown_options():
    config = SolaConfig.from_dict({"edit": {"layers": [5, 3], "rank": 8},
                                   "router": {"metric": "l2", "threshold": 0.5}})
    assert config.edit.layers == (3, 5)
    assert SolaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="lora_alpha"):
        SolaConfig.from_dict({"edit": {"lora_alpha": 8}})
    with pytest.raises(ValueError, match="routing"):
        SolaConfig.from_dict({"routing": {}})


@pytest.mark.parametrize("model_type, layers, modules", [
    ("llama", (24, 25, 26), ("mlp.up_proj", "mlp.down_proj")),
    ("qwen2", (22, 23, 24), ("mlp.up_proj", "mlp.down_proj")),
    ("qwen3", (22, 23, 24), ("mlp.up_proj", "mlp.down_proj")),
    ("gpt2", (38, 39, 40), ("mlp.c_fc", "mlp.c_proj")),
])
def test_architecture_defaults(model_type, layers, modules):
    num_layers = {"llama": 30, "qwen2": 28, "qwen3": 28, "gpt2": 48}[model_type]
    shape = resolve(EditConfig(), model_type, num_layers)
    assert shape.layers == layers and shape.modules == modules
    assert shape.key_layer == layers[0]
    assert all(m in ARCHS[shape.arch].modules for m in modules)


def test_unsupported_architecture_is_named():
    with pytest.raises(ValueError, match="mamba"):
        resolve(EditConfig(), "mamba", 12)


def test_shape_fingerprint_depends_on_the_layer_set_only():
    a = resolve(EditConfig(layers=(1, 2)), "llama", 4)
    b = resolve(EditConfig(layers=(1, 2), rank=8), "llama", 4)
    c = resolve(EditConfig(layers=(1, 3)), "llama", 4)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
