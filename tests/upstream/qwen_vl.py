"""Tiny Qwen-VL-family Sa2VA checkpoints (Sa2VAChatModelQwen) from the pristine upstream files.

``qwen2_5_vl`` (Sa2VA-Qwen2_5-VL-3B/7B): transformers' Qwen2.5-VL (ViT patch 14, window attention) as ``model``.
``qwen3vl`` (Sa2VA-Qwen3-VL-4B): transformers' Qwen3-VL (ViT patch 16, deepstack, interleaved M-RoPE).
Both add ``text_hidden_fcs`` and upstream's hard-coded SAM2 (Hiera-L). Everything but SAM2 is 2 layers wide
enough to run; the processor is the real Qwen2_5_VLProcessor / Qwen3VLProcessor with a Qwen-style chat template.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from sa2va_rl.data.vocab import WORDS
from sa2va_rl.models.tiny import word_tokenizer

# the Qwen2.5-VL / Qwen3-VL tokenizers' added tokens, in their order, then Sa2VA's [SEG]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "[SEG]"]
PROMPT_WORDS = ["system", "user", "assistant", "You", "are", "helpful", "There", "picture", "region1", "Please",
                "Describe", "Sure", "[", "]"]

# Qwen2-VL / Qwen2.5-VL's released chat template (a default system turn when none is given)
QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's template, reduced to what image+text turns use (no tools, no thinking): no default system
QWEN3_VL_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string %}{{ message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture {{ image_count.value }}: "
    "{%- endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}{%- if add_vision_id %}Video {{ video_count.value }}: "
    "{%- endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{ content['text'] }}{%- endif %}{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

FAMILIES = {
    "qwen2_5_vl": dict(base="Qwen2_5_VLConfig", processor="Qwen2_5_VLProcessor", patch=14,
                       mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711],
                       template=QWEN2_5_VL_TEMPLATE),
    "qwen3vl": dict(base="Qwen3VLConfig", processor="Qwen3VLProcessor", patch=16,
                    mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], template=QWEN3_VL_TEMPLATE),
}


def tokenizer():
    tok = word_tokenizer(WORDS + PROMPT_WORDS, extra_special=SPECIAL)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    return tok


def config(family: str, tok, vocab: int) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    hidden, heads = 64, 4
    # head_dim 16 -> 8 rotary frequencies, split over (temporal, height, width)
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
                rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    if family == "qwen2_5_vl":
        text.update(model_type="qwen2_5_vl_text", use_sliding_window=False,
                    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1e6)
        vision = dict(model_type="qwen2_5_vl_vision", depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      out_hidden_size=hidden, fullatt_block_indexes=[1], tokens_per_second=2)
    else:
        text.update(model_type="qwen3_vl_text", head_dim=hidden // heads,
                    rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                    rope_theta=5e6)
        vision = dict(model_type="qwen3_vl_vision", depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      out_hidden_size=hidden, num_position_embeddings=256, deepstack_visual_indexes=[0])
    return dict(architectures=["Sa2VAChatModelQwen"], model_type="sa2va_chat",
                auto_map={"AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
                          "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
                          "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen"},
                text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False, template="qwen_chat",
                torch_dtype="bfloat16")


def image_processor(family: str):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    spec = FAMILIES[family]
    patch = spec["patch"]
    # the released preprocessor's defaults (upstream's predict_forward overrides min/max pixels per call)
    return Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=2,
                                    image_mean=spec["mean"], image_std=spec["std"],
                                    min_pixels=4 * (2 * patch) ** 2, max_pixels=16384 * (2 * patch) ** 2)


def write_processor(family: str, out: str) -> None:
    """processor_config.json (image and video processor, as transformers 5 saves a Qwen-VL processor) and
    chat_template.jinja. Written by hand: transformers builds video processors only with torchvision, which the
    CPU test machine lacks (tests/stubs/README.md); on a machine with it, AutoProcessor loads these files."""
    spec = FAMILIES[family]
    images = image_processor(family).to_dict()
    images["image_processor_type"] = "Qwen2VLImageProcessor"
    images.pop("_processor_class", None)
    video = {k: images[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                    "do_resize", "do_rescale", "rescale_factor", "do_normalize",
                                    "do_convert_rgb", "resample") if k in images}
    video.update(size={"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28},
                 video_processor_type="Qwen2VLVideoProcessor" if family == "qwen2_5_vl" else "Qwen3VLVideoProcessor")
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump({"processor_class": spec["processor"], "image_processor": images, "video_processor": video}, f,
                  indent=2, sort_keys=True)
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(spec["template"])


def load_processor(path: str):
    """The checkpoint's processor: ``AutoProcessor.from_pretrained(path, trust_remote_code=True)`` where
    transformers can build video processors (torchvision installed); on the CPU test machine, the same processor
    class with the saved image processor, tokenizer and chat template and no video processor (a test stand-in:
    these tests feed still images only)."""
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path, trust_remote_code=True)
    with open(os.path.join(path, "processor_config.json")) as f:
        name = json.load(f)["processor_class"]
    with open(os.path.join(path, "chat_template.jinja")) as f:
        template = f.read()
    cls = _images_only(getattr(transformers, name))
    return cls(image_processor=AutoImageProcessor.from_pretrained(path, trust_remote_code=True),
               tokenizer=AutoTokenizer.from_pretrained(path, trust_remote_code=True), video_processor=None, chat_template=template)


_IMAGES_ONLY: dict[type, type] = {}


def _images_only(cls: type) -> type:
    if cls not in _IMAGES_ONLY:
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return cls.check_argument_for_proper_class(self, argument_name, argument)

        _IMAGES_ONLY[cls] = type(cls.__name__, (cls,), {"check_argument_for_proper_class":
                                                        check_argument_for_proper_class,
                                                        "__module__": __name__})
    return _IMAGES_ONLY[cls]


def build_qwen_vl(family: str, src, out: str, seed: int = 0) -> str:
    """Copy the pristine .py files, write config/tokenizer/processor/generation config, build with upstream's
    class (its __init__ never calls post_init(): the compatibility layer's wrap) and save in bf16."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from sa2va_rl.models import upstream as up

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: one of {sorted(FAMILIES)}")
    os.makedirs(out, exist_ok=True)
    for f in sorted(os.listdir(src)):
        if f.endswith(".py"):
            shutil.copy(os.path.join(src, f), out)
    tok = tokenizer()
    vocab = -(-len(tok) // 64) * 64  # padded rows past len(tokenizer), as the releases' 151936 over ~151670
    cfg_dict = config(family, tok, vocab)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    with up._quiet_stdout():
        cls = get_class_from_dynamic_module("modeling_sa2va_qwen.Sa2VAChatModelQwen", out)
        cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    up._wrap_post_init(cls, [])
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_processor(family, out)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False,
                     max_new_tokens=16).save_pretrained(out)
    return out
