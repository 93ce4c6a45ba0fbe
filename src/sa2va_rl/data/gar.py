"""GAR ("Grasp Any Region") region data: image + region mask (COCO RLE) + conversation.

Layouts read (see SA2VA_FACTS.md section 7):

* ``DATA_DIR/{Fine-Grained,Relation,Seed}-Dataset/data-*-of-*.arrow`` (``datasets.save_to_disk``: Arrow IPC
  *stream* files), and the original trainer's ``DATA_DIR/Fine-Grained-Dataset-Part*/*.arrow``;
* any ``*.arrow`` in IPC *file* or *stream* format, ``*.parquet``, and ``*.jsonl`` whose ``image`` is a
  path relative to the jsonl file;
* a subset of such files: ``DATA_DIR/gar_index.json`` (``INDEX_FILE``, written by ``sa2va-rl filter``) lists
  rows of other GAR files by file and row; the reader then reads those rows only, in that order, and each sample
  keeps its source ``file:row`` in the original file.

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


class DataFileError(ValueError):
    """A whole data file is unusable (unreadable, truncated, wrong schema); the message names the file and why."""


class NoGoodRows(ValueError):
    """Every row of a GAR directory is bad (under ``bad_rows='skip'``); the message counts them by file and field."""


class BadRow(ValueError):
    """One row is unusable. ``index`` counts the file's rows from 0; for jsonl, ``line`` is the 1-based line."""

    def __init__(self, path: str, index: int, field_name: str, reason: str, line: int | None = None) -> None:
        where = f"row {index}" if line is None else f"row {index} (line {line})"
        super().__init__(f"{path}: {where}: field {field_name!r}: {reason}")
        self.path, self.index, self.field, self.reason, self.line = path, index, field_name, reason, line


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
            return _to_rgb8(im, path, index)
    except BadRow:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadRow(path, index, "image", f"undecodable ({type(e).__name__}: {e})") from None


def _to_rgb8(im: Image.Image, path: str, index: int) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3]. 16/32-bit integer images are scaled to 8 bits (PIL's convert('RGB') clips
    them: a 16-bit PNG would become solid white); palette, CMYK, LA, RGBA (alpha dropped) go through PIL's
    conversion; float images are refused by name. EXIF orientation is applied by ``_orient`` against the mask."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64)
        top = 65535 if im.mode.startswith("I;16") or arr.max() <= 65535 else int(arr.max())
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        raise BadRow(path, index, "image", "32-bit float image (mode F): no defined 8-bit range; store it as 8- "
                                           "or 16-bit")
    return np.asarray(im.convert("RGB"))


def _orient(data_image: np.ndarray, exif_rotated: np.ndarray | None, hw_mask: tuple[int, int]) -> np.ndarray:
    """The image as the mask was drawn on it: EXIF-rotated when only the rotated size matches the mask, raw
    pixels otherwise (annotation tools that ignore EXIF, as COCO's, drew on the raw array)."""
    if exif_rotated is not None and exif_rotated.shape[:2] == hw_mask and data_image.shape[:2] != hw_mask:
        return exif_rotated
    return data_image


def _exif_rotated(value, path: str, index: int, base_dir: str) -> np.ndarray | None:
    """The image with its EXIF orientation applied, or None when it has none."""
    from PIL import ImageOps

    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, (bytes, bytearray)) else None
    if not data:
        return None
    with Image.open(io.BytesIO(data)) as im:
        if im.getexif().get(0x0112, 1) == 1:
            return None
        return _to_rgb8(ImageOps.exif_transpose(im), path, index)


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


def _mask_hw(value) -> tuple[int, int] | None:
    first = value[0] if isinstance(value, list) and value else value
    size = first.get("size") if isinstance(first, dict) else None
    return tuple(size) if isinstance(size, (list, tuple)) and len(size) == 2 else None


def decode_row(row: dict, path: str, index: int) -> GARSample:
    image = _decode_image(row.get("image"), path, index, os.path.dirname(path))
    hw = _mask_hw(row.get("mask_rle"))
    if hw is not None and hw != image.shape[:2]:
        image = _orient(image, _exif_rotated(row.get("image"), path, index, os.path.dirname(path)), hw)
    mask = _decode_mask(row.get("mask_rle"), path, index, image.shape[:2])
    question, caption = _conversation(row.get("conversations"), path, index)
    category = row.get("catagory", row.get("category"))  # 'catagory' (sic) in the release
    return GARSample(image, mask, question, caption, None if category is None else str(category), f"{path}:{index}")


# --------------------------------------------------------------------------------------------- files
REQUIRED = ("image", "mask_rle", "conversations")


def _open_table(path: str) -> pa.Table:
    """Memory-mapped: the table's buffers point into the mapped file, nothing is copied up front. A file that
    does not read whole (truncated download, not Arrow/Parquet) or lacks a column is named here, at open."""
    try:
        if path.endswith(".parquet"):
            table = pq.read_table(path, memory_map=True)
        else:
            source = pa.memory_map(path, "r")
            try:
                table = pa.ipc.open_file(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataFileError(f"{path}: cannot be read ({type(e).__name__}: {e}); a truncated or interrupted "
                            "download? Re-download the file, or move it out of --data_dir") from None
    _check_schema(path, table.schema)
    return table


def _check_schema(path: str, schema: pa.Schema) -> None:
    """The columns a GAR row needs, with types a row can be decoded from."""
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise DataFileError(f"{path}: column(s) {missing} missing; GAR rows need {list(REQUIRED)}, this file has "
                            f"{schema.names}")
    image = schema.field("image").type
    ok = (pa.types.is_struct(image) and {"bytes", "path"} & {f.name for f in image}) or pa.types.is_binary(image) \
        or pa.types.is_large_binary(image) or pa.types.is_string(image) or pa.types.is_large_string(image)
    if not ok:
        raise DataFileError(f"{path}: column 'image' has type {image}; expected struct<bytes, path>, binary or a "
                            "path string")
    mask = schema.field("mask_rle").type
    if not (pa.types.is_struct(mask) or pa.types.is_list(mask) or pa.types.is_large_list(mask)):
        raise DataFileError(f"{path}: column 'mask_rle' has type {mask}; expected a COCO RLE struct<size, counts> "
                            "or a list of them")
    conv = schema.field("conversations").type
    if not (pa.types.is_list(conv) or pa.types.is_large_list(conv)):
        raise DataFileError(f"{path}: column 'conversations' has type {conv}; expected a list of {{from, value}}")


def _jsonl_rows(path: str) -> tuple[list[dict], list[int]]:
    """(rows, 1-based line number of each row): blank lines are skipped, so row i need not be line i + 1."""
    rows, lines = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(f"{path}: line {lineno}: not UTF-8 (byte {e.start + 1} of the line: "
                                    f"{raw[e.start:e.start + 1]!r}); save the file as UTF-8") from None
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadRow(path, len(rows), "<line>", f"not valid JSON ({e.msg})", line=lineno) from None
                lines.append(lineno)
    return rows, lines


INDEX_FILE = "gar_index.json"
INDEX_FORMAT = "sa2va-rl/gar-index"


def write_index(out_dir: str, data_dir: str, entries: list[dict], **extra) -> str:
    """``out_dir/gar_index.json`` naming ``entries`` ({"file": path relative to ``data_dir``, "row": int, any other
    keys kept as written}) of the GAR files under ``data_dir``; written atomically (temporary file, fsync, rename)."""
    from sa2va_rl.jsonio import dump_json

    payload = {"format": INDEX_FORMAT, "version": 1, "data_dir": os.path.abspath(data_dir), **extra, "rows": entries}
    path = os.path.join(out_dir, INDEX_FILE)
    dump_json(payload, path, indent=1)
    return path


def read_index(data_dir: str) -> list[tuple[str, int]] | None:
    """The (file path, row) pairs of ``data_dir/gar_index.json``, or None when there is none. File paths are
    relative to the index's ``data_dir`` (itself relative to the index's directory when not absolute)."""
    path = os.path.join(data_dir, INDEX_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataFileError(f"{path}: not a readable GAR index ({type(e).__name__}: {e}); re-run `sa2va-rl filter`"
                            " or remove the file") from None
    if not isinstance(payload, dict) or payload.get("format") != INDEX_FORMAT or not isinstance(
            payload.get("rows"), list):
        raise DataFileError(f"{path}: not a GAR index (expected {{format: {INDEX_FORMAT!r}, data_dir, rows: "
                            "[{file, row}, ...]}}); remove it, or re-run `sa2va-rl filter`")
    root = os.path.join(data_dir, payload.get("data_dir") or ".")
    out = []
    for n, e in enumerate(payload["rows"]):
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("row"), int)
                and e["row"] >= 0):
            raise DataFileError(f"{path}: rows[{n}]: expected {{file: str, row: int >= 0}}, got {e!r:.120}")
        out.append((os.path.join(root, e["file"]), e["row"]))
    return out


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


def _refuse_prompt_data(path: str, rows) -> None:
    """A causal LM's prompt file (rows of prompt/solution, no image) given as GAR data: one error naming the file,
    rather than every row counted bad (which ``--bad_rows skip`` cannot fix)."""
    if not isinstance(rows, list) or not rows:
        return
    first = rows[0]
    if isinstance(first, dict) and {"prompt", "solution"} <= first.keys() and "image" not in first:
        raise DataFileError(f"{path}: prompt data (rows of 'prompt' and 'solution', for a causal LM), not GAR rows "
                            "(image, mask, caption). A Sa2VA checkpoint trains on GAR data (`sa2va-rl make-data "
                            "--kind gar DIR` writes an example); to train on this file, pass a causal LM as "
                            "--model_path")


@dataclass
class GARReader:
    """Random access to every row of every GAR file under ``data_dir``; decoding happens per row."""

    data_dir: str
    bad_rows: str = "skip"  # or "error"
    bad_counts: Counter = field(default_factory=Counter)  # (file, field) -> rows skipped

    def __post_init__(self) -> None:
        if self.bad_rows not in ("skip", "error"):
            raise ValueError(f"bad_rows={self.bad_rows!r}: use 'skip' or 'error'")
        listed = read_index(self.data_dir)  # a subset of other files' rows (gar_index.json), or None
        self._files = find_files(self.data_dir) if listed is None else sorted({p for p, _ in listed})
        self._tables: dict[str, pa.Table | list[dict]] = {}
        self._lines: dict[str, list[int]] = {}  # jsonl: the 1-based line of each row
        self._warn_limiter = PowerOfTwoLimiter()
        self._known_bad: set[int] = set()  # counted once, however often they are read
        self._index: list[tuple[str, int]] = []
        for path in self._files:
            if listed is not None and not os.path.isfile(path):
                raise FileNotFoundError(f"{os.path.join(self.data_dir, INDEX_FILE)} lists rows of {path}, which "
                                        "does not exist: the data it was filtered from moved or is gone")
            rows = self._rows(path)
            _refuse_prompt_data(path, rows)
            n = len(rows)
            if listed is None:
                self._index.extend((path, i) for i in range(n))
            elif (bad := next((r for p, r in listed if p == path and r >= n), None)) is not None:
                raise DataFileError(f"{os.path.join(self.data_dir, INDEX_FILE)}: row {bad} of {path}, which has "
                                    f"{n} rows: the file changed since it was filtered; re-run `sa2va-rl filter`")
        if listed is not None:
            self._index = listed

    def _rows(self, path: str):
        if path not in self._tables:
            if path.endswith(".jsonl"):
                self._tables[path], self._lines[path] = _jsonl_rows(path)
            else:
                self._tables[path] = _open_table(path)
        return self._tables[path]

    def __len__(self) -> int:
        return len(self._index)

    def source(self, i: int) -> str:
        """Row ``i``'s source, "file:row" (as ``GARSample.source``), without reading the row."""
        path, index = self._index[i]
        return f"{path}:{index}"

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
            try:
                return decode_row(row, path, index)
            except BadRow:
                raise
            except Exception as e:  # noqa: BLE001 - whatever a row does wrong, it is this row's fault: named
                raise BadRow(path, index, "<row>", f"{type(e).__name__}: {e}") from e
        except BadRow as e:
            if path in self._lines and e.line is None:
                e = BadRow(e.path, e.index, e.field, e.reason, line=self._lines[path][e.index])
            if self.bad_rows == "error":
                raise e from None
            self._known_bad.add(i)
            self.bad_counts[(os.path.relpath(e.path, self.data_dir), e.field)] += 1
            if self._warn_limiter():
                logger.warning("skipping bad GAR row (%s); %d skipped so far (logged on the 1st, 2nd, 4th... "
                               "skip)", e, self._warn_limiter.events)
            return None

    def reject(self, i: int, error: BadRow) -> None:
        """Row ``i`` decoded but a later rule refused it (e.g. its prompt is too long): skipped and counted as any
        bad row under 'skip', raised under 'error'."""
        if self.bad_rows == "error":
            raise error
        if i not in self._known_bad:
            self._known_bad.add(i)
            self.bad_counts[(os.path.relpath(error.path, self.data_dir), error.field)] += 1
            if self._warn_limiter():
                logger.warning("skipping GAR row (%s); %d skipped so far", error, self._warn_limiter.events)

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
