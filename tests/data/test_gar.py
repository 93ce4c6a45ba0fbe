import json
import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sa2va_rl.data.gar import BadRow, GARReader, mask_to_rle, rle_to_mask
from sa2va_rl.data.synthetic import make_gar_data, synthetic_row, write_arrow


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_rle_round_trip(h, w, seed):
    mask = np.random.default_rng(seed).random((h, w)) < 0.3
    rle = mask_to_rle(mask)
    assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
    assert np.array_equal(rle_to_mask(json.loads(json.dumps(rle))), mask)  # survives JSON too


@pytest.mark.parametrize("fmt,layout", [("stream", "release"), ("file", "parts")])
def test_reads_synthetic_set_in_both_arrow_formats(tmp_path, fmt, layout):
    make_gar_data(str(tmp_path), n=12, fmt=fmt, layout=layout, shards=2)
    folder = "Fine-Grained-Dataset" if layout == "release" else "Fine-Grained-Dataset-Part1"
    assert os.path.exists(tmp_path / folder / "data-00000-of-00002.arrow")
    reader = GARReader(str(tmp_path), bad_rows="error")
    assert len(reader) == 12 and reader.scan() == (12, 0)
    s = reader.get(5)
    assert s.image.dtype == np.uint8 and s.image.shape == (64, 64, 3)
    assert s.mask.shape == (64, 64) and s.mask.any()
    assert s.caption.startswith("a ") and s.question == "Describe the masked region in detail."
    assert s.category in ("square", "circle", "triangle")
    # the mask is exactly the drawn shape: its pixels carry the shape's colour, not the background
    assert (s.image[s.mask].std(axis=0) < 1).all()


def corrupt(kind: str) -> dict:
    row = synthetic_row(random.Random(1))
    if kind == "image":
        row["image"] = {"bytes": b"not a png", "path": None}
    elif kind == "mask_rle":
        row["mask_rle"] = {"size": [64, 64], "counts": "!!not-rle"}
    elif kind == "size":
        row["mask_rle"] = mask_to_rle(np.ones((32, 64), bool))
    elif kind == "empty":
        row["mask_rle"] = mask_to_rle(np.zeros((64, 64), bool))
    elif kind == "caption":
        row["conversations"] = [{"from": "human", "value": "<image> describe"}]
    return row


BAD = {"image": ("image", "undecodable"), "mask_rle": ("mask_rle", "undecodable RLE"),
       "size": ("mask_rle", "mask size [32, 64] != image size [64, 64]"), "empty": ("mask_rle", "empty mask"),
       "caption": ("conversations", "missing caption")}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_kind_of_bad_row_is_named_with_file_and_index(tmp_path, kind):
    rng = random.Random(0)
    rows = [synthetic_row(rng) for _ in range(3)]
    rows.insert(2, corrupt(kind))
    path = write_arrow(str(tmp_path / "Fine-Grained-Dataset" / "data-00000-of-00001.arrow"), rows)
    field, reason = BAD[kind]
    with pytest.raises(BadRow) as info:
        GARReader(str(tmp_path), bad_rows="error").scan()
    assert info.value.path == path and info.value.index == 2 and info.value.field == field
    assert reason in str(info.value) and f"{path}: row 2" in str(info.value)
    skipping = GARReader(str(tmp_path), bad_rows="skip")
    assert skipping.scan() == (3, 1)
    assert skipping.bad_counts == {(os.path.join("Fine-Grained-Dataset", "data-00000-of-00001.arrow"), field): 1}
    assert "1 row(s) with a bad" in skipping.bad_report()


def test_jsonl_with_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    arr = np.full((8, 8, 3), 120, np.uint8)
    Image.fromarray(arr).save(tmp_path / "images" / "a.png")
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    row = {"image": {"bytes": None, "path": "images/a.png"}, "mask_rle": mask_to_rle(mask), "catagory": "x",
           "conversations": [{"from": "human", "value": "<image> <Prompt0>"}, {"from": "gpt", "value": "a box"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    s = GARReader(str(tmp_path), bad_rows="error").get(0)
    assert s.caption == "a box" and s.mask.sum() == 9 and s.image.shape == (8, 8, 3)


def test_missing_dir_and_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        GARReader(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no GAR files"):
        GARReader(str(tmp_path))
    with pytest.raises(ValueError, match="bad_rows='drop'"):
        make_gar_data(str(tmp_path / "d"), n=2)
        GARReader(str(tmp_path / "d"), bad_rows="drop")
