"""``[SEG]`` -> mask through Sa2VA's grounding encoder (SAM2), on the model's device, one image encoding per image.

Upstream's SAM2 wrapper (``sam2.py``, the same file in every released family) has two calls:
``get_sam2_embeddings(pixels)`` (SAM2's ``init_state``: a dict, no compute) and
``language_embd_inference(state, [emb] * frames)``, which encodes the image on first use. Both hard-code CUDA
(``init_state`` sets ``device=cuda``; the encode calls ``.cuda()``). Here the image is encoded once with
``sam2_model.forward_image`` on the encoder's own device, and every ``[SEG]`` gets a fresh state whose devices
and feature cache are already filled, so upstream's CUDA-only branch never runs and a second ``[SEG]`` on the
same image costs only the mask decoder (upstream's ``predict_forward`` encodes the image again per ``[SEG]``).
The tiny model's decoder offers the same calls, so one code path serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sa2va_rl.models.sa2va_inputs import normalize_image


@dataclass
class GroundingImage:
    """One image as the grounding encoder sees it, encoded once."""

    pixels: torch.Tensor  # [1, 3, S, S], ImageNet-normalised, on the encoder's device and dtype
    backbone: Any  # sam2_model.forward_image(pixels)
    height: int
    width: int


def encode_image(model, image: np.ndarray) -> GroundingImage:
    """uint8 [H, W, 3] -> the grounding encoder's features of the whole image resized to its input size (1024 for
    SAM2; aspect not kept, as upstream's DirectResize)."""
    enc = model.grounding_encoder
    size = int(getattr(getattr(enc, "sam2_model", enc), "image_size", getattr(enc, "image_size", 1024)))
    param = next(enc.parameters())
    pixels = normalize_image(image, size)[None].to(device=param.device, dtype=param.dtype)
    return GroundingImage(pixels, enc.sam2_model.forward_image(pixels), int(image.shape[0]), int(image.shape[1]))


class ImageCache:
    """The grounding encoder's features of each distinct image, encoded once (keyed by the image array's identity:
    the G rows of a group share one array). ``encodes`` counts the encoder runs. One per step: the rewards'
    ``[SEG]`` masks, the cycle reward's re-segmentation and the mask loss all read the same features (SAM2's encoder
    is frozen, so features computed without grad serve the loss too)."""

    def __init__(self) -> None:
        self._features: dict[int, tuple[np.ndarray, GroundingImage]] = {}
        self.encodes = 0

    def get(self, model, image: np.ndarray) -> GroundingImage:
        hit = self._features.get(id(image))
        if hit is None or hit[0] is not image:  # the array itself is kept, so its id cannot be reused meanwhile
            with torch.no_grad():
                hit = (image, encode_image(model, image))
            self._features[id(image)] = hit
            self.encodes += 1
        return hit[1]

    def __len__(self) -> int:
        return len(self._features)


def _state(enc, img: GroundingImage) -> dict:
    """A fresh single-frame inference state with the devices and the encoded features already set."""
    state = enc.get_sam2_embeddings(img.pixels)
    state["device"] = state["storage_device"] = img.pixels.device
    state["cached_features"] = {0: (img.pixels, img.backbone)}
    return state


def mask_logits(model, seg_hidden: torch.Tensor, img: GroundingImage, grad: bool = False) -> torch.Tensor:
    """Last-layer hidden states at ``[SEG]`` [n, C] -> mask logits [n, h', w'] at the decoder's resolution:
    ``text_hidden_fcs``, then one object per fresh state, as upstream.

    ``grad``: the training path, upstream's ``inject_language_embd`` (SAM2's decoder on the language prompt, the
    low-resolution logits, no memory propagation; what Sa2VA's own training calls), differentiable with respect to
    the hidden states, ``text_hidden_fcs`` and the decoder. Otherwise the inference path,
    ``language_embd_inference`` (upstream runs it under ``inference_mode``), as ``predict_forward`` does."""
    enc = model.grounding_encoder
    emb = model.text_hidden_fcs(seg_hidden)  # [n, D]
    if grad:
        return torch.cat([enc.inject_language_embd(_state(enc, img), [e[None]])[0, :1] for e in emb])
    return torch.cat([enc.language_embd_inference(_state(enc, img), [e[None]])[0, :1] for e in emb])


def decode_masks(model, seg_hidden: torch.Tensor, image: np.ndarray | GroundingImage) -> torch.Tensor:
    """Hidden states at ``[SEG]`` [n, C] -> bool masks [n, H, W] at the image's size, as Sa2VA's predict_forward:
    mask logits -> bilinear to (H, W) -> sigmoid > 0.5."""
    img = image if isinstance(image, GroundingImage) else None
    h, w = (img.height, img.width) if img is not None else image.shape[:2]
    if seg_hidden.shape[0] == 0:
        return torch.zeros(0, h, w, dtype=torch.bool)
    img = img or encode_image(model, image)
    logits = mask_logits(model, seg_hidden, img)[:, None].float()  # [n, 1, h', w']
    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return (logits[:, 0].sigmoid() > 0.5).cpu()
