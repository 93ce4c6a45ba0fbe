"""Sa2VAPolicy: a Sa2VA checkpoint (real or tiny) as a GRPO policy.

One code path serves both: it uses only what a Sa2VA checkpoint exposes (``extract_feature``, ``language_model``,
``text_hidden_fcs``, ``grounding_encoder.get_sam2_embeddings`` / ``language_embd_inference``) and builds the
``inputs_embeds`` itself (models/sa2va_inputs.py), as upstream's ``generate`` does, but with a count check.

* ``generate``: every row of a step in one call (the G rows of a group share one image's features; prompts
  left-padded with the pad token's embedding and attention mask 0), from ``inputs_embeds``, so the
  output holds the new tokens only (``new_tokens`` checks it). The vocabulary's padded rows (ids >=
  len(tokenizer)) are masked with -inf before the LogitsGuard sees the row; stop words that are not single
  tokens (phi3_chat's ``<|end|>`` on a Qwen vocabulary) stop generation and cut the completion.
* ``logprobs``: one forward over [prompt, completion, right padding]; the LM head runs in fp32 outside autocast
  and the padded rows are masked there too, so the scored policy is the sampled one.
* ``segment``: last-layer hidden state at the first ``[SEG]`` of a completion (one LLM forward for all such rows,
  models/sampling.py) -> ``text_hidden_fcs`` -> the grounding decoder -> a bool mask at image size. A completion
  without ``[SEG]`` gets no mask (its IoU reward is 0).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import GenerationConfig

from sa2va_rl.models.policy import Generation, eos_set
from sa2va_rl.models.sampling import BannedTokens, GroundedPolicy, StopWords, generate_groups, grouped_prompts
from sa2va_rl.models.sa2va_inputs import (IMG_CONTEXT, IMG_END, IMG_START, SEG, VP_END, VP_START, VisualInputs,
                                          encode_sample, single_token_ids, splice_features, template, visual_features)
from sa2va_rl.models.layout import ReleaseLayout, verify_weight_files
from sa2va_rl.models.upstream import INTERNVL, QWEN_VL, load_upstream, read_config
from sa2va_rl.numerics import LogitsGuard
from sa2va_rl.numerics.precision import fp32_master_weights

logger = logging.getLogger(__name__)

# LoRA targets by LLM architecture, as Sa2VA's own wrap_llm_lora (the original RL script's q,k,v,o,gate,up,down)
LORA_TARGETS = {
    "InternLM2ForCausalLM": "wqkv,wo,w1,w2,w3",
    "Phi3ForCausalLM": "qkv_proj,o_proj,gate_up_proj,down_proj",
}
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # Qwen2/2.5/3, Llama
SAVE_DTYPES = {"input": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Sa2VAModelArgs:
    """How a Sa2VA checkpoint is loaded and what of it trains."""

    lora_r: int = field(default=128, metadata={"help": "LoRA rank on the LLM (the original script's 128); 0 trains "
                                                       "the LLM fully."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="auto", metadata={
        "help": "Comma-separated LLM module names; 'auto': Sa2VA's own choice for the LLM (q,k,v,o,gate,up,down "
                "projections; InternLM2: wqkv,wo,w1,w2,w3)."})
    train_vision: bool = field(default=False, metadata={"help": "Train the vision tower and mlp1 (frozen by "
                                                                "default)."})
    train_mask_decoder: bool = field(default=False, metadata={
        "help": "Train text_hidden_fcs and SAM2's mask decoder and prompt encoder (frozen by default; SAM2's image "
                "encoder never trains). text_hidden_fcs also trains whenever --mask_loss_weight > 0."})
    max_tiles: int | None = field(default=None, metadata={"help": "Most 448-px tiles per image (default: the "
                                                                  "checkpoint's max_dynamic_patch, else 12)."})
    save_dtype: str = field(default="input", metadata={
        "help": "dtype of the saved model's weights: 'input' (the checkpoint's own, e.g. bf16 for the releases), "
                "float32, bfloat16 or float16."})

    def __post_init__(self) -> None:
        if self.lora_r < 0:
            raise ValueError(f"lora_r={self.lora_r}: use 0 (full fine-tuning of the LLM) or a positive rank")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ValueError(f"max_tiles={self.max_tiles}: use 1 or more")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype={self.save_dtype!r}: use one of {sorted(SAVE_DTYPES)}")


def is_sa2va_checkpoint(path: str) -> bool:
    """A Sa2VA checkpoint (ours or upstream's) rather than a plain causal LM, judged by its config.json."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False
    names = [cfg.get("model_type", "")] + list(cfg.get("architectures") or []) + [
        str(v) for v in (cfg.get("auto_map") or {}).values()]
    return any("sa2va" in str(n).lower() for n in names)


def model_family(model) -> str:
    """``internvl`` (our tiny model and Sa2VAChatModel) or ``qwen_vl`` (Sa2VAChatModelQwen)."""
    info = getattr(model, "sa2va_rl_upstream", None)
    return info.family if info is not None else INTERNVL


def load_sa2va(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) from a local Sa2VA checkpoint. Ours loads without remote code (registered
    model_type ``sa2va_tiny``); a released one runs its own code through the compatibility fixes of
    models/upstream.py, so it needs ``trust_remote_code=True``. The checkpoint's file layout is recorded on the
    model (``sa2va_rl_layout``) so that ``save_sa2va`` writes the trained model back the same way."""
    from transformers import AutoModel, AutoTokenizer

    import sa2va_rl.models.tiny_sa2va  # noqa: F401  (registers sa2va_tiny with the Auto classes)

    cfg = read_config(path)
    verify_weight_files(path)
    model_type = cfg.get("model_type")
    if model_type != "sa2va_tiny" and not trust_remote_code:
        raise ValueError(f"{path}: model_type {model_type!r} ships its modeling code with the checkpoint; loading "
                         "it runs that code. Pass --trust_remote_code if you trust this checkpoint.")
    if model_type == "sa2va_tiny":
        model = AutoModel.from_pretrained(path, dtype=dtype)
    else:
        model, _info = load_upstream(path, dtype)
    model.sa2va_rl_layout = ReleaseLayout.read(path, model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # upstream's preparing_for_generation also casts the whole model to bf16; only the ids are needed here
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    model.seg_token_idx = tokenizer.convert_tokens_to_ids(SEG)
    if os.path.exists(os.path.join(path, "generation_config.json")):
        gc = GenerationConfig.from_pretrained(path)
    else:
        gc = copy.deepcopy(getattr(llm_of(model), "generation_config", None) or GenerationConfig())
    if model_family(model) == INTERNVL:
        _instruction, stops = template(getattr(model.config, "template", "qwen_chat"))
    else:
        stops = ("<|im_end|>", "<|endoftext|>")
    stop_ids = single_token_ids(tokenizer, stops)
    eos = sorted(eos_set(gc) | set(stop_ids))
    gc.eos_token_id = (eos[0] if len(eos) == 1 else eos) if eos else None
    model.generation_config = gc  # TRL reads the model's generation config for pad and eos ids
    return model, tokenizer


def _llm_slot(model) -> tuple[torch.nn.Module, str]:
    """(owner, attribute) of the LLM that LoRA wraps: ``language_model`` of the InternVL family; the text model
    inside transformers' Qwen-VL model of the Qwen-VL family (its vision tower stays out of LoRA's reach)."""
    if model_family(model) == QWEN_VL:
        inner = model.model.model  # Sa2VAChatModelQwen.model (Qwen*VLForConditionalGeneration).model
        return inner, "language_model"
    return model, "language_model"


def llm_of(model) -> torch.nn.Module:
    owner, attr = _llm_slot(model)
    return getattr(owner, attr)


def lora_targets(model, requested: str) -> list[str]:
    if requested != "auto":
        return [t.strip() for t in requested.split(",") if t.strip()]
    arch = type(_unwrap(llm_of(model))).__name__
    return LORA_TARGETS.get(arch, DEFAULT_LORA_TARGETS).split(",")


def _unwrap(lm):
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def mask_decoder_modules(model) -> list[str]:
    """The grounding decoder's trainable parts by name: SAM2's ``sam_mask_decoder`` and ``sam_prompt_encoder`` (the
    language prompt enters there); the image encoder and the memory modules are not among them."""
    return [name for name, _ in model.grounding_encoder.named_modules(prefix="grounding_encoder")
            if name.rsplit(".", 1)[-1] in ("sam_mask_decoder", "sam_prompt_encoder")]


def prepare_for_training(model, args: Sa2VAModelArgs, mask_loss: bool = False):
    """Freeze what the args keep frozen and put LoRA on the LLM (peft). Returns the model. ``mask_loss``: the mask
    loss is on (rl/mask_loss.py), so ``text_hidden_fcs`` trains.

    Trainable parameters end up fp32 whatever the checkpoint's dtype (numerics/precision.py: AdamW's small updates
    vanish in bf16 weights); frozen ones keep it (bf16 for the releases), and bf16 compute comes from autocast."""
    for p in model.parameters():
        p.requires_grad_(False)
    owner, attr = _llm_slot(model)
    if args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                         target_modules=lora_targets(model, args.lora_target_modules),
                         task_type="CAUSAL_LM" if attr == "language_model" and owner is model else None)
        wrapped = get_peft_model(getattr(owner, attr), cfg)
        wrapped.print_trainable_parameters = lambda: None
        setattr(owner, attr, wrapped)
    else:
        for p in getattr(owner, attr).parameters():
            p.requires_grad_(True)
    vision = ["vision_model", "mlp1"] if model_family(model) == INTERNVL else ["model.model.visual"]
    for name in (vision if args.train_vision else []) + (["text_hidden_fcs"] if mask_loss else []) + (
            ["text_hidden_fcs"] + mask_decoder_modules(model) if args.train_mask_decoder else []):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    fp32_master_weights(model)
    return model


def save_sa2va(model, tokenizer, out_dir: str, dtype: torch.dtype | None = None) -> None:
    """Save a trained Sa2VA model in its input checkpoint's layout (models/layout.py: the same weight names and
    shards, the input's dtype unless ``dtype``, the remote code, configs, tokenizer and generation config copied).
    A LoRA adapter is saved to ``out_dir/lora_adapter`` and merged into the LLM first; the model is left merged."""
    owner, attr = _llm_slot(model)
    lm = getattr(owner, attr)
    if hasattr(lm, "merge_and_unload"):
        lm.save_pretrained(os.path.join(out_dir, "lora_adapter"))
        setattr(owner, attr, lm.merge_and_unload())
    layout = getattr(model, "sa2va_rl_layout", None)
    if layout is None:
        raise ValueError("save_sa2va needs a model loaded with load_sa2va (its checkpoint layout is unknown)")
    layout.save(model.state_dict(), out_dir, dtype)
    logger.info("model saved to %s in the layout of %s (%s)", out_dir, layout.src,
                "input dtypes" if dtype is None else dtype)


def make_policy(model, tokenizer, path: str, max_tiles: int | None = None, trust_remote_code: bool = False):
    """The Policy for the model's family: Sa2VAPolicy (InternVL layout: tiles, ``<IMG_CONTEXT>``, region prompts)
    or Sa2VAQwenPolicy (Qwen-VL layout: the checkpoint's processor, ``<|image_pad|>``)."""
    if model_family(model) == QWEN_VL:
        from transformers import AutoProcessor

        from sa2va_rl.models.sa2va_qwen import Sa2VAQwenPolicy

        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        return Sa2VAQwenPolicy(model, processor)
    return Sa2VAPolicy(model, tokenizer, max_tiles=max_tiles)


def lm_parts(model):
    """(causal LM, backbone, lm_head) of the model's LLM, looking through a peft wrapper."""
    base = _unwrap(llm_of(model))
    return base, base.model, base.get_output_embeddings()


class Sa2VAPolicy(GroundedPolicy):
    def __init__(self, model, tokenizer, max_tiles: int | None = None) -> None:
        cfg = model.config
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vocab_limit = len(tokenizer)
        self.context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.seg_id = tokenizer.convert_tokens_to_ids(SEG)
        structure = [tokenizer.convert_tokens_to_ids(t) for t in (IMG_CONTEXT, IMG_START, IMG_END, VP_START, VP_END)]
        self.banned = BannedTokens(self.vocab_limit, [i for i in structure
                                                      if i is not None and i != tokenizer.unk_token_id])
        self.template = getattr(cfg, "template", "qwen_chat")
        _instruction, stops = template(self.template)
        self.stops = StopWords(tokenizer, stops)
        self.stop_strings = self.stops.strings
        self.tile = int(cfg.force_image_size)
        self.max_tiles = max_tiles or int(getattr(cfg, "max_dynamic_patch", 12))
        self.thumbnail = bool(getattr(cfg, "use_thumbnail", True))
        self.num_image_token = int(model.num_image_token)

    # ------------------------------------------------------------------ inputs
    def encode(self, image: np.ndarray, question: str, regions: list[np.ndarray] | None, key: str
               ) -> tuple[str, VisualInputs]:
        """The prompt text and the visual inputs of one sample. ``regions``: bool [H, W] masks or None."""
        return encode_sample(image, question, regions, key, tile=self.tile, max_tiles=self.max_tiles,
                             thumbnail=self.thumbnail, num_image_token=self.num_image_token,
                             template_name=self.template)

    def embed(self, model, ids: torch.Tensor, contexts: list[VisualInputs]) -> torch.Tensor:
        """[B, L] ids -> [B, L, C] embeddings with every row's visual features spliced in."""
        embeds = model.language_model.get_input_embeddings()(ids)
        frozen = not any(p.requires_grad for p in model.vision_model.parameters()) and \
            not any(p.requires_grad for p in model.mlp1.parameters())
        vdtype = next(model.vision_model.parameters()).dtype
        cache: dict[int, torch.Tensor] = {}  # the G rows of a group share one VisualInputs
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            for ctx in contexts:
                if id(ctx) not in cache:
                    cache[id(ctx)] = visual_features(model, ctx, vdtype, ids.device)
        return splice_features(embeds, ids, self.context_id, [cache[id(c)] for c in contexts])

    # ------------------------------------------------------------------ sampling
    def generate(self, model, prompt_ids, generation_config, logits_guard: LogitsGuard | None,
                 contexts=None) -> Generation:
        contexts = self._require(contexts, len(prompt_ids))
        device = next(model.parameters()).device
        lm, _backbone, _head = lm_parts(model)

        def run(groups, gc, processors, extra):
            ids, mask, n = grouped_prompts(groups, self.pad_token_id, device)  # [G, P]: one row per group
            embeds = self.embed(model, ids, [g[1] for g in groups])  # each group's visual features once
            ids, mask, embeds = (t.repeat_interleave(n, dim=0) for t in (ids, mask, embeds))
            return lm.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gc,
                               logits_processor=processors, **extra), ids

        return generate_groups(prompt_ids, contexts, generation_config, logits_guard, self.banned, self.stops, run)

    def _cut_stop_strings(self, row: list[int]) -> int:
        """Length of ``row`` up to and including the token that completes the first stop string."""
        return self.stops.cut(row)

    @torch.no_grad()
    def trace(self, model, prompt_ids: list[list[int]], contexts=None) -> str | None:
        """Failure path only: the first module whose output is non-finite in one prompt's forward (visual
        features first, then the LLM)."""
        from sa2va_rl.numerics.nan_trace import INPUTS, first_nonfinite_module

        contexts = self._require(contexts, 1)
        device = next(model.parameters()).device
        ids = torch.tensor(prompt_ids[:1], device=device)
        vis = contexts[0].pixel_values.to(device=device, dtype=next(model.vision_model.parameters()).dtype)
        found = first_nonfinite_module(model.vision_model, vis)
        if found == INPUTS:
            return "<pixel_values>"
        if found is not None:
            return f"vision_model.{found}".rstrip(".")
        embeds = self.embed(model, ids, contexts[:1])
        if not bool(torch.isfinite(embeds).all()):
            return "mlp1 or the token embeddings (<inputs_embeds>)"
        found = first_nonfinite_module(model.language_model, inputs_embeds=embeds, use_cache=False)
        return None if found is None else f"language_model.{found}".rstrip(".")

    # ------------------------------------------------------------------ scoring
    def _tail_hidden(self, model, ids, att, keep, contexts) -> torch.Tensor:
        """Last-layer hidden states [B, keep, C] of the last ``keep`` positions, visual features spliced in."""
        _lm, backbone, _head = lm_parts(model)
        embeds = self.embed(model, ids, contexts)
        if torch.is_grad_enabled() and not embeds.requires_grad:
            # reentrant activation checkpointing (upstream's InternLM2 calls torch.utils.checkpoint without
            # use_reentrant=False) drops the gradient of a segment whose inputs need none: peft's
            # enable_input_require_grads, done here because the embeddings are built outside the LLM
            embeds = embeds.detach().requires_grad_(True)
        return backbone(inputs_embeds=embeds, attention_mask=att, use_cache=False).last_hidden_state[:, -keep:]

    def _lm_head(self, model) -> torch.nn.Module:
        return lm_parts(model)[2]
