"""Tiny InternVL-family Sa2VA checkpoints (Sa2VAChatModel) from the pristine upstream files."""

from __future__ import annotations

import json
import os
import shutil

import torch

from sa2va_rl.data.vocab import WORDS
from sa2va_rl.models.tiny import word_tokenizer

# the released tokenizers' added tokens (SA2VA_FACTS.md section 5), in their order
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>",
           "<ref>", "</ref>", "<box>", "</box>", "[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
PROMPT_WORDS = ["user", "assistant", "There", "are", "part", "regions", "picture", "region1", "Please", "segment",
                "Describe", "Sure"]


def tokenizer():
    tok = word_tokenizer(WORDS + PROMPT_WORDS, extra_special=SPECIAL)
    tok.eos_token = "<|im_end|>"
    return tok


# Sa2VA-1B's dimensions (InternVL2.5-1B: InternViT-300M-448px-V2_5 + Qwen2.5-0.5B-Instruct; SAM2 Hiera-L as always):
# 1.16 B parameters with random weights, for benchmarks (benchmarks/memory_plan.py, docs/scale.md)
_INTERNVIT_300M = dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=24)
SA2VA_1B_DIMS = {
    "llm": dict(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768),
    "vision": _INTERNVIT_300M,
    "top": dict(template="qwen_chat"),
}
# Sa2VA-4B (InternVL2.5-4B: InternViT-300M + Qwen2.5-3B-Instruct's published dims). Unconfirmed here
# (SA2VA_FACTS.md section 5): the lm_head rows (151,679 or Qwen's 151,936: the larger is taken) and whether the
# embeddings are tied (untied taken: the larger). Template phi3_chat, as the sa2va_4b configs say.
SA2VA_4B_DIMS = {
    "llm": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768),
    "vision": _INTERNVIT_300M,
}
# Sa2VA-8B (InternVL2.5-8B: InternViT-300M + InternLM2.5-7B-chat's published dims; vocabulary 92,553 as
# InternVL2.5-8B's llm_config, before Sa2VA's added tokens: unconfirmed). The pre-Cache InternLM2 code.
SA2VA_8B_DIMS = {
    "llm": dict(vocab_size=92553, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768),
    "vision": _INTERNVIT_300M,
}
# the releases benchmarks build: name -> (family, dims)
RELEASE_DIMS = {"sa2va_1b": ("v1", SA2VA_1B_DIMS), "sa2va_4b": ("v1", SA2VA_4B_DIMS),
                "sa2va_8b": ("v1_internlm2", SA2VA_8B_DIMS)}


def config(family: str, vocab: int, eos: int, dims: dict | None = None) -> dict:
    """The family's tiny config; ``dims`` ({"llm": ..., "vision": ..., "top": ...}) overrides fields."""
    if family == "v1_internlm2":  # Sa2VA-8B/26B: InternLM2 LLM, internlm2_chat template
        llm = dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", vocab_size=vocab, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=4096, bias=False, rope_theta=1e6, eos_token_id=eos, pad_token_id=0,
                   bos_token_id=1, tie_word_embeddings=False, attn_implementation="eager",
                   auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                             "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                             "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
        template = "internlm2_chat"
    else:
        llm = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=eos, bos_token_id=None,
                   pad_token_id=0, rope_theta=1e6)
        template = "phi3_chat" if family == "v1" else "qwen_chat"  # Sa2VA-4B's configs; InternVL3's
    vision = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", image_size=448, patch_size=14,
                  hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                  qk_normalization=False, norm_type="layer_norm", use_flash_attn=False, qkv_bias=True,
                  drop_path_rate=0.0)
    dims = dims or {}
    llm.update(dims.get("llm", {}))
    vision.update(dims.get("vision", {}))
    return dict(architectures=["Sa2VAChatModel"], model_type="sa2va_chat",
                auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
                          "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
                          "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel"},
                llm_config=llm, vision_config=vision, template=template, force_image_size=448, downsample_ratio=0.5,
                select_layer=-1, ps_version="v2", dynamic_image_size=True, use_thumbnail=True, min_dynamic_patch=1,
                max_dynamic_patch=12, torch_dtype="bfloat16") | dims.get("top", {})


def build_internvl(family: str, src, out: str, seed: int = 0, dims: dict | None = None,
                   device: str | None = None) -> str:
    """Copy the pristine .py files, write config/tokenizer/generation config, build with upstream's classes
    (through sa2va-rl's compatibility fixes, the only way they import on transformers 5) and save in bf16.
    ``device``: where the random weights are made ("cuda" makes a billions-of-parameters build in seconds)."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from sa2va_rl.models import upstream as up

    os.makedirs(out, exist_ok=True)
    for f in sorted(os.listdir(src)):
        if f.endswith(".py"):
            shutil.copy(os.path.join(src, f), out)
    tok = tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    vocab = -(-len(tok) // 64) * 64  # padded rows past len(tokenizer), as Sa2VA-4B's 151936 over 151679
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config(family, vocab, eos, dims), f, indent=2)
    applied: list[str] = []
    up._attn_mask_utils_shim(applied)
    with up._quiet_stdout():
        cls = get_class_from_dynamic_module("modeling_sa2va_chat.Sa2VAChatModel", out)
        cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    up._fix_rope_scaling(cfg, applied)
    up._fix_tied_weights_keys(cls, applied)
    up._fix_generation_mixin(cls, applied)
    up._wrap_post_init(cls, applied)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = cls(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    with open(os.path.join(out, "config.json"), "w") as f:  # the release's config, not transformers 5's rewrite
        json.dump(config(family, vocab, eos, dims), f, indent=2)
    tok.save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=0, do_sample=False, max_new_tokens=16).save_pretrained(out)
    return out


# the pre-Cache causal LMs of the v1 code: (class, config class, extra config)
UPSTREAM_LLMS = {
    "internlm2": ("InternLM2ForCausalLM", "InternLM2Config", dict(bias=False, rope_theta=1e6)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(original_max_position_embeddings=4096, rope_theta=1e4)),
}


def build_upstream_llm(arch: str, src, out: str, hidden: int = 64, layers: int = 2, heads: int = 4,
                       kv_heads: int = 2, ffn: int = 128, vocab: int = 512, seed: int = 0):
    """An upstream causal LM alone (``arch``: InternLM2, Sa2VA-8B/26B's LLM, or Phi3, the v1 code's other LLM),
    built in fp32 from a family's pristine configuration_<arch>.py / modeling_<arch>.py through the compatibility
    fixes (as load_upstream applies them to the LLM): for the sa2va_v2 copy, which no tiny family here builds, for
    Phi3, which no released Sa2VA uses, and for benchmarks."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from sa2va_rl.models import upstream as up

    name, config_name, extra = UPSTREAM_LLMS[arch]
    os.makedirs(out, exist_ok=True)
    for f in (f"configuration_{arch}.py", f"modeling_{arch}.py"):
        shutil.copy(os.path.join(src, f), out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(architectures=[name], model_type=arch, vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False, attn_implementation="eager", **extra,
                       auto_map={"AutoConfig": f"configuration_{arch}.{config_name}",
                                 "AutoModelForCausalLM": f"modeling_{arch}.{name}"}), f)
    applied: list[str] = []
    if up._needs_attn_mask_shim(out):  # modeling_phi3.py imports transformers.modeling_attn_mask_utils
        up._attn_mask_utils_shim(applied)
    with up._quiet_stdout():
        cls = get_class_from_dynamic_module(f"modeling_{arch}.{name}", out)
        cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    up._fix_rope_scaling(cfg, applied)
    up._fix_tied_weights_keys(cls, applied)
    up._fix_generation_mixin(cls, applied)
    torch.manual_seed(seed)
    with up._quiet_stdout():
        return cls(cfg).eval()
