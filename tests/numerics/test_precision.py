import torch
from transformers import AutoModelForCausalLM

from sa2va_rl.numerics.precision import fp32_master_weights


def _one_step(model, ids, autocast: bool) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.float().backward()
    opt.step()
    return {n: (p.detach() != before[n]).float().mean().item() for n, p in model.named_parameters()
            if p.requires_grad}


def _bf16_model(tiny_causal):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_causal, dtype=torch.bfloat16)


def test_pure_bf16_weights_stall_at_small_lr(tiny_causal):
    """The fault: AdamW at lr 1e-5 on bf16 weights leaves most of them bit-identical after a step."""
    model = _bf16_model(tiny_causal)
    ids = torch.randint(3, 100, (2, 12))
    changed = _one_step(model, ids, autocast=False)
    n = {name: p.numel() for name, p in model.named_parameters()}
    frac = sum(changed[k] * n[k] for k in changed) / sum(n[k] for k in changed)
    assert frac < 0.5


def test_fp32_master_weights_every_trainable_tensor_changes_under_bf16_autocast(tiny_causal):
    model = _bf16_model(tiny_causal)
    frozen = [p for n, p in model.named_parameters() if "layers.0." in n]
    for p in frozen:
        p.requires_grad_(False)
    cast = fp32_master_weights(model)
    assert cast == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # frozen ones may stay bf16
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight or \
        not model.config.tie_word_embeddings  # the same Parameter: still tied
    ids = torch.randint(3, 100, (2, 12))
    changed = _one_step(model, ids, autocast=True)
    assert all(frac > 0 for frac in changed.values()), {k: v for k, v in changed.items() if v == 0}
    # norms and biases aside, every element of a weight matrix with a gradient moves
    assert min(v for k, v in changed.items() if "proj" in k) > 0.99
    assert fp32_master_weights(model) == 0  # idempotent
