"""export_peft: the adapter folder loads in PEFT and reproduces base + scale * B @ A exactly,
for Linear (Llama) and transposed Conv1D (GPT-2) weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import make_synthetic_edit
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sola_vllm.arch import ARCHS
from sola_vllm.edit import lora_name
from sola_vllm.peft_export import export_peft

peft = pytest.importorskip("peft")

LLAMA_MODULES = ARCHS["llama"].modules  # all seven, so q/k/v/o and GQA shapes are covered
GPT2_MODULES = ARCHS["gpt2"].modules


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, vocab_size=1000,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_embd=64, n_layer=4, n_head=4, n_inner=128, vocab_size=1000,
                        n_positions=64, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


CASES = {
    # arch: (model builder, modules, model class, kv projection width = 2 kv heads * 16)
    "llama": (tiny_llama, LLAMA_MODULES, LlamaForCausalLM, 32),
    "gpt2": (tiny_gpt2, GPT2_MODULES, GPT2LMHeadModel, None),
}


def merged_reference(model, edit):
    """The base model with W + scale * B @ A merged into every edited weight."""
    merged = copy.deepcopy(model)
    spec = ARCHS[edit.arch]
    with torch.no_grad():
        for layer in edit.layers:
            for module in edit.modules:
                a, b = edit.lora[lora_name(layer, module)]
                delta = edit.scale * b @ a  # [out, in]
                weight = merged.get_submodule(spec.module_path(layer, module)).weight
                weight += delta.T if spec.conv1d else delta  # Conv1D stores [in, out]
    return merged


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapter_matches_merged_weights(arch, tmp_path):
    build, modules, model_cls, kv_dim = CASES[arch]
    base = build()
    base.save_pretrained(tmp_path / "base")
    edit = make_synthetic_edit(f"peft-{arch}", arch=arch, layers=(2, 3), modules=modules,
                               kv_dim=kv_dim, scale=2.0, rank=4, seed=7)
    out = export_peft(edit, tmp_path / "adapter", base_model_path=str(tmp_path / "base"))

    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = base(ids).logits
        want = merged_reference(base, edit)(ids).logits
        loaded = model_cls.from_pretrained(tmp_path / "base").eval()
        model = peft.PeftModel.from_pretrained(loaded, out).eval()
        got = model(ids).logits

    assert got.dtype == torch.float32
    assert (got - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    lora_layers = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(lora_layers) == len(edit.layers) * len(edit.modules)  # nothing else adapted


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_files_and_names(arch, tmp_path):
    _, modules, _, kv_dim = CASES[arch]
    edit = make_synthetic_edit("names", arch=arch, layers=(1, 3), modules=modules[:2],
                               kv_dim=kv_dim, scale=0.5, rank=3, num_keys=2)
    out = export_peft(edit, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "sola_edit.json",
        "sola_keys.safetensors"]

    config = json.loads((out / "adapter_config.json").read_text())
    spec = ARCHS[arch]
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 3 and config["lora_alpha"] == 1.5 and config["lora_dropout"] == 0
    assert config["fan_in_fan_out"] is (arch == "gpt2") and config["bias"] == "none"
    assert config["layers_to_transform"] == [1, 3]
    assert config["target_modules"] == sorted(
        spec.module_path(layer, m) for layer in (1, 3) for m in modules[:2])

    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 2
    for layer in (1, 3):
        for module in modules[:2]:
            a, b = edit.lora[lora_name(layer, module)]
            prefix = f"base_model.model.{spec.module_path(layer, module)}"
            assert torch.equal(tensors[f"{prefix}.lora_A.weight"], a)  # [r, in]
            assert torch.equal(tensors[f"{prefix}.lora_B.weight"], b)  # [out, r]
    if arch == "llama":
        assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in tensors

    assert torch.equal(load_file(out / "sola_keys.safetensors")["keys"], edit.keys)
    meta = json.loads((out / "sola_edit.json").read_text())
    assert meta["id"] == "names" and meta["target"] == edit.target and meta["state"] == "active"
    assert meta["shape_fingerprint"] == edit.shape_fingerprint


def test_unknown_module_refused(tmp_path):
    edit = make_synthetic_edit("bad-module")
    edit.arch = "gpt2"  # llama module names on a GPT-2 edit
    with pytest.raises(ValueError, match="mlp.up_proj"):
        export_peft(edit, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
