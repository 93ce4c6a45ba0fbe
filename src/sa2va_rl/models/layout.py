"""A checkpoint's on-disk layout, read when it is loaded and written back the same way when the trained model is saved.

A trained Sa2VA must go back to the user's tools (upstream's ``predict_forward``, their eval code, transformers
4.4x-4.57) exactly as it came: the same weight names in the same shard files, the same dtype, the same remote
code, configs, tokenizer, processor and ``generation_config.json``. transformers 5's own ``save_pretrained``
does not guarantee that for remote-code wrappers (it may rename keys through its conversion mappings and saves
the in-memory dtype), so ``ReleaseLayout`` owns both directions:

* ``ReleaseLayout.read(path, model)``: the weight files and their keys and dtypes (safetensors headers only, no
  tensor is read), the other files, and each file key's name in ``model.state_dict()``: the key as loading
  renamed it (transformers' recorded weight conversions, applied forward), checked to cover the model exactly.
* ``layout.save(state_dict, out_dir)``: every file key written from the model's tensor under its file name, cast
  to the file's dtype (or ``dtype``), in the same shards with the same index; every other file copied byte for
  byte. Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SKIP = {".cache", "lora_adapter", "__pycache__"}  # never part of a released checkpoint's files
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class LayoutError(RuntimeError):
    """The model and its checkpoint's files disagree, so the trained model cannot be saved in the input's layout."""


def _header(path: str) -> dict:
    """A safetensors file's header: {key: {dtype, shape, data_offsets}} (and __metadata__)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def model_dir_problem(path: str) -> str | None:
    """Why ``path`` is not a model directory (before anything tries to load it), or None."""
    if not os.path.isdir(path):
        return f"--model_path {path!r} is not a directory; pass a directory saved with save_pretrained"
    if not os.path.isfile(os.path.join(path, "config.json")):
        return (f"--model_path {path!r} has no config.json; pass a directory saved with save_pretrained "
                "(`sa2va-rl make-tiny --kind sa2va DIR` writes one)")
    return None


def verify_weight_files(path: str) -> None:
    """Every ``*.safetensors`` file of a checkpoint is whole: its header parses and its size covers every tensor
    the header lists. A truncated download or a corrupt file is named here, before any weight is read."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for name in files:
        file = os.path.join(path, name)
        size = os.path.getsize(file)
        try:
            with open(file, "rb") as f:
                raw = f.read(8)
                n = int.from_bytes(raw, "little")
                if len(raw) < 8 or n <= 0 or 8 + n > size:
                    raise ValueError(f"header of {n} bytes does not fit in the file's {size} bytes")
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise LayoutError(f"{file}: not a readable safetensors file ({e}); re-download or re-save it") from e
        if 8 + n + end > size:
            raise LayoutError(f"{file}: truncated: its header lists {8 + n + end:,} bytes of data, the file has "
                              f"{size:,}; re-download it (an interrupted download or a full disk leaves this)")


def _loaded_name(model, key: str, names: set[str]) -> str:
    """The name ``key`` of a checkpoint file has in ``model.state_dict()``: itself, or as transformers' weight
    conversions renamed it at load (``model._weight_conversions``; a transformers-5 internal, hence the guard)."""
    if key in names:
        return key
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        try:
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

            renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
            converters = [c for c in conversions if isinstance(c, WeightConverter)]
            renamed, converter = rename_source_key(key, renamings, converters, model.base_model_prefix,
                                                   dict.fromkeys(names))
            if converter is None:
                return renamed
        except (ImportError, TypeError, ValueError) as e:  # an API change: fall through to the mismatch error
            logger.debug("weight conversions not applicable to %s: %s", key, e)
    return key


@dataclass
class ReleaseLayout:
    src: str
    shards: dict[str, list[str]]  # weight file -> its keys, in file order
    dtypes: dict[str, torch.dtype]  # key -> dtype in the file
    names: dict[str, str]  # file key -> name in model.state_dict()
    files: list[str] = field(default_factory=list)  # other files (relative paths), copied verbatim
    index_metadata: dict | None = None

    @classmethod
    def read(cls, path: str, model) -> "ReleaseLayout":
        if os.path.exists(os.path.join(path, INDEX)):
            with open(os.path.join(path, INDEX)) as f:
                index = json.load(f)
            shards: dict[str, list[str]] = {}
            for key, file in index["weight_map"].items():
                shards.setdefault(file, []).append(key)
            meta = index.get("metadata")
        elif os.path.exists(os.path.join(path, SINGLE)):
            shards, meta = {SINGLE: []}, None
        else:
            raise LayoutError(f"{path}: no {SINGLE} or {INDEX}; only safetensors checkpoints can be saved back in "
                              "their own layout")
        dtypes = {}
        for file in list(shards):
            header = _header(os.path.join(path, file))
            keys = [k for k in header if k != "__metadata__"]
            shards[file] = keys if not shards[file] else shards[file]
            for k in keys:
                dtypes[k] = DTYPES.get(header[k]["dtype"], torch.float32)
        state_names = set(model.state_dict().keys())
        names = {k: _loaded_name(model, k, state_names) for ks in shards.values() for k in ks}
        weight_files = set(shards) | {INDEX}
        files = []
        for root, dirs, fnames in os.walk(path):
            dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith(".")]
            for fn in fnames:
                rel = os.path.relpath(os.path.join(root, fn), path)
                if rel not in weight_files and not fn.startswith("."):
                    files.append(rel)
        layout = cls(path, shards, dtypes, names, sorted(files), meta)
        layout.check(state_names)
        return layout

    def check(self, state_names: set[str]) -> None:
        """Every file key has a tensor in the model and every model tensor has a file key (tied ones may share)."""
        mapped = set(self.names.values())
        missing = sorted(v for v in mapped if v not in state_names)
        extra = sorted(state_names - mapped)
        if missing or extra:
            raise LayoutError(f"{self.src}: the checkpoint's weight names and the loaded model's differ "
                              f"({len(missing)} file keys without a model tensor, first {missing[:3]}; "
                              f"{len(extra)} model tensors without a file key, first {extra[:3]})")

    def save(self, state_dict: dict[str, torch.Tensor], out_dir: str, dtype: torch.dtype | None = None) -> None:
        """Write ``state_dict`` (the model's names) as this checkpoint's files in ``out_dir``; copy the rest."""
        from safetensors.torch import save_file

        self.check(set(state_dict))
        os.makedirs(out_dir, exist_ok=True)
        total = 0
        for file, keys in self.shards.items():
            tensors = {}
            for k in keys:
                t = state_dict[self.names[k]].detach()
                t = t.to(device="cpu", dtype=dtype or self.dtypes[k]).contiguous()
                tensors[k] = t.clone() if any(t.data_ptr() == v.data_ptr() for v in tensors.values()) else t
                total += t.numel() * t.element_size()
            tmp = os.path.join(out_dir, f".{os.path.basename(file)}.tmp")
            os.makedirs(os.path.dirname(os.path.join(out_dir, file)), exist_ok=True)
            save_file(tensors, tmp, metadata={"format": "pt"})
            os.replace(tmp, os.path.join(out_dir, file))
        if len(self.shards) > 1 or os.path.exists(os.path.join(self.src, INDEX)):
            index = {"metadata": {**(self.index_metadata or {}), "total_size": total},
                     "weight_map": {k: f for f, ks in self.shards.items() for k in ks}}
            _write_json(os.path.join(out_dir, INDEX), index)
        for rel in self.files:
            dst = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp")
            shutil.copyfile(os.path.join(self.src, rel), tmp)
            os.replace(tmp, dst)


def _write_json(path: str, obj) -> None:
    from sa2va_rl.jsonio import dump_json

    dump_json(obj, path, atomic=True, sort_keys=True)


def resume_mismatch(checkpoint: str, model, base_fingerprint: str | None = None) -> str | None:
    """Why ``checkpoint``'s weights cannot be loaded into ``model`` (other LoRA rank, other model), or None.

    Headers only: key names (as loading would rename them) and shapes against ``model.state_dict()``. A checkpoint
    of the trained parameters only is checked by ``trained_only_mismatch``."""
    from sa2va_rl.rl.checkpoints import TRAINABLE_FILE

    if os.path.isfile(os.path.join(checkpoint, TRAINABLE_FILE)):
        return trained_only_mismatch(os.path.join(checkpoint, TRAINABLE_FILE), model, base_fingerprint)
    files = sorted(f for f in os.listdir(checkpoint) if f.endswith(".safetensors") and f.startswith("model"))
    if not files:
        return None
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = set(state)
    shapes, unknown = [], []
    for file in files:
        for key, meta in _header(os.path.join(checkpoint, file)).items():
            if key == "__metadata__":
                continue
            name = _loaded_name(model, key, names)
            if name not in state:
                unknown.append(key)
            elif tuple(meta["shape"]) != state[name]:
                shapes.append(f"{key}: checkpoint {list(meta['shape'])} vs this model {list(state[name])}")
    if not shapes and not unknown:
        return None
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) differ in shape (first: {shapes[0]})")
    if unknown:
        parts.append(f"{len(unknown)} checkpoint tensor(s) this model does not have (first: {unknown[0]})")
    return "; ".join(parts)


def trained_only_mismatch(path: str, model, base_fingerprint: str | None = None) -> str | None:
    """Why the trained-parameters file ``path`` (rl/checkpoints.py ``save_trainable``) does not fit ``model``, or
    None: it must hold exactly what ``model`` trains and its buffers, at the same shapes, and (where both are
    known) come from the same base model, whose frozen weights it does not hold. Header only; the one check behind
    both the resume check before training and ``load_trainable``."""
    from sa2va_rl.rl.checkpoints import frozen_parameter_names

    header = _header(path)
    saved_base = (header.pop("__metadata__", None) or {}).get("base_model_fingerprint")
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    trained = set(own) - frozen_parameter_names(model)
    parts = []
    if base_fingerprint and saved_base and saved_base != base_fingerprint:
        parts.append(f"it holds only the trained parameters, and --model_path is not the model they were trained on "
                     f"(fingerprint {saved_base}, now {base_fingerprint})")
    shapes = [f"{k}: checkpoint {list(m['shape'])} vs this model {list(own[k])}" for k, m in header.items()
              if k in own and tuple(m["shape"]) != own[k]]
    for found, what in ((shapes, "tensor(s) differ in shape"),
                        (sorted(set(header) - set(own)), "tensor(s) in it this model does not have"),
                        (sorted(trained - set(header)), "trained tensor(s) of this model are not in it"),
                        (sorted(set(header) & (set(own) - trained)), "tensor(s) in it are frozen in this model")):
        if found:
            parts.append(f"{len(found)} {what} (first: {found[0]})")
    return "; ".join(parts) or None

