"""Prompt datasets for causal LMs: DATA_DIR/train.jsonl with {"prompt": str, "solution": str} per line."""

from __future__ import annotations

import json
import os
import random

from datasets import Dataset

from sa2va_rl.data.vocab import COLORS, PLACES, SHAPES
from sa2va_rl.jsonio import dumps_strict

TRAIN_FILE = "train.jsonl"


class DataError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


def load_prompt_dataset(data_dir: str) -> Dataset:
    path = os.path.join(data_dir, TRAIN_FILE)
    if not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir!r} is not a directory")
    if not os.path.isfile(path):
        if _gar_files(data_dir):
            raise DataError(f"{data_dir}: GAR data (image, region mask, caption files), not prompt data: GAR data "
                            "trains a Sa2VA checkpoint (pass one as --model_path); a causal LM trains on "
                            f"{TRAIN_FILE} with one {{\"prompt\": ..., \"solution\": ...}} object per line")
        raise DataError(f"{path}: missing. A prompt data dir holds {TRAIN_FILE} with one "
                        '{"prompt": "...", "solution": "..."} object per line '
                        "(`sa2va-rl make-data --kind prompts DIR` writes an example)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in ("prompt", "solution"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    got = "missing" if key not in row else f"{type(row[key]).__name__} {row[key]!r}"
                    raise DataError(f"{path}:{lineno}: field {key!r} must be a non-empty string, got {got}")
            rows.append({"prompt": row["prompt"], "solution": row["solution"]})
    if not rows:
        raise DataError(f"{path}: no rows")
    return Dataset.from_list(rows)


def _gar_files(data_dir: str) -> bool:
    from sa2va_rl.data.gar import INDEX_FILE, find_files

    if os.path.isfile(os.path.join(data_dir, INDEX_FILE)):
        return True
    try:
        return bool(find_files(data_dir))
    except FileNotFoundError:
        return False


def make_prompt_data(out_dir: str, n: int = 64, seed: int = 0) -> str:
    """A copy task in the tiny tokenizer's words: 'copy : red square left' -> 'red square left'."""
    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, TRAIN_FILE), "w", encoding="utf-8") as f:
        for _ in range(n):
            words = [rng.choice(COLORS), rng.choice(SHAPES), rng.choice(PLACES)]
            f.write(dumps_strict({"prompt": "copy : " + " ".join(words), "solution": " ".join(words)}) + "\n")
    return out_dir
