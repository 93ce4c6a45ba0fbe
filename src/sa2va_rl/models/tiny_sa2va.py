"""A tiny Sa2VA-compatible model, built in code with random weights, for tests and the demo.

Same structure and contracts as Sa2VA (SA2VA_FACTS.md sections 1-4), scaled down:

  tiles [N, 3, S, S] -> vision tower (patch conv + one transformer layer) -> pixel shuffle (ratio 0.5)
  -> ``mlp1`` (LayerNorm, Linear, GELU, Linear) -> one feature per ``<IMG_CONTEXT>`` token
  -> Qwen2 LM, whose vocabulary holds ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``[SEG]``, ``<vp>``, ``</vp>``;
  last hidden state at each ``[SEG]`` -> ``text_hidden_fcs`` -> a small mask decoder (dot product with a
  conv feature map of the whole image) -> mask logits at image size.

``generate`` builds ``inputs_embeds`` and calls ``language_model.generate`` without ``input_ids``, so, like
Sa2VA, it returns the new tokens only: the trap that broke the original trainer is reproduced on purpose.
Unlike upstream, a mismatch between ``<IMG_CONTEXT>`` tokens and visual features is an error, not a silent
no-op. Registered with the Auto classes as model_type ``sa2va_tiny``: loading needs no trust_remote_code.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, GenerationConfig, PretrainedConfig, PreTrainedModel, Qwen2Config,
                          Qwen2ForCausalLM)

from sa2va_rl.data.vocab import WORDS
from sa2va_rl.models.grounding import decode_masks
from sa2va_rl.models.sa2va_inputs import (IMG_CONTEXT, IMG_END, IMG_START, SEG, VP_END, VP_START, VisualInputs,
                                          encode_sample, single_token_ids, splice_features, template, visual_features)
from sa2va_rl.models.tiny import tiny_qwen2_config, word_tokenizer

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
SA2VA_SPECIAL = [IMG_START, IMG_END, IMG_CONTEXT, SEG, "<p>", "</p>", VP_START, VP_END] + CHAT_TOKENS


class TinySa2VAConfig(PretrainedConfig):
    model_type = "sa2va_tiny"
    sub_configs = {"llm_config": Qwen2Config}

    def __init__(self, llm_config=None, force_image_size: int = 32, patch_size: int = 4, vision_hidden: int = 32,
                 downsample_ratio: float = 0.5, ps_version: str = "v2", template: str = "qwen_chat",
                 mask_dim: int = 16, max_dynamic_patch: int = 4, use_thumbnail: bool = True, **kwargs) -> None:
        if isinstance(llm_config, dict):
            llm_config = Qwen2Config(**llm_config)
        self.llm_config = llm_config if llm_config is not None else Qwen2Config()
        self.force_image_size = force_image_size
        self.patch_size = patch_size
        self.vision_hidden = vision_hidden
        self.downsample_ratio = downsample_ratio
        self.ps_version = ps_version
        self.template = template
        self.mask_dim = mask_dim
        self.max_dynamic_patch = max_dynamic_patch
        self.use_thumbnail = use_thumbnail
        super().__init__(**kwargs)

    @property
    def num_image_token(self) -> int:
        return int((self.force_image_size // self.patch_size) ** 2 * self.downsample_ratio ** 2)


def pixel_shuffle(x: torch.Tensor, scale: float, ps_version: str = "v2") -> torch.Tensor:
    """InternVL's pixel shuffle: [N, w, h, C] -> [N, w*s, h*s, C/s^2]."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x if ps_version == "v1" else x.permute(0, 2, 1, 3).contiguous()


class TinyVision(nn.Module):
    def __init__(self, image_size: int, patch: int, hidden: int) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, hidden, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, hidden) * 0.02)
        self.layer = nn.TransformerEncoderLayer(hidden, nhead=4, dim_feedforward=2 * hidden, batch_first=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [N, 3, S, S] -> [N, P, Cv]
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        return self.layer(x + self.pos)


class TinyMaskDecoder(nn.Module):
    """Stands in for Sa2VA's SAM2 wrapper, with the calls sa2va-rl makes of it (models/grounding.py):
    ``sam2_model.forward_image(pixels [1, 3, S, S]) -> features``, ``get_sam2_embeddings(pixels) -> state`` (a
    dict, as SAM2's init_state) and ``language_embd_inference(state, [emb [n, D]] * F) -> mask logits
    [F, n, S, S]`` (and ``inject_language_embd``, its training twin), reading the image features from the state's
    cache as SAM2 does."""

    def __init__(self, dim: int, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size  # the decoder's input size (1024 for SAM2)
        self.features = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1))

    @property
    def sam2_model(self) -> "TinyMaskDecoder":  # upstream: the SAM2 video predictor inside the wrapper
        return self

    def forward_image(self, pixels: torch.Tensor) -> dict:
        return {"features": self.features(pixels)}  # [F, D, S, S]

    def get_sam2_embeddings(self, pixels: torch.Tensor) -> dict:
        return {"images": pixels, "device": pixels.device, "storage_device": pixels.device, "cached_features": {}}

    def inject_language_embd(self, state: dict, language_embd: list[torch.Tensor]) -> torch.Tensor:
        """Upstream's training call (no memory propagation); here the same computation as the inference one."""
        return self.language_embd_inference(state, language_embd)

    def language_embd_inference(self, state: dict, language_embd: list[torch.Tensor]) -> torch.Tensor:
        cached = state["cached_features"].get(0)
        feats = cached[1]["features"] if cached is not None else self.forward_image(state["images"])["features"]
        emb = torch.stack(list(language_embd)).to(feats.dtype)  # [F, n, D]
        return torch.einsum("fnd,fdhw->fnhw", emb, feats) / math.sqrt(feats.shape[1])


class TinySa2VAModel(PreTrainedModel):
    config_class = TinySa2VAConfig
    base_model_prefix = "sa2va"
    main_input_name = "input_ids"
    _no_split_modules = []
    supports_gradient_checkpointing = True  # the Qwen2 layers inside checkpoint themselves

    def __init__(self, config: TinySa2VAConfig) -> None:
        super().__init__(config)
        c_v, c = config.vision_hidden, config.llm_config.hidden_size
        ratio_in = int(c_v / config.downsample_ratio ** 2)
        self.vision_model = TinyVision(config.force_image_size, config.patch_size, c_v)
        self.mlp1 = nn.Sequential(nn.LayerNorm(ratio_in), nn.Linear(ratio_in, c), nn.GELU(), nn.Linear(c, c))
        self.language_model = Qwen2ForCausalLM(config.llm_config)
        self.text_hidden_fcs = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, config.mask_dim))
        self.grounding_encoder = TinyMaskDecoder(config.mask_dim, config.force_image_size)
        self.img_context_token_id: int | None = None
        self.seg_token_idx: int | None = None
        self.post_init()

    @property
    def num_image_token(self) -> int:
        return self.config.num_image_token

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def preparing_for_generation(self, tokenizer) -> None:
        """As upstream: the special ids come from the tokenizer by string."""
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.seg_token_idx = tokenizer.convert_tokens_to_ids(SEG)

    # ---------------------------------------------------------------- features
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, num_image_token, C]."""
        x = self.vision_model(pixel_values)
        n, p, cv = x.shape
        side = int(math.isqrt(p))
        x = pixel_shuffle(x.view(n, side, side, cv), self.config.downsample_ratio, self.config.ps_version)
        return self.mlp1(x.reshape(n, -1, x.shape[-1]))

    def build_inputs_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                            prompt_masks: list[torch.Tensor] | None = None,
                            vp_overall_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Upstream's calling convention (one sample): the ``<IMG_CONTEXT>`` embeddings of every row of
        ``input_ids`` are replaced by every tile's features, then the region cells of the flagged tile."""
        if self.img_context_token_id is None:
            raise RuntimeError("call preparing_for_generation(tokenizer) first: the <IMG_CONTEXT> id is unknown")
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        if prompt_masks is not None and vp_overall_mask is not None:
            flagged = vp_overall_mask.bool().nonzero().flatten().tolist()
            if flagged != [pixel_values.shape[0] - 1]:
                raise ValueError(f"vp_overall_mask flags tiles {flagged}; Sa2VA puts region prompts on the last "
                                 f"tile ({pixel_values.shape[0] - 1})")
        regions = torch.cat(list(prompt_masks)).bool() if prompt_masks else None
        visual = VisualInputs(pixel_values, regions, image=None, key="")
        feats = visual_features(self, visual, embeds.dtype, embeds.device)
        return splice_features(embeds, input_ids, self.img_context_token_id, [feats] * input_ids.shape[0])

    # ---------------------------------------------------------------- LM calls
    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, prompt_masks=None,
                vp_overall_mask=None, **kwargs):
        embeds = self.build_inputs_embeds(input_ids, pixel_values, prompt_masks, vp_overall_mask)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, generation_config=None,
                 prompt_masks=None, vp_overall_mask=None, **kwargs):
        embeds = self.build_inputs_embeds(input_ids, pixel_values, prompt_masks, vp_overall_mask)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask,
                                            generation_config=generation_config, **kwargs)

    @torch.no_grad()
    def predict_forward(self, image=None, text: str = "", tokenizer=None, mask_prompts=None, **kwargs) -> dict:
        """Upstream's inference entry point: ``{"prediction": text, "prediction_masks": [bool [1, H, W], ...]}``,
        one mask per ``[SEG]``. Greedy decoding; ``mask_prompts``: bool [n, H, W] regions (optional)."""
        if tokenizer is None:
            raise ValueError("predict_forward needs the tokenizer")
        self.preparing_for_generation(tokenizer)
        image = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
        cfg = self.config
        prompt, visual = encode_sample(image, text.replace("<image>", "").strip(), mask_prompts, key="predict",
                                       tile=cfg.force_image_size, max_tiles=cfg.max_dynamic_patch,
                                       thumbnail=cfg.use_thumbnail, num_image_token=cfg.num_image_token,
                                       template_name=cfg.template)
        ids = torch.tensor([tokenizer(prompt).input_ids], device=self.device)
        feats = visual_features(self, visual, self.dtype, self.device)  # once: for the prompt and the re-read
        embeds = splice_features(self.get_input_embeddings()(ids), ids, self.img_context_token_id, [feats])
        _instruction, stops = template(cfg.template)
        eos = single_token_ids(tokenizer, stops)
        gc = GenerationConfig(do_sample=False, max_new_tokens=kwargs.get("max_new_tokens", 64), eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id)
        new = self.language_model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids),
                                           generation_config=gc)[0]
        full = torch.cat([ids[0], new])
        seg_pos = (full == self.seg_token_idx).nonzero().flatten()
        seg_pos = seg_pos[seg_pos >= ids.shape[1]]
        masks = []
        if len(seg_pos):
            embeds_full = splice_features(self.get_input_embeddings()(full[None]), full[None],
                                          self.img_context_token_id, [feats])
            hidden = self.language_model.model(inputs_embeds=embeds_full).last_hidden_state[0, seg_pos]
            masks = [m[None].cpu().numpy() for m in decode_masks(self, hidden, image)]
        return {"prediction": tokenizer.decode(new, skip_special_tokens=False), "prediction_masks": masks}


AutoConfig.register(TinySa2VAConfig.model_type, TinySa2VAConfig)
AutoModel.register(TinySa2VAConfig, TinySa2VAModel)


def make_tiny_sa2va(out_dir: str, seed: int = 0, image_size: int = 32) -> str:
    """Write the tiny Sa2VA model, its tokenizer and generation config to ``out_dir``; return the path.

    The LM's vocabulary is padded past ``len(tokenizer)`` (to a multiple of 64), like Sa2VA-4B's 151936-row
    head over a 151679-token tokenizer, so the padded-row mask is exercised.
    """
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(WORDS + ["user", "assistant", "There", "are", "part", "regions", "picture",
                                        "region1", "Please", "segment", "Describe", "Sure"],
                               extra_special=SA2VA_SPECIAL)
    tokenizer.eos_token = "<|im_end|>"  # the chat turn's end, as Qwen instruct tokenizers declare it
    llm = tiny_qwen2_config(-(-len(tokenizer) // 64) * 64)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    llm.eos_token_id = eos
    config = TinySa2VAConfig(llm_config=llm, force_image_size=image_size)
    model = TinySa2VAModel(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    # a non-generative PreTrainedModel does not save one itself; Sa2VA checkpoints ship generation_config.json
    GenerationConfig(eos_token_id=eos, pad_token_id=0, do_sample=True, max_new_tokens=16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
