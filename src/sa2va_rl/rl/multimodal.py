"""A plain VLM's inputs for one chunk of scoring rows, sliced as TRL 1.16 slices them.

TRL's ``_get_per_token_logps_and_entropies`` takes the whole batch's ``pixel_values``, ``image_grid_thw``,
``num_images`` & co. and, for the rows ``start:end`` of each chunk, cuts the images (and their patches or tiles) of
those rows. ``multimodal_rows`` does the same cut and returns the model's keyword arguments for the chunk, so that the
Policy (models/policy.py ``CausalLMPolicy``) sees exactly what TRL's own forward would see. The per-token fields
(``token_type_ids``, ``mm_token_type_ids``) stay in TRL's [B, P + K] layout: the Policy shifts them with the tokens.
"""

from __future__ import annotations

import torch

# what TRL passes besides the tokens, and only uses to slice (never a model input itself)
SLICING_ONLY = ("num_images", "num_tiles")


def multimodal_rows(mm: dict, start: int, end: int, n_rows: int) -> dict:
    """The model inputs of rows ``start:end`` of a batch of ``n_rows`` (TRL 1.16's slicing; ``{}`` when none)."""
    mm = {k: v for k, v in mm.items() if v is not None}
    if not mm:
        return {}
    pixel_values, image_grid_thw = mm.get("pixel_values"), mm.get("image_grid_thw")
    num_images, num_tiles = mm.get("num_images"), mm.get("num_tiles")
    pixel_attention_mask, spatial_shapes = mm.get("pixel_attention_mask"), mm.get("spatial_shapes")
    image_position_ids = mm.get("image_position_ids")
    unknown = sorted(set(mm) - {"pixel_values", "image_grid_thw", "num_images", "num_tiles", "pixel_attention_mask",
                                "spatial_shapes", "image_position_ids", "image_sizes", "token_type_ids",
                                "mm_token_type_ids"})
    if unknown:
        raise ValueError(f"multimodal inputs {unknown}: not among the ones TRL 1.16 slices per row; refusing to pass "
                         "them to a chunk of rows they may not belong to")
    if start == 0 and end == n_rows:  # one chunk: everything, as TRL's slices would give
        return {k: v for k, v in mm.items() if k not in SLICING_ONLY}
    out: dict = {}
    if num_images is not None:
        cum_imgs = torch.tensor([0] + list(num_images)).cumsum(0)
        img_start, img_end = int(cum_imgs[start]), int(cum_imgs[end])
    if image_grid_thw is not None and pixel_values is not None:
        rows_per_image = image_grid_thw.prod(dim=-1)
        per_sample = torch.stack([s.sum() for s in torch.split(rows_per_image, list(num_images))])
        cum_rows = torch.cat([per_sample.new_zeros(1), per_sample.cumsum(0)])
        out["pixel_values"] = pixel_values[int(cum_rows[start]):int(cum_rows[end])]
        out["image_grid_thw"] = image_grid_thw[img_start:img_end]
    elif image_position_ids is not None and pixel_values is not None:
        out["pixel_values"] = pixel_values[img_start:img_end]
        out["image_position_ids"] = image_position_ids[img_start:img_end]
    elif spatial_shapes is not None and pixel_values is not None:  # LFM2-VL: tile-indexed
        cum_tiles = torch.tensor([0] + list(num_tiles)).cumsum(0)
        t0, t1 = int(cum_tiles[start]), int(cum_tiles[end])
        out["pixel_values"] = pixel_values[t0:t1]
        out["pixel_attention_mask"] = pixel_attention_mask[t0:t1]
        out["spatial_shapes"] = spatial_shapes[t0:t1]
    elif num_tiles is not None and pixel_values is not None:  # InternVL: tile-indexed
        cum_tiles = torch.tensor([0] + list(num_tiles)).cumsum(0)
        out["pixel_values"] = pixel_values[int(cum_tiles[start]):int(cum_tiles[end])]
    elif pixel_values is not None and num_images is not None and pixel_values.size(0) == sum(num_images):
        out["pixel_values"] = pixel_values[img_start:img_end]
    elif pixel_values is not None:
        out["pixel_values"] = pixel_values[start:end]
    if pixel_attention_mask is not None and spatial_shapes is None:
        out["pixel_attention_mask"] = pixel_attention_mask[start:end]
    if mm.get("image_sizes") is not None:
        out["image_sizes"] = mm["image_sizes"][img_start:img_end]
    for k in ("token_type_ids", "mm_token_type_ids"):
        if mm.get(k) is not None:
            out[k] = mm[k][start:end]
    return out
