"""Strict JSON for every file sa2va-rl writes (stability.json, checkpoint state, eval metrics and predictions,
lock files, data it generates): one helper, so no writer can emit Python's ``NaN`` / ``Infinity`` tokens, which
are not JSON (RFC 8259) and which strict parsers (jq, JavaScript's JSON.parse, Go, Rust's serde_json) reject.

The rule: a non-finite float (NaN, +inf, -inf; Python, numpy or a 0-d tensor) is written as ``null``, meaning
"no value" (docs/troubleshooting.md, "Strict JSON"). numpy scalars and arrays become numbers and lists; tuples
become lists. Everything is then serialised with ``allow_nan=False``, so a value that slipped past the
sanitiser fails loudly here instead of producing a file other tools cannot read.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from typing import Any, Iterable


def sanitize(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, numpy/torch scalars and arrays made Python values.
    Containers are copied; the input is not modified."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalar/array, torch tensor
        return sanitize(obj.tolist())
    if hasattr(obj, "item") and callable(obj.item):
        return sanitize(obj.item())
    return obj  # json.dumps raises TypeError naming it


def dumps_strict(obj: Any, **kwargs) -> str:
    """``json.dumps`` of ``sanitize(obj)`` with ``allow_nan=False``."""
    return json.dumps(sanitize(obj), allow_nan=False, **kwargs)


def dump_json(obj: Any, path: str, atomic: bool = True, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write ``obj`` as strict JSON to ``path``. ``atomic``: to a temp file in the same directory, fsync, rename,
    so a reader never sees half a file."""
    text = dumps_strict(obj, indent=indent, sort_keys=sort_keys)  # fails before anything is written
    _write(path, text + "\n", atomic)


def dump_jsonl(rows: Iterable[Any], path: str, atomic: bool = True) -> None:
    """One strict JSON value per line."""
    _write(path, "".join(dumps_strict(r) + "\n" for r in rows), atomic)


def _write(path: str, text: str, atomic: bool) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if not atomic:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    # a unique temp name opened like open() would (mode 0o666 less the umask; mkstemp's 0o600 would make a shared
    # checkpoint's files private)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{secrets.token_hex(6)}{os.path.splitext(path)[1] or '.json'}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _no_constant(name: str):
    raise ValueError(f"not strict JSON: {name}")


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses ``NaN`` / ``Infinity`` / ``-Infinity`` (what a strict parser does)."""
    return json.loads(text, parse_constant=_no_constant)
