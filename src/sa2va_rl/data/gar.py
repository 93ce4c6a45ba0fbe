"""GAR ("Grasp Any Region") region data: image + region mask (COCO RLE) + conversation.

Layouts read (see SA2VA_FACTS.md section 7):

* ``DATA_DIR/{Fine-Grained,Relation,Seed}-Dataset/data-*-of-*.arrow`` (``datasets.save_to_disk``: Arrow IPC
  *stream* files), and the original trainer's ``DATA_DIR/Fine-Grained-Dataset-Part*/*.arrow``;
* any ``*.arrow`` in IPC *file* or *stream* format, ``*.parquet``, and ``*.jsonl`` whose ``image`` is a
  path relative to the jsonl file.

Files are memory-mapped; a row's image and mask are decoded only when the row is read. Bad rows (undecodable
image, bad RLE, mask size != image size, empty mask, missing caption) raise ``BadRow`` naming the file, the
row index and the field; ``GARReader(..., bad_rows="skip")`` counts them instead of failing.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pycocotools import mask as mask_utils

from sa2va_rl.numerics._ratelimit import PowerOfTwoLimiter

logger = logging.getLogger(__name__)

PROMPT_MARKER = re.compile(r"<Prompt\d+>")


class NoGoodRows(ValueError):
    """Every row of a GAR directory is bad (under ``bad_rows='skip'``); the message counts them by file and field."""


class BadRow(ValueError):
    def __init__(self, path: str, index: int, field_name: str, reason: str) -> None:
        super().__init__(f"{path}: row {index}: field {field_name!r}: {reason}")
        self.path, self.index, self.field, self.reason = path, index, field_name, reason


# --------------------------------------------------------------------------------------------- RLE
def mask_to_rle(mask: np.ndarray) -> dict:
    """Bool [H, W] -> COCO RLE {"size": [H, W], "counts": str}, as GAR stores it."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed string/bytes counts, or uncompressed list counts) -> bool [H, W]."""
    size = [int(x) for x in rle["size"]]
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": size, "counts": counts}, *size)
    else:
        rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


# --------------------------------------------------------------------------------------------- rows
@dataclass
class GARSample:
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # bool [H, W], non-empty
    question: str  # the human turn, <image>/<PromptN> markers removed
    caption: str  # the reference answer (first gpt turn)
    category: str | None
    source: str  # "path:index"


def _decode_image(value, path: str, index: int, base_dir: str) -> np.ndarray:
    if isinstance(value, dict):
        data, ipath = value.get("bytes"), value.get("path")
    else:
        data, ipath = (value, None) if isinstance(value, (bytes, bytearray)) else (None, value)
    if data is None and ipath:
        full = ipath if os.path.isabs(ipath) else os.path.join(base_dir, ipath)
        if not os.path.isfile(full):
            raise BadRow(path, index, "image", f"no bytes and no file at {full!r}")
        with open(full, "rb") as f:
            data = f.read()
    if not data:
        raise BadRow(path, index, "image", "missing: expected {bytes: ...} or a path")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadRow(path, index, "image", f"undecodable ({type(e).__name__}: {e})") from None


def _decode_mask(value, path: str, index: int, hw: tuple[int, int]) -> np.ndarray:
    if isinstance(value, list):  # several regions: GAR allows a list of RLEs; the union is the region
        if not value:
            raise BadRow(path, index, "mask_rle", "empty list")
        masks = [_decode_mask(v, path, index, hw) for v in value]
        return np.logical_or.reduce(masks)
    if not isinstance(value, dict) or "size" not in value or "counts" not in value:
        raise BadRow(path, index, "mask_rle", f"expected a COCO RLE {{size: [H, W], counts}}, got {value!r:.80}")
    try:
        mask = rle_to_mask(value)
    except Exception as e:
        raise BadRow(path, index, "mask_rle", f"undecodable RLE ({type(e).__name__}: {e})") from None
    if mask.shape != hw:
        raise BadRow(path, index, "mask_rle", f"mask size {list(mask.shape)} != image size {list(hw)}")
    if not mask.any():
        raise BadRow(path, index, "mask_rle", "empty mask (no pixel set)")
    return mask


def _conversation(value, path: str, index: int) -> tuple[str, str]:
    if not isinstance(value, list):
        raise BadRow(path, index, "conversations", f"expected a list of {{from, value}}, got {type(value).__name__}")
    human = next((t.get("value") for t in value if isinstance(t, dict) and t.get("from") == "human"), None)
    gpt = next((t.get("value") for t in value if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if not isinstance(gpt, str) or not gpt.strip():
        raise BadRow(path, index, "conversations", "missing caption: no non-empty turn from 'gpt'")
    question = re.sub(r"[ \t]+", " ", PROMPT_MARKER.sub("", (human or "").replace("<image>", ""))).strip()
    return question, gpt.strip()


def decode_row(row: dict, path: str, index: int) -> GARSample:
    image = _decode_image(row.get("image"), path, index, os.path.dirname(path))
    mask = _decode_mask(row.get("mask_rle"), path, index, image.shape[:2])
    question, caption = _conversation(row.get("conversations"), path, index)
    category = row.get("catagory", row.get("category"))  # 'catagory' (sic) in the release
    return GARSample(image, mask, question, caption, None if category is None else str(category), f"{path}:{index}")


# --------------------------------------------------------------------------------------------- files
def _open_table(path: str) -> pa.Table:
    """Memory-mapped: the table's buffers point into the mapped file, nothing is copied up front."""
    if path.endswith(".parquet"):
        return pq.read_table(path, memory_map=True)
    source = pa.memory_map(path, "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def _jsonl_rows(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadRow(path, lineno, "<line>", f"not valid JSON ({e.msg})") from None
    return rows


def find_files(data_dir: str) -> list[str]:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"GAR data dir {data_dir!r} is not a directory")
    found = []
    for root, _dirs, files in os.walk(data_dir):
        for name in files:
            if name.endswith((".arrow", ".parquet", ".jsonl")) and not name.startswith("cache-"):
                found.append(os.path.join(root, name))
    if not found:
        raise FileNotFoundError(
            f"{data_dir}: no GAR files (*.arrow, *.parquet, *.jsonl). Expected e.g. "
            "Fine-Grained-Dataset/data-00000-of-00044.arrow or Fine-Grained-Dataset-Part1/*.arrow")
    return sorted(found)


@dataclass
class GARReader:
    """Random access to every row of every GAR file under ``data_dir``; decoding happens per row."""

    data_dir: str
    bad_rows: str = "skip"  # or "error"
    bad_counts: Counter = field(default_factory=Counter)  # (file, field) -> rows skipped

    def __post_init__(self) -> None:
        if self.bad_rows not in ("skip", "error"):
            raise ValueError(f"bad_rows={self.bad_rows!r}: use 'skip' or 'error'")
        self._files = find_files(self.data_dir)
        self._tables: dict[str, pa.Table | list[dict]] = {}
        self._warn_limiter = PowerOfTwoLimiter()
        self._known_bad: set[int] = set()  # counted once, however often they are read
        self._index: list[tuple[str, int]] = []
        for path in self._files:
            n = len(self._rows(path))
            self._index.extend((path, i) for i in range(n))

    def _rows(self, path: str):
        if path not in self._tables:
            self._tables[path] = _jsonl_rows(path) if path.endswith(".jsonl") else _open_table(path)
        return self._tables[path]

    def __len__(self) -> int:
        return len(self._index)

    def raw(self, i: int) -> tuple[str, int, dict]:
        path, index = self._index[i]
        rows = self._rows(path)
        row = rows[index] if isinstance(rows, list) else rows.slice(index, 1).to_pylist()[0]
        return path, index, row

    def get(self, i: int) -> GARSample | None:
        """The decoded row, or None (counted) when it is bad and bad_rows='skip'."""
        if i in self._known_bad:
            return None
        path, index, row = self.raw(i)
        try:
            return decode_row(row, path, index)
        except BadRow as e:
            if self.bad_rows == "error":
                raise
            self._known_bad.add(i)
            self.bad_counts[(os.path.relpath(e.path, self.data_dir), e.field)] += 1
            if self._warn_limiter():
                logger.warning("skipping bad GAR row (%s); %d skipped so far (logged on the 1st, 2nd, 4th... "
                               "skip)", e, self._warn_limiter.events)
            return None

    def get_good(self, i: int) -> tuple[int, GARSample]:
        """Row ``i`` or, if it is bad (skipped), the next good row after it (wrapping): (index, sample).
        Deterministic, so the G reads of a GRPO group agree."""
        for k in range(len(self)):
            j = (i + k) % len(self)
            sample = self.get(j)
            if sample is not None:
                return j, sample
        raise NoGoodRows(f"{self.data_dir}: every one of the {len(self)} rows is bad, nothing to train on: "
                         f"{self.bad_report()}")

    def scan(self) -> tuple[int, int]:
        """Decode every row once: (good, bad). The bad ones are in ``bad_counts``."""
        good = sum(self.get(i) is not None for i in range(len(self)))
        return good, len(self) - good

    def bad_report(self) -> str:
        if not self.bad_counts:
            return "no bad rows"
        return "; ".join(f"{f}: {n} row(s) with a bad {fld!r}" for (f, fld), n in sorted(self.bad_counts.items()))
