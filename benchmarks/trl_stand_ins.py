"""Offline stand-ins for the Hub repos TRL's GRPO tests load (``trl-internal-testing/*``), built in code.

TRL's tests/test_grpo_trainer.py loads tiny random-weight models, their tokenizers/processors and the ``zen``
datasets from the Hub. This module builds look-alikes into a cache folder, with no download:

* models: the same architecture class as the Hub repo (transformers config classes, tiny dims, random weights),
  saved in a real Hugging Face Hub cache layout (``hub/models--trl-internal-testing--NAME/refs/main`` +
  ``snapshots/<commit>/``), so the unmodified tests' ``from_pretrained("trl-internal-testing/NAME")`` and TRL's
  own loads find them with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing there; the model keeps its Hub id
  as ``name_or_path`` (TRL names reward-model metrics after it).
* tokenizers: a byte-level BPE trained in code (``sa2va_rl.models.tiny.word_tokenizer``) on the datasets' words,
  with the family's special tokens and its released chat template (the copies TRL ships in
  ``trl/chat_templates``), eos/pad as the family's.
* processors (VLMs): the family's processor class (transformers' PIL image processor, the tokenizer with the
  family's image tokens, the chat template). Processors that insist on a video processor (Qwen2-VL, Qwen2.5-VL,
  SmolVLM) are built without one where torchvision is absent (``AutoProcessor`` is patched for stand-in ids only:
  :func:`activate`); the tests feed still images only.
* datasets: ``zen`` (``standard_prompt_only`` / ``conversational_prompt_only``, train 17 rows / test 2 rows: the
  Zen of Python), ``zen-image`` and ``zen-multi-image`` (``conversational_prompt_only``, train), as parquet files;
  ``datasets.load_dataset`` is patched for ``trl-internal-testing/*`` paths only (split, streaming, DatasetDict
  as the Hub loader returns them).

Not built (their tests fail to load the repo, identically in both runs; see ``NOT_BUILT``): repos with remote
code, and families transformers cannot build small enough here.

    python benchmarks/trl_stand_ins.py CACHE_DIR      # build (idempotent: a stamp file records the build)
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import shutil
import sys

HUB_USER = "trl-internal-testing"
COMMIT = "5a2a0000000000000000000000000000000000aa"  # a fixed fake commit: refs/main points at it
STAMP_VERSION = "3"  # 3: Qwen pieces at their ids, 4096 positions
NOT_BUILT = {
    "tiny-RemoteForCausalLM": "remote code (a modeling file on the Hub, trust_remote_code)",
}

_SPEC_CACHE: dict | None = None


# ------------------------------------------------------------------------------------------------------ datasets
def zen_lines() -> list[str]:
    """The 19 aphorisms of the Zen of Python (``import this``), the text of TRL's ``zen`` datasets."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # importing ``this`` prints the text
        import this
    text = codecs.decode(this.s, "rot13")
    return [line for line in text.splitlines()[2:] if line.strip()]


def _prompt_of(line: str) -> str:
    words = line.split()
    return " ".join(words[: max(1, len(words) // 2)])


def zen_rows(config: str, split: str) -> list[dict]:
    lines = zen_lines()
    lines = lines[:17] if split == "train" else lines[17:]
    if config == "standard_prompt_only":
        return [{"prompt": _prompt_of(line)} for line in lines]
    if config == "conversational_prompt_only":
        return [{"prompt": [{"role": "user", "content": f"What comes after '{_prompt_of(line)}'?"}]}
                for line in lines]
    raise ValueError(config)


def _image(rng, h: int, w: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def write_datasets(root: str) -> None:
    import numpy as np
    from datasets import Dataset, Features, Image, List, Value

    for config in ("standard_prompt_only", "conversational_prompt_only"):
        for split in ("train", "test"):
            path = os.path.join(root, "zen", config, f"{split}.parquet")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Dataset.from_list(zen_rows(config, split)).to_parquet(path)
    rng = np.random.default_rng(0)
    lines = zen_lines()[:17]
    content = List({"type": Value("string"), "text": Value("string")})
    prompt = List({"role": Value("string"), "content": content})
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                       {"type": "text", "text": f"What is in the picture? {_prompt_of(l)}"}]}],
             "image": _image(rng, 32 + 8 * (i % 3), 32 + 8 * ((i + 1) % 3))} for i, l in enumerate(lines)]
    path = os.path.join(root, "zen-image", "conversational_prompt_only", "train.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Dataset.from_list(rows, features=Features(prompt=prompt, image=Image())).to_parquet(path)
    rows = [{"prompt": [{"role": "user", "content": [{"type": "image", "text": None}] * (1 + i % 2) +
                         [{"type": "text", "text": f"Compare the pictures. {_prompt_of(l)}"}]}],
             "images": [_image(rng, 32, 32 + 8 * j) for j in range(1 + i % 2)]} for i, l in enumerate(lines)]
    path = os.path.join(root, "zen-multi-image", "conversational_prompt_only", "train.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Dataset.from_list(rows, features=Features(prompt=prompt, images=List(Image()))).to_parquet(path)


def load_stand_in_dataset(root: str, path: str, name: str | None = None, split=None, streaming: bool = False,
                          **kwargs):
    """``load_dataset(path, name, split=..., streaming=...)`` for a stand-in ``trl-internal-testing/*`` dataset."""
    import datasets

    repo = path.split("/", 1)[1]
    base = os.path.join(root, repo)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"no offline stand-in for dataset {path!r} (benchmarks/trl_stand_ins.py)")
    configs = sorted(os.listdir(base))
    name = name or kwargs.pop("data_dir", None) or configs[0]
    if name not in configs:
        raise ValueError(f"BuilderConfig {name!r} not found. Available: {configs}")
    files = {f[: -len(".parquet")]: os.path.join(base, name, f) for f in sorted(os.listdir(os.path.join(base, name)))}
    return datasets.load_dataset("parquet", data_files=files, split=split, streaming=streaming)


# ------------------------------------------------------------------------------------------------------ tokenizers
def _template(name: str) -> str:
    import trl

    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
              "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN_FIRST_SPECIAL = 151643  # Qwen2.5/Qwen3's id of <|endoftext|>: TRL's tests hard-code 151643 (pad), 151645 (eos)
QWEN_VOCAB = 151936  # the released configs' vocab_size (rows past the tokenizer's 151669)
# Qwen2.5/Qwen3 vocabulary pieces at their released ids, for the token ids TRL's tool and environment tests hard-code
# in their mocked generate() (tool calls in Qwen's JSON format); every other id below the specials stays a trained
# or placeholder token. Pieces only Qwen's merges reach: decoded right, never produced by encoding here.
QWEN_PIECES = {293: " b", 314: " {", 330: ' "', 397: ">\n", 411: "out", 450: "de", 497: '",', 522: "</", 606: "name",
               788: '":', 927: "sh", 1318: "text", 4913: '{"', 5212: ' {"', 6023: "hi", 6659: "call", 7692: "async",
               9520: "step", 11248: "}}\n", 13477: "crement", 14172: "tool", 16370: "arguments", 17453: "Done",
               22785: "_tool", 35744: "increment", 64648: "multiply", 93054: "_multiply", 95642: '"}}\n'}

# family -> (special tokens, extra non-special added tokens, eos, pad, bos, chat template name)
FAMILIES = {
    "qwen2_5": (QWEN_SPECIAL, QWEN_ADDED, "<|im_end|>", "<|endoftext|>", None, "qwen2_5"),
    "qwen3": (QWEN_SPECIAL, QWEN_ADDED, "<|im_end|>", "<|endoftext|>", None, "qwen3"),
    "qwen2_5_vl": (QWEN_SPECIAL, QWEN_ADDED, "<|im_end|>", "<|endoftext|>", None, "qwen2_5_vl"),
    "llama3_2": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|eom_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"], [], "<|eot_id|>",
                 "<|finetune_right_pad_id|>", "<|begin_of_text|>", "llama3_2"),
    "gemma3": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"], [], "<end_of_turn>", "<pad>", "<bos>", "gemma3"),
    "llava_next": (["<unk>", "<s>", "</s>", "<image>", "<pad>"], [], "</s>", "<pad>", "<s>", "llava_next"),
    "smolvlm": (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                 "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)], [],
                "<end_of_utterance>", "<|endoftext|>", "<|im_start|>", "smolvlm"),
    "gptoss": (["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                "<|end|>", "<|message|>", "<|call|>"], [], "<|return|>", "<|endoftext|>", "<|startoftext|>",
               "gptoss"),
    "cohere2": (["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>",
                 "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                 "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>", "<|START_THINKING|>",
                 "<|END_THINKING|>", "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>",
                 "<|END_TOOL_RESULT|>", "<|START_TEXT|>", "<|END_TEXT|>"], [], "<|END_OF_TURN_TOKEN|>", "<PAD>",
                "<BOS_TOKEN>", "cohere2"),
    "glm4moe": (["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                 "<tool_response>", "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
                 "/nothink"], [], "<|endoftext|>", "<|endoftext|>", None, "glm4moe"),
}


def _corpus_words() -> list[str]:
    from sa2va_rl.data.vocab import WORDS

    words = set(WORDS)
    for line in zen_lines():
        words.update(line.replace(".", " .").replace(",", " ,").split())
    words.update(["system", "user", "assistant", "model", "You", "are", "a", "helpful", "What", "comes", "after",
                  "picture", "pictures", "Compare", "in", "the", "is", "?", "'", "Qwen", "created", "by",
                  "Alibaba", "Cloud", "\n", "\n\n"])
    return sorted(words)


def _qwen_layout_tokenizer(special: list[str], added: list[str]):
    """A byte-level BPE trained on the corpus words, its vocabulary filled with unreachable placeholder tokens up to
    Qwen's first special id, Qwen's pieces at their ids where TRL's tests hard-code them (``QWEN_PIECES``), then
    Qwen's special and added tokens at their released ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sa2va_rl.models.tiny import word_tokenizer

    trained = json.loads(word_tokenizer(_corpus_words()).backend_tokenizer.to_str())["model"]
    vocab = {t: i for t, i in trained["vocab"].items() if t not in ("<pad>", "<unk>", "<eos>")}
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    tokens = sorted(vocab, key=vocab.get) + [f"<|placeholder_{i}|>" for i in range(len(vocab), QWEN_FIRST_SPECIAL)]
    to_unicode = _bytes_to_unicode()
    free = (i for i in range(QWEN_FIRST_SPECIAL - 1, -1, -1) if i not in QWEN_PIECES)  # placeholder slots, from the top
    where = {t: i for i, t in enumerate(tokens)}
    for i, text in QWEN_PIECES.items():
        piece, old = "".join(to_unicode[b] for b in text.encode("utf-8")), tokens[i]
        j = where.get(piece)  # a trained piece swaps ids with the token at i
        if j is None and not old.startswith("<|placeholder_"):
            j = next(free)  # a new piece: the trained token it displaces moves to a placeholder's slot
        if j is not None:
            tokens[j], where[old] = old, j
        tokens[i], where[piece] = piece, i
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == QWEN_FIRST_SPECIAL, "a piece placed twice"
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies are written in it)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


@functools.lru_cache(maxsize=None)
def _base_tokenizer(family: str):
    from sa2va_rl.models.tiny import word_tokenizer

    special, added, eos, pad, bos, template = FAMILIES[family]
    if special is QWEN_SPECIAL:
        tok = _qwen_layout_tokenizer(special, added)
        assert tok.convert_tokens_to_ids("<|im_end|>") == QWEN_FIRST_SPECIAL + 2
    else:
        tok = word_tokenizer(_corpus_words(), extra_special=special)
        if added:
            tok.add_tokens(added)
    tok.eos_token, tok.pad_token = eos, pad
    if bos:
        tok.bos_token = bos
    if "<unk>" not in special and "<UNK>" in special:
        tok.unk_token = "<UNK>"
    tok.chat_template = _template(template)
    return tok


def tokenizer(family: str):
    import copy

    return copy.deepcopy(_base_tokenizer(family))


# ---------------------------------------------------------------------------------------------------- models
def _text(vocab: int, tok, **over) -> dict:
    """A tiny text config; 4096 positions (the released models have 32k+): a tool-calling prompt renders its tools'
    JSON schema in this small vocabulary's many tokens (456 for TRL's environment tests), and TRL drops a tool turn
    that reaches the context."""
    if len(tok) > QWEN_FIRST_SPECIAL:
        vocab = QWEN_VOCAB
    d = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
             eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id if tok.bos_token else None,
             tie_word_embeddings=False)
    d.update(over)
    return d


def _causal(model_type: str, family: str, cls: str = "AutoModelForCausalLM", **over):
    def build():
        import transformers
        from transformers import AutoConfig

        tok = tokenizer(family)
        cfg = AutoConfig.for_model(model_type, **_text(len(tok), tok, **over))
        if cls == "AutoModelForSequenceClassification":
            cfg.num_labels = 1
        return getattr(transformers, cls).from_config(cfg), tok
    return build


def _qwen_vl(model_type: str):
    def build():
        import transformers
        from transformers import AutoConfig

        tok = tokenizer("qwen2_5_vl")
        ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
        text = _text(len(tok), tok, hidden_size=32, intermediate_size=64, max_position_embeddings=4096,
                     rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        if model_type == "qwen2_vl":
            vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, in_channels=3,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        else:
            vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, in_channels=3, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=32,
                          fullatt_block_indexes=[1], tokens_per_second=2)
        cfg = AutoConfig.for_model(model_type, text_config=text, vision_config=vision,
                                   image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                   vision_start_token_id=ids["<|vision_start|>"],
                                   vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
        model = transformers.AutoModelForImageTextToText.from_config(cfg)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        images = Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                          min_pixels=56 * 56, max_pixels=112 * 112)
        cls = transformers.Qwen2VLProcessor if model_type == "qwen2_vl" else transformers.Qwen2_5_VLProcessor
        proc = images_only(cls)(image_processor=images, tokenizer=tok, video_processor=None,
                                chat_template=_template("qwen2_5_vl"))
        return model, proc
    return build


def _gemma3():
    import transformers
    from transformers import AutoConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = tokenizer("gemma3")
    tok._set_model_specific_special_tokens(special_tokens={"boi_token": "<start_of_image>", "eoi_token":
                                                           "<end_of_image>", "image_token": "<image_soft_token>"})
    text = _text(len(tok), tok, hidden_size=32, intermediate_size=64, head_dim=8, sliding_window=64,
                 layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=56, patch_size=14, vision_use_head=False)
    cfg = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                               eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                               image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
                               tie_word_embeddings=False)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    images = Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
    proc = transformers.Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=4,
                                        chat_template=_template("gemma3"))
    return model, proc


def _llava(next_: bool):
    def build():
        import transformers
        from transformers import AutoConfig

        tok = tokenizer("llava_next")
        tok._set_model_specific_special_tokens(special_tokens={"image_token": "<image>"})
        image_id = tok.convert_tokens_to_ids("<image>")
        text = dict(_text(len(tok), tok), model_type="llama")
        vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, image_size=28, patch_size=14, projection_dim=16)
        if next_:
            from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

            cfg = AutoConfig.for_model("llava_next", text_config=text, vision_config=vision,
                                       image_token_index=image_id, vision_feature_layer=-1,
                                       image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
                                       tie_word_embeddings=False)
            model = transformers.LlavaNextForConditionalGeneration(cfg)
            images = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                                image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]])
            proc = transformers.LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=14,
                                                   num_additional_image_tokens=1,
                                                   vision_feature_select_strategy="default",
                                                   chat_template=_template("llava_next"))
        else:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

            cfg = AutoConfig.for_model("llava", text_config=text, vision_config=vision, image_token_index=image_id,
                                       vision_feature_layer=-1, tie_word_embeddings=False)
            model = transformers.LlavaForConditionalGeneration(cfg)
            images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
            proc = transformers.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14,
                                               num_additional_image_tokens=1,
                                               vision_feature_select_strategy="default",
                                               chat_template=_template("llava_next"))
        return model, proc
    return build


MODELS = {
    "tiny-Qwen2ForCausalLM-2.5": _causal("qwen2", "qwen2_5"),
    "tiny-Qwen2ForSequenceClassification-2.5": _causal("qwen2", "qwen2_5", "AutoModelForSequenceClassification"),
    "tiny-Qwen3ForCausalLM": _causal("qwen3", "qwen3", head_dim=8),
    "tiny-Qwen3ForSequenceClassification": _causal("qwen3", "qwen3", "AutoModelForSequenceClassification",
                                                   head_dim=8),
    "tiny-Qwen3MoeForCausalLM": _causal("qwen3_moe", "qwen3", head_dim=8, num_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=16, decoder_sparse_step=1),
    "tiny-LlamaForCausalLM-3.2": _causal("llama", "llama3_2"),
    "tiny-LlamaForSequenceClassification-3.2": _causal("llama", "llama3_2", "AutoModelForSequenceClassification"),
    "tiny-MistralForCausalLM-0.2": _causal("mistral", "llama3_2"),
    "tiny-Gemma2ForCausalLM": _causal("gemma2", "gemma3", head_dim=8),
    "tiny-GptOssForCausalLM": _causal("gpt_oss", "gptoss", head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=64, layer_types=["sliding_attention", "full_attention"]),
    "tiny-Cohere2ForCausalLM": _causal("cohere2", "cohere2", sliding_window=64,
                                       layer_types=["sliding_attention", "full_attention"]),
    "tiny-Glm4MoeForCausalLM": _causal("glm4_moe", "glm4moe", head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=16, first_k_dense_replace=1, n_group=1, topk_group=1),
    "tiny-Qwen2VLForConditionalGeneration": _qwen_vl("qwen2_vl"),
    "tiny-Qwen2_5_VLForConditionalGeneration": _qwen_vl("qwen2_5_vl"),
    "tiny-Gemma3ForConditionalGeneration": _gemma3,
    "tiny-LlavaForConditionalGeneration": _llava(False),
    "tiny-LlavaNextForConditionalGeneration": _llava(True),
}


# --------------------------------------------------------------------------------------------- processors w/o video
_IMAGES_ONLY: dict[type, type] = {}


def images_only(cls: type) -> type:
    """``cls`` (a processor class that insists on a video processor) accepting ``video_processor=None``."""
    if cls not in _IMAGES_ONLY:
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return cls.check_argument_for_proper_class(self, argument_name, argument)

        def save_pretrained(self, save_directory, **kwargs):
            if self.video_processor is not None:
                return cls.save_pretrained(self, save_directory, **kwargs)
            return save_images_only(self, save_directory)

        _IMAGES_ONLY[cls] = type(cls.__name__, (cls,), {"check_argument_for_proper_class":
                                                        check_argument_for_proper_class,
                                                        "save_pretrained": save_pretrained})
    return _IMAGES_ONLY[cls]


def save_images_only(proc, out: str) -> list[str]:
    """Save a processor built without a video processor: tokenizer, image processor, chat template and a
    processor_config.json naming its class (what :func:`activate`'s AutoProcessor fallback reads back)."""
    os.makedirs(out, exist_ok=True)
    proc.tokenizer.save_pretrained(out)
    proc.image_processor.save_pretrained(out)
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump({"processor_class": type(proc).__name__}, f)
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(proc.chat_template)
    return [out]


# ------------------------------------------------------------------------------------------------------ build
def snapshot_dir(root: str, name: str) -> str:
    return os.path.join(root, "hub", f"models--{HUB_USER}--{name}", "snapshots", COMMIT)


def build_model(root: str, name: str, seed: int = 0) -> None:
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model, proc = MODELS[name]()
    tok = getattr(proc, "tokenizer", proc)
    out = snapshot_dir(root, name)
    os.makedirs(out, exist_ok=True)
    model.config.get_text_config().pad_token_id = tok.pad_token_id
    if model.can_generate():
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                                   bos_token_id=tok.bos_token_id, do_sample=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    if proc is not tok and not os.path.exists(os.path.join(out, "tokenizer.json")):
        tok.save_pretrained(out)
    refs = os.path.join(root, "hub", f"models--{HUB_USER}--{name}", "refs")
    os.makedirs(refs, exist_ok=True)
    with open(os.path.join(refs, "main"), "w") as f:
        f.write(COMMIT)


def build(root: str, names: list[str] | None = None) -> str:
    """Build every stand-in (or ``names``) into ``root`` unless the stamp says it is there; return ``root``."""
    stamp = os.path.join(root, "stand_ins.json")
    wanted = sorted(names or MODELS)
    done = {}
    if os.path.exists(stamp):
        with open(stamp) as f:
            done = json.load(f)
        if done.get("version") != STAMP_VERSION:
            shutil.rmtree(root)
            done = {}
    os.makedirs(root, exist_ok=True)
    if not done.get("datasets"):
        write_datasets(os.path.join(root, "datasets"))
        done["datasets"] = True
    for name in wanted:
        if name not in done.get("models", []) and name not in done.get("failed", {}):
            try:
                build_model(root, name)
                done.setdefault("models", []).append(name)
            except Exception as e:  # its tests then fail to load it, in both runs alike; listed in the stamp
                done.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
                shutil.rmtree(os.path.join(root, "hub", f"models--{HUB_USER}--{name}"), ignore_errors=True)
    done["version"] = STAMP_VERSION
    with open(stamp, "w") as f:
        json.dump(done, f, indent=1)
    return root


# ------------------------------------------------------------------------------------------------------ redirect
def environment(root: str) -> dict[str, str]:
    """The environment variables a process needs to find the stand-ins (set them before huggingface_hub loads)."""
    return {"HF_HUB_CACHE": os.path.join(root, "hub"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "SA2VA_RL_TRL_STAND_INS": root}


def activate(root: str) -> None:
    """Point this process at the stand-ins: environment, ``datasets.load_dataset`` for ``trl-internal-testing/*``,
    and ``AutoProcessor.from_pretrained`` for stand-in VLMs whose processor class insists on a video processor
    (torchvision absent). Call before the tests import ``datasets.load_dataset``."""
    os.environ.update(environment(root))
    import datasets
    import transformers

    original_load = datasets.load_dataset

    @functools.wraps(original_load)
    def load_dataset(path, name=None, *args, **kwargs):
        if isinstance(path, str) and path.startswith(f"{HUB_USER}/"):
            return load_stand_in_dataset(os.path.join(root, "datasets"), path, name, *args, **kwargs)
        return original_load(path, name, *args, **kwargs)

    datasets.load_dataset = load_dataset

    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    original_proc = transformers.AutoProcessor.from_pretrained.__func__

    def from_pretrained(cls, name, *args, **kwargs):
        try:
            return original_proc(cls, name, *args, **kwargs)
        except Exception:
            if not (isinstance(name, str) and name.startswith(f"{HUB_USER}/")):
                raise
            path = snapshot_dir(root, name.split("/", 1)[1])
            with open(os.path.join(path, "processor_config.json")) as f:
                proc_cls = getattr(transformers, json.load(f)["processor_class"])
            if "video_processor" not in proc_cls.get_attributes():
                raise
            template = None
            if os.path.exists(os.path.join(path, "chat_template.jinja")):
                with open(os.path.join(path, "chat_template.jinja")) as f:
                    template = f.read()
            return images_only(proc_cls)(image_processor=transformers.AutoImageProcessor.from_pretrained(path),
                                         tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                                         video_processor=None, chat_template=template)

    transformers.AutoProcessor.from_pretrained = classmethod(from_pretrained)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    print(build(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trlpeer/stand_ins",
                sys.argv[2].split(",") if len(sys.argv) > 2 else None))
