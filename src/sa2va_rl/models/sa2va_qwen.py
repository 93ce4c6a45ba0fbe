"""Sa2VAQwenPolicy: a Qwen-VL-family Sa2VA checkpoint (Sa2VA-Qwen2_5-VL-3B/7B, Sa2VA-Qwen3-VL-4B) as a GRPO policy.

The released ``Sa2VAChatModelQwen`` wraps transformers' ``Qwen2_5_VLForConditionalGeneration`` /
``Qwen3VLForConditionalGeneration`` as ``model`` and adds ``text_hidden_fcs`` and SAM2 (``grounding_encoder``).
The policy has Sa2VAPolicy's interface and differs only where the family does:

* ``encode``: the inputs upstream's ``predict_forward`` builds for one image: the chat template's image part
  (``<|vision_start|><|image_pad|><|vision_end|>``) before the text, ``qwen_vl_utils.process_vision_info``, then
  the processor with the model's ``min_pixels`` / ``max_pixels`` (512*28*28 / 2048*28*28 upstream, which
  upsizes small images). The prompt text has ``<|image_pad|>`` expanded as the processor expands it, so the
  tokenizer alone (as TRL tokenizes prompts) gives exactly the processor's ids; that is checked per sample.
  Region prompts (mask2caption): upstream has none for this family; see ``region_text`` and docs/upstream.md
  "Region prompts on Qwen-VL".
* ``generate``: from ``input_ids`` + ``pixel_values`` + ``image_grid_thw`` (+ ``mm_token_type_ids``), so the model
  computes its M-RoPE positions itself (3-D for the image tokens); generate() echoes the prompt and
  ``new_tokens`` keeps only the new tokens. Image/vision tokens and the padded vocabulary rows are banned.
* ``logprobs``: one forward of the Qwen-VL backbone over [prompt, completion, right padding] with the images of
  the rows, the LM head in fp32 outside autocast, the same ids banned as in sampling.
* ``segment``: last-layer hidden state at the first ``[SEG]`` (one forward for all rows with ``[SEG]``,
  models/sampling.py) -> ``text_hidden_fcs`` -> SAM2 (models/grounding.py, one encoding per image) -> bool mask at
  image size, as upstream's ``predict_forward``.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sa2va_rl.models.policy import Generation
from sa2va_rl.models.sa2va_inputs import SEG, TEMPLATES, template
from sa2va_rl.models.sampling import (BannedTokens, GroundedPolicy, StopWords, generate_groups, grouped_prompts,
                                      token_ids)
from sa2va_rl.numerics import LogitsGuard

logger = logging.getLogger(__name__)

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
# structure tokens of the Qwen-VL vocabulary: a sampled one would claim visual features that do not exist
VISION_TOKENS = (IMAGE_PAD, VIDEO_PAD, "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
# upstream's Sa2VAChatModelQwen.__init__ (read from the model when it has them)
MIN_PIXELS, MAX_PIXELS = 512 * 28 * 28, 2048 * 28 * 28
QWEN2_5_VL, QWEN3_VL = "qwen2_5_vl", "qwen3vl"


@dataclass(frozen=True, eq=False)
class QwenVisualInputs:
    """What one sample adds to the LLM input besides its text. Shared (not copied) by the G rows of a group."""

    pixel_values: torch.Tensor  # [patches, C * temporal_patch * patch * patch], as the processor returns them
    image_grid_thw: torch.Tensor  # [1, 3] (t, h, w) in patches
    image: np.ndarray  # uint8 [H, W, 3], for the grounding encoder
    key: str  # e.g. "file:row"


def qwen_parts(model):
    """(Qwen-VL ForConditionalGeneration, its Qwen-VL backbone, lm_head) of a Sa2VAChatModelQwen, looking
    through a peft wrapper on ``model.model``."""
    inner = model.model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return base, base.model, base.lm_head


def qwen_family(model) -> str:
    """``qwen3vl`` or ``qwen2_5_vl``, from the config's base class (upstream's config subclasses transformers')."""
    names = {c.__name__ for c in type(model.config).__mro__}
    return QWEN3_VL if "Qwen3VLConfig" in names else QWEN2_5_VL


def region_box(mask: np.ndarray, size: tuple[int, int], relative: bool) -> list[int]:
    """Bool [H, W] -> [x1, y1, x2, y2] of the region's bounding box (pixel edges: x2, y2 exclusive).

    ``relative``: integers 0-1000 of the image's width/height (Qwen3-VL's convention); else absolute pixels of
    the image as the model sees it, ``size`` = (height, width) after the processor's resize (Qwen2.5-VL's).
    """
    m = np.asarray(mask).astype(bool)
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty region mask")
    H, W = m.shape
    h, w = (1000, 1000) if relative else size
    sx, sy = w / W, h / H
    box = [round(cols[0] * sx), round(rows[0] * sy), round((cols[-1] + 1) * sx), round((rows[-1] + 1) * sy)]
    return [min(max(v, 0), lim) for v, lim in zip(box, (w, h, w, h))]


def region_text(boxes: list[list[int]]) -> str:
    """The region prompt put before the question: InternVL-family Sa2VA's wording, a box in place of ``<vp>``."""
    parts = ", ".join(f"region{i + 1} [{', '.join(map(str, b))}]" for i, b in enumerate(boxes))
    return f"There are {len(boxes)} part regions in the picture: {parts}.\n"


class Sa2VAQwenPolicy(GroundedPolicy):
    """``Sa2VAQwenPolicy(model, processor)``: the model from ``load_upstream`` (a ``Sa2VAChatModelQwen``), the
    checkpoint's processor (``AutoProcessor.from_pretrained(path, trust_remote_code=True)``). TRL's
    ``processing_class`` is ``policy.tokenizer`` (the processor's tokenizer): prompts are text."""

    def __init__(self, model, processor, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        self.processor = processor
        self.tokenizer = tokenizer = processor.tokenizer
        self.family = qwen_family(model)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vocab_limit = len(tokenizer)
        self.seg_id = tokenizer.convert_tokens_to_ids(SEG)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        self.banned = BannedTokens(self.vocab_limit, token_ids(tokenizer, VISION_TOKENS))
        name = (getattr(model.config, "template", None) or "qwen_chat").replace("-", "_")
        _instruction, stops = template(name if name in TEMPLATES else "qwen_chat")
        self.stops = StopWords(tokenizer, stops)
        self.stop_strings = self.stops.strings
        self.min_pixels = int(min_pixels or getattr(model, "min_pixels", MIN_PIXELS))
        self.max_pixels = int(max_pixels or getattr(model, "max_pixels", MAX_PIXELS))
        vl = qwen_parts(model)[1]
        self._mm_types = "mm_token_type_ids" in inspect.signature(vl.forward).parameters

    # ------------------------------------------------------------------ inputs
    def _size(self) -> dict:
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    def encode(self, image: np.ndarray, question: str, regions: list[np.ndarray] | None, key: str
               ) -> tuple[str, QwenVisualInputs]:
        """The prompt text (``<|image_pad|>`` expanded) and the visual inputs of one sample, as upstream's
        ``predict_forward`` builds them. ``regions``: bool [H, W] masks (a box each, in the question) or None."""
        from qwen_vl_utils import process_vision_info

        pil = Image.fromarray(np.asarray(image)).convert("RGB")

        def messages(text: str) -> list[dict]:
            return [{"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": text}]}]

        image_inputs, video_inputs = process_vision_info(messages(question))
        text = question
        if regions:
            grid = self.processor.image_processor(images=image_inputs, size=self._size())["image_grid_thw"][0]
            patch = int(self.processor.image_processor.patch_size)
            seen = (int(grid[1]) * patch, int(grid[2]) * patch)
            try:
                boxes = [region_box(m, seen, relative=self.family == QWEN3_VL) for m in regions]
            except ValueError as e:
                raise ValueError(f"{key}: {e}; mask2caption needs a non-empty region") from None
            text = region_text(boxes) + question
        chat = self.processor.apply_chat_template(messages(text), tokenize=False, add_generation_prompt=True)
        if chat.count(IMAGE_PAD) != 1:
            raise ValueError(f"{key}: the chat template gave {chat.count(IMAGE_PAD)} {IMAGE_PAD} for one image")
        mm = self.processor(text=[chat], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt",
                            size=self._size())
        grid = mm["image_grid_thw"]
        merge = int(getattr(self.processor.image_processor, "merge_size", 2))
        n = int(grid[0].prod()) // merge ** 2
        prompt = chat.replace(IMAGE_PAD, IMAGE_PAD * n)
        ids = self.tokenizer(text=prompt)["input_ids"]
        if ids != mm["input_ids"][0].tolist():
            raise ValueError(f"{key}: the tokenizer does not give the processor's ids for this prompt ({len(ids)} vs "
                             f"{mm['input_ids'].shape[1]} tokens); TRL tokenizes prompts with the tokenizer alone")
        return prompt, QwenVisualInputs(mm["pixel_values"], grid, np.asarray(image), key)

    def model_inputs(self, ids: torch.Tensor, contexts: list[QwenVisualInputs]) -> dict:
        """[B, L] ids of rows with one image each -> the Qwen-VL forward/generate inputs besides the mask: the
        rows' pixel values and grids in row order, and (where the model takes them) the modality types from
        which it computes M-RoPE positions."""
        out = {"input_ids": ids,
               "pixel_values": torch.cat([c.pixel_values for c in contexts]).to(ids.device),
               "image_grid_thw": torch.cat([c.image_grid_thw for c in contexts]).to(ids.device)}
        if self._mm_types:
            out["mm_token_type_ids"] = (ids == self.image_id).long() + 2 * (ids == self.video_id).long()
        return out

    # ------------------------------------------------------------------ sampling
    def generate(self, model, prompt_ids, generation_config, logits_guard: LogitsGuard | None,
                 contexts=None) -> Generation:
        contexts = self._require(contexts, len(prompt_ids))
        device = next(model.parameters()).device
        lm = qwen_parts(model)[0]

        def run(groups, gc, processors, extra):
            ids, mask, n = grouped_prompts(groups, self.pad_token_id, device)
            ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)  # [N, P], left-padded
            rows = [g[1] for g in groups for _ in range(g[2])]
            out = lm.generate(**self.model_inputs(ids, rows), attention_mask=mask, generation_config=gc,
                              logits_processor=processors, **extra)
            return out, ids

        return generate_groups(prompt_ids, contexts, generation_config, logits_guard, self.banned, self.stops, run)

    def _cut_stop_strings(self, row: list[int]) -> int:
        return self.stops.cut(row)

    @torch.no_grad()
    def trace(self, model, prompt_ids: list[list[int]], contexts=None) -> str | None:
        """Failure path only: the first module (of the Sa2VA model) whose output is non-finite in one prompt's
        forward; the vision tower runs first, so a fault there is named there."""
        from sa2va_rl.numerics.nan_trace import INPUTS, first_nonfinite_module

        contexts = self._require(contexts, 1)
        device = next(model.parameters()).device
        lm = qwen_parts(model)[0]
        ids = torch.tensor(prompt_ids[:1], device=device)
        found = first_nonfinite_module(lm, **self.model_inputs(ids, contexts[:1]), attention_mask=torch.ones_like(ids),
                                       use_cache=False)
        if found == INPUTS:
            return "<pixel_values>"
        return None if found is None else f"model.{found}".rstrip(".")

    # ------------------------------------------------------------------ scoring
    def _hidden(self, model, ids, att, contexts) -> torch.Tensor:
        """Last-layer hidden states [B, L, C] of the rows, images in place, M-RoPE positions from the model."""
        vl = qwen_parts(model)[1]
        return vl(**self.model_inputs(ids, contexts), attention_mask=att, use_cache=False).last_hidden_state

    def _tail_hidden(self, model, ids, att, keep, contexts) -> torch.Tensor:
        return self._hidden(model, ids, att, contexts)[:, -keep:]

    def _lm_head(self, model) -> torch.nn.Module:
        return qwen_parts(model)[2]
