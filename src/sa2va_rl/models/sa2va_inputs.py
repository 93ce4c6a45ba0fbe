"""Sa2VA's input side, shared by the real checkpoint and the tiny model (SA2VA_FACTS.md sections 2-3).

* ``tile_image``: InternVL dynamic tiling (grids of 1..max_tiles tiles whose aspect is closest to the image's),
  plus a whole-image thumbnail LAST when there is more than one tile.
* ``normalize_tile``: RGB -> bicubic resize -> [0, 1] -> ImageNet mean/std.
* ``region_cells``: a region mask -> the ``grid x grid`` cells of the region tile (nearest resize, as Sa2VA's
  SFT data does); a region too small to cover any cell centre keeps the one cell it overlaps most, so a region
  prompt never has zero ``<IMG_CONTEXT>`` tokens (the original trainer's K=0 hazard).
* ``build_prompt``: ``<img>`` + ``<IMG_CONTEXT>`` x (num_image_token x tiles) + ``</img>``, then the region text
  ``There are N part regions in the picture: region1<vp>...</vp>.``, wrapped in the chat template the checkpoint
  names (no system turn, as upstream).
* ``visual_features`` / ``splice_features``: the features that replace the ``<IMG_CONTEXT>`` embeddings, in
  Sa2VA's order (every tile's, then the region tile's set cells row-major, one region after another), with a
  count check per row: a mismatch is an error, never the silent no-op of upstream's ``generate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
SEG, VP_START, VP_END = "[SEG]", "<vp>", "</vp>"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# template name (config.template, '-' read as '_') -> (instruction, stop words)
TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "qwen_chat": ("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", ("<|im_end|>", "<|endoftext|>")),
    "internlm2_chat": ("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", ("<|im_end|>",)),
    "phi3_chat": ("<|user|>\n{input}<|end|>\n<|assistant|>\n", ("<|end|>",)),
}


def template(name: str) -> tuple[str, tuple[str, ...]]:
    key = (name or "").replace("-", "_")
    if key not in TEMPLATES:
        raise ValueError(f"chat template {name!r} (config.template) is not one of {sorted(TEMPLATES)}")
    return TEMPLATES[key]


def single_token_ids(tokenizer, words) -> list[int]:
    """Ids of the ``words`` that are one token each (stop words that can be EOS ids; the rest are stop strings)."""
    ids = []
    for w in words:
        enc = tokenizer.encode(w, add_special_tokens=False)
        if len(enc) == 1:
            ids.append(enc[0])
    return ids


# ------------------------------------------------------------------------------------------------ tiles
def _grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(cols, rows) of the tiling whose aspect ratio is closest to the image's; InternVL's tie rule."""
    aspect = width / height
    grids = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1)
                    for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def tile_image(image: np.ndarray, tile: int, max_tiles: int = 12, min_tiles: int = 1,
               thumbnail: bool = True) -> list[Image.Image]:
    """uint8 [H, W, 3] -> tiles of ``tile`` px, row-major, whole-image thumbnail last when > 1 tile."""
    im = Image.fromarray(image)
    cols, rows = _grid(im.width, im.height, tile, min_tiles, max_tiles)
    resized = im.resize((tile * cols, tile * rows), Image.BICUBIC)
    tiles = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows)
             for c in range(cols)]
    if thumbnail and len(tiles) > 1:
        tiles.append(im.resize((tile, tile), Image.BICUBIC))
    return tiles


def normalize_tile(im: Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL RGB -> float32 [3, size, size] (bicubic), ImageNet mean/std."""
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def normalize_image(image: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, size, size] with ImageNet mean/std."""
    return normalize_tile(Image.fromarray(image), size)


def pixel_values_for(image: np.ndarray, tile: int, max_tiles: int = 12, thumbnail: bool = True) -> torch.Tensor:
    """uint8 [H, W, 3] -> [tiles, 3, tile, tile]."""
    return torch.stack([normalize_tile(t) for t in tile_image(image, tile, max_tiles, thumbnail=thumbnail)])


# ------------------------------------------------------------------------------------------------ regions
def region_cells(mask: np.ndarray, grid: int) -> torch.Tensor:
    """Bool [H, W] -> bool [grid, grid]: nearest resize; if that sets no cell, the cell the region covers most."""
    m = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    cells = F.interpolate(m, size=(grid, grid), mode="nearest")[0, 0] > 0.5
    if not bool(cells.any()):
        cover = F.adaptive_avg_pool2d(m, (grid, grid))[0, 0]
        cells = torch.zeros(grid, grid, dtype=torch.bool)
        cells.view(-1)[int(cover.argmax())] = True
    return cells


def build_prompt(question: str, n_tiles: int, num_image_token: int, template_name: str,
                 regions: list[int] | None = None) -> str:
    """The full prompt text: template(<img>...</img>[region text]\\n{question}). ``regions``: K per region."""
    text = IMG_START + IMG_CONTEXT * (num_image_token * n_tiles) + IMG_END
    if regions:
        parts = ", ".join(f"region{i + 1}{VP_START}{IMG_CONTEXT * k}{VP_END}" for i, k in enumerate(regions))
        text += f"\nThere are {len(regions)} part regions in the picture: {parts}.\n"
    instruction, _stops = template(template_name)
    return instruction.format(input=f"{text}\n{question}")


@dataclass(frozen=True, eq=False)
class VisualInputs:
    """What one sample adds to the LLM input besides its text: tiles and region cells.

    Shared (not copied) by the G rows of a GRPO group; ``key`` identifies the sample.
    """

    pixel_values: torch.Tensor  # [tiles, 3, S, S]
    region_masks: torch.Tensor | None  # [regions, grid, grid] bool, on the LAST tile; None: no region prompt
    image: np.ndarray | None  # uint8 [H, W, 3], for the mask decoder
    key: str  # e.g. "file:row"

    @property
    def num_slots_expected(self) -> int:
        return 0 if self.region_masks is None else int(self.region_masks.sum())


def encode_sample(image: np.ndarray, question: str, regions: list[np.ndarray] | None, key: str, *, tile: int,
                  max_tiles: int, thumbnail: bool, num_image_token: int, template_name: str
                  ) -> tuple[str, VisualInputs]:
    """One sample -> (prompt text, visual inputs). ``regions``: bool [H, W] masks, or None for no region prompt."""
    pv = pixel_values_for(image, tile, max_tiles, thumbnail)
    cells = None if not regions else torch.stack([region_cells(np.asarray(m), math.isqrt(num_image_token))
                                                  for m in regions])
    counts = None if cells is None else cells.flatten(1).sum(1).tolist()
    prompt = build_prompt(question, pv.shape[0], num_image_token, template_name, counts)
    return prompt, VisualInputs(pv, cells, image, key)


def visual_features(model, visual: VisualInputs, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The features for one sample's ``<IMG_CONTEXT>`` slots, in order: [tiles*T + region cells, C]."""
    vit = model.extract_feature(visual.pixel_values.to(device=device, dtype=dtype))  # [tiles, T, C]
    feats = [vit.reshape(-1, vit.shape[-1])]
    if visual.region_masks is not None:
        last = vit[-1]  # the region tile: the thumbnail, or the only tile
        feats.extend(last[m.reshape(-1).to(device)] for m in visual.region_masks)
    return torch.cat(feats)


def splice_features(embeds: torch.Tensor, input_ids: torch.Tensor, context_id: int,
                    row_features: list[torch.Tensor]) -> torch.Tensor:
    """Replace the ``<IMG_CONTEXT>`` embeddings of each row [B, L, C] by that row's features [n_b, C]."""
    slots = input_ids == context_id  # [B, L]
    counts = slots.sum(dim=1).tolist()  # one sync per call
    for b, (n, f) in enumerate(zip(counts, row_features, strict=True)):
        if n != f.shape[0]:
            raise ValueError(f"row {b}: {n} <IMG_CONTEXT> tokens but {f.shape[0]} visual features; the prompt "
                             "text and the image tiles / region cells disagree")
    feats = torch.cat(row_features).to(embeds.dtype)
    return embeds.masked_scatter(slots.unsqueeze(-1), feats)
