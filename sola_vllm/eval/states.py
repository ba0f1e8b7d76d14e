"""Residual-stream states of prompts at chosen decoder layers, read from the frozen base model.

`residual_states` returns, per prompt, the hidden states entering each requested layer at every
prompt token (HF `hidden_states[L]` is the input of decoder layer L). Routing studies read the
last token (the key of decision 1) or every token (subject-anchored keys) from them, without
training anything.
"""

from __future__ import annotations

import torch


@torch.inference_mode()
def residual_states(engine, prompts: list[str], layers: list[int],
                    batch_size: int = 32) -> list[dict[int, torch.Tensor]]:
    """-> per prompt {layer: fp32 [num_tokens, d]}, no LoRA anywhere (the base model)."""
    out: list[dict[int, torch.Tensor]] = []
    num_layers = engine.model.config.num_hidden_layers
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is outside 0..{num_layers - 1}")
    for start in range(0, len(prompts), batch_size):
        chunk = [engine.encode(p) for p in prompts[start:start + batch_size]]
        width = max(len(s) for s in chunk)
        pad = engine.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])  # right-padded
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
        hidden = engine.model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                              use_cache=False).hidden_states
        for row, seq in enumerate(chunk):
            out.append({layer: hidden[layer][row, :len(seq)].float().clone() for layer in layers})
    return out


def subject_token(engine, prompt: str, span: tuple[int, int]) -> int:
    """Index of the last token overlapping the character span `span` of `prompt` (the token
    the subject-anchored key is read at); the prompt's last token if the span is empty."""
    start, end = span
    enc = engine.tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if start < 0 or end <= start:
        return len(offsets) - 1
    last = -1
    for i, (a, b) in enumerate(offsets):
        if b > a and a < end and b > start:
            last = i
    if last < 0:
        raise ValueError(f"span {span} of {prompt!r} covers no token")
    return last
