"""A synthetic GAR-format dataset: images with drawn shapes, their RLE masks, captions that say what and where.

The captions describe colour, shape and position of the masked shape, so a caption reward can rise when
training works, and the mask is exactly the drawn pixels, so an IoU reward is exact.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from sa2va_rl.data.gar import mask_to_rle

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 190), "orange": (240, 140, 30)}
SHAPES = ["square", "circle", "triangle"]
QUESTION = "<image>\nDescribe the masked region <Prompt0> in detail."

SCHEMA = pa.schema([
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("mask_rle", pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.string())])),
    ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
    ("catagory", pa.string()),  # sic, as in the release
])


def _place(cx: float, cy: float) -> str:
    horiz = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    vert = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    return "center" if (horiz, vert) == ("center", "middle") else f"{vert} {horiz}" if vert != "middle" else horiz


def synthetic_row(rng: random.Random, size: int = 64) -> dict:
    bg = tuple(rng.randint(90, 160) for _ in range(3))  # never all-zero: Sa2VA drops all-zero tiles
    img = Image.new("RGB", (size, size), bg)
    mask_img = Image.new("L", (size, size), 0)
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    r = rng.randint(size // 8, size // 4)
    cx, cy = rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)
    box = [cx - r, cy - r, cx + r, cy + r]
    for canvas, fill in ((ImageDraw.Draw(img), COLORS[color]), (ImageDraw.Draw(mask_img), 255)):
        if shape == "square":
            canvas.rectangle(box, fill=fill)
        elif shape == "circle":
            canvas.ellipse(box, fill=fill)
        else:
            canvas.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    # a distractor shape elsewhere, outside the mask
    d = rng.choice([c for c in COLORS if c != color])
    dx, dy = (size - 1 - cx) // 1, (size - 1 - cy) // 1
    ImageDraw.Draw(img).rectangle([dx - 3, dy - 3, dx + 3, dy + 3], fill=COLORS[d])
    mask = np.asarray(mask_img) > 0
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    caption = f"a {color} {shape} at the {_place(cx / size, cy / size)} of the image"
    return {
        "image": {"bytes": buf.getvalue(), "path": None},
        "mask_rle": mask_to_rle(mask),
        "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": caption}],
        "catagory": shape,
    }


def write_arrow(path: str, rows: list[dict], fmt: str = "stream") -> str:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with pa.OSFile(path, "wb") as sink:
        writer = pa.ipc.new_stream(sink, SCHEMA) if fmt == "stream" else pa.ipc.new_file(sink, SCHEMA)
        with writer:
            writer.write_table(table, max_chunksize=16)
    return path


def make_gar_data(out_dir: str, n: int = 64, seed: int = 0, layout: str = "release", fmt: str = "stream",
                  shards: int = 2, size: int = 64) -> str:
    """Write ``n`` rows in ``shards`` files.

    layout 'release': Fine-Grained-Dataset/data-0000i-of-0000k.arrow (datasets.save_to_disk, stream format);
    layout 'parts': Fine-Grained-Dataset-Part{i}/data-0000i-of-0000k.arrow (the original trainer's copy).
    """
    rng = random.Random(seed)
    rows = [synthetic_row(rng, size) for _ in range(n)]
    per = -(-n // shards)
    for i in range(shards):
        folder = "Fine-Grained-Dataset" if layout == "release" else f"Fine-Grained-Dataset-Part{i + 1}"
        name = f"data-{i:05d}-of-{shards:05d}.arrow"
        write_arrow(os.path.join(out_dir, folder, name), rows[i * per:(i + 1) * per], fmt)
    return out_dir
