"""Nothing lost (issue O): checks ``sa2va-rl train`` makes before any model loads.

* the output directory: never the input model (or a directory around or inside it that saving or checkpoint
  rotation would overwrite), never ``/``, a filesystem root or the home directory, never a non-empty directory
  that is not a previous run of ours;
* a resume: the checkpoint's state files (trainer_state.json, stability_state.json, output_dir/skipped_rows.json)
  present and well-formed, a finished run left alone, and the settings that define the run
  (``run_settings.json`` in each checkpoint) unchanged unless ``--allow_changed_run true``.

Each problem is a ``ResumeError`` (or ``OutputDirError``) whose message names the files and says what to do; the
command line turns them into exit 2 (README, "Exit codes").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import fields

from transformers import TrainerCallback

from sa2va_rl.jsonio import dump_json

logger = logging.getLogger(__name__)

RUN_SETTINGS = "run_settings.json"  # inside each checkpoint: what defines the run
# entries that make a directory "a previous run of ours"
RUN_MARKERS = ("stability.json", "skipped_rows.json", ".sa2va-rl.lock", ".staging", "trainer_state.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class OutputDirError(ValueError):
    """--output_dir would overwrite the input or somebody else's files."""


class ResumeError(ValueError):
    """The checkpoint cannot be resumed as it is: the message names the file and what to do."""


# ------------------------------------------------------------------------------------------------ output_dir
def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def _is_run_dir(names: list[str]) -> bool:
    return any(n in RUN_MARKERS or n.startswith("checkpoint-") for n in names)


def output_dir_problem(output_dir: str, model_path: str) -> str | None:
    """Why ``output_dir`` must not be written to, or None."""
    out, model = os.path.realpath(output_dir), os.path.realpath(model_path)
    names = {os.path.realpath(os.sep): "the filesystem root", os.path.realpath(os.path.expanduser("~")): "the home "
             "directory"}
    if out in names:
        return (f"--output_dir {output_dir!r} is {names[out]} ({out}): a run writes model files there and rotates "
                "checkpoint-* directories in it; pass a new directory for this run (e.g. runs/my-run)")
    if _within(out, model) or (_within(model, out) and _overwritten_inside(model, out)):
        how = ("is the model directory" if out == model else
               "is inside the model directory" if _within(out, model) else
               "contains the model where saving or checkpoint rotation would overwrite it")
        return (f"--output_dir {output_dir!r} {how} --model_path {model_path!r}: the run would overwrite its "
                "input model; pass an --output_dir outside the model directory")
    try:
        shown = sorted(os.listdir(out)) if os.path.isdir(out) else []
    except OSError:  # unreadable: creating and writing it is reported as an I/O error (exit 6)
        shown = []
    if _within(model, out):  # the model in a folder of its own under output_dir: saving leaves it alone
        shown = [n for n in shown if n != os.path.relpath(model, out).split(os.sep)[0]]
    if shown and not _is_run_dir(shown):
        listing = ", ".join(shown[:5]) + (f", ... ({len(shown)} entries)" if len(shown) > 5 else "")
        return (f"--output_dir {output_dir!r} is a non-empty directory that is not a sa2va-rl run ({listing}): "
                "saving would overwrite files of the same name; pass an empty or new directory")
    return None


def _overwritten_inside(model: str, out: str) -> bool:
    """The model lies under the output dir where a run writes: the directory itself, a checkpoint-* directory
    (replaced, rotated away) or the staging area."""
    if model == out:
        return True
    first = os.path.relpath(model, out).split(os.sep)[0]
    return first.startswith("checkpoint-") or first == ".staging"


# ------------------------------------------------------------------------------------------------ run settings
def model_fingerprint(model_path: str) -> str:
    """Cheap: sha256 of config.json, the weight index files and the weight files' names and sizes."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_path)):
        path = os.path.join(model_path, name)
        if not os.path.isfile(path):
            continue
        if name == "config.json" or name.endswith(".index.json"):
            with open(path, "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
        elif name.endswith(WEIGHT_SUFFIXES):
            h.update(f"{name}\0{os.path.getsize(path)}\0".encode())
    return h.hexdigest()[:16]


def weights_fingerprint(model_path: str, sample: int = 4096) -> str:
    """Stronger than ``model_fingerprint`` and still cheap: sha256 over every tensor of every ``.safetensors`` file,
    its name, dtype, shape and its first and last ``sample`` bytes (~8 KiB a tensor: ~12 MB for Sa2VA-8B), so two
    bases of the same shapes differ wherever any tensor's start or end differs (a fine-tuned module differs
    throughout). Other weight files (``.bin``, ``.pt``) are hashed whole. A checkpoint that holds only the trained
    parameters (rl/checkpoints.py) records it: its frozen weights are the base's."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_path)):
        path = os.path.join(model_path, name)
        if not (os.path.isfile(path) and name.endswith(WEIGHT_SUFFIXES)):
            continue
        h.update(f"{name}\0{os.path.getsize(path)}\0".encode())
        with open(path, "rb") as f:
            if not name.endswith(".safetensors"):
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
                continue
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            h.update(json.dumps(header, sort_keys=True).encode())
            for key in sorted(k for k in header if k != "__metadata__"):
                start, end = header[key]["data_offsets"]
                for at in sorted({start, max(start, end - sample)}):
                    f.seek(8 + n + at)
                    h.update(f.read(min(sample, end - at)))
    return h.hexdigest()[:16]


def run_settings(model_path: str, task: str | None, config) -> dict:
    """The settings that define a run, as stored in each checkpoint's run_settings.json."""
    return {"model_path": os.path.realpath(model_path), "model_fingerprint": model_fingerprint(model_path),
            "weights_fingerprint": weights_fingerprint(model_path),
            "task": task, "num_generations": config.num_generations,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "learning_rate": config.learning_rate, "lr_scheduler_type": str(getattr(config.lr_scheduler_type,
                                                                                    "value", config.lr_scheduler_type)),
            "warmup_steps": config.warmup_steps, "max_steps": config.max_steps,
            "num_train_epochs": config.num_train_epochs}


def write_run_settings(checkpoint_dir: str, settings: dict) -> None:
    dump_json(settings, os.path.join(checkpoint_dir, RUN_SETTINGS), atomic=True, sort_keys=True)


def settings_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for each setting that differs (keys only one side has are left out: older versions)."""
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(new) if k in old and old[k] != new[k]]


class LearningRateChange(TrainerCallback):
    """A resume with --allow_changed_run and another --learning_rate: the restored scheduler and optimizer carry
    the old rate (HF loads scheduler.pt's base_lrs and the optimizer's param_groups); rescale them by new/old at the
    start of training (after the checkpoint is loaded), so the new rate follows the schedule from here on."""

    def __init__(self, old: float, new: float) -> None:
        self.ratio = new / old

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] *= self.ratio
                if "initial_lr" in group:
                    group["initial_lr"] *= self.ratio
        if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
            lr_scheduler.base_lrs = [lr * self.ratio for lr in lr_scheduler.base_lrs]
            if hasattr(lr_scheduler, "_last_lr") and optimizer is not None:
                lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ------------------------------------------------------------------------------------------------ resume
def _read_json(path: str, what: str, fix: str):
    if not os.path.exists(path):
        raise ResumeError(f"{path} is missing: {what}; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"{path} cannot be read ({e}): {what}; {fix}") from None


def _check_stability_state(path: str, state, fix: str) -> None:
    from sa2va_rl.rl.stability import StabilityCounters

    def bad(why: str):
        return ResumeError(f"{path}: {why}: the checkpoint's stability counters cannot be restored (they would "
                           f"start from zero); {fix}")

    if not isinstance(state, dict):
        raise bad(f"a JSON {type(state).__name__}, not an object")
    counters = state.get("counters")
    if not isinstance(counters, dict):
        raise bad("'counters' is missing or not an object")
    kinds = {f.name: f for f in fields(StabilityCounters)}
    for key, value in counters.items():
        if key not in kinds:
            raise bad(f"unknown counter {key!r}")
        expected = str(kinds[key].type)  # "int", "dict", "list" or "dict | None" (string annotations)
        ok = (isinstance(value, int) and not isinstance(value, bool) if expected == "int" else
              isinstance(value, dict) if expected == "dict" else
              isinstance(value, list) if expected == "list" else
              value is None or isinstance(value, dict))
        if not ok:
            raise bad(f"counter {key!r} is {value!r}, not {expected}")
    for key in ("grad_guard", "parts"):
        if not isinstance(state.get(key), dict):
            raise bad(f"{key!r} is missing or not an object")
    if not all(isinstance(v, dict) for v in state["parts"].values()):
        raise bad("'parts' holds a value that is not an object")
    if "weights_finite" in state and not isinstance(state["weights_finite"], bool):
        raise bad(f"'weights_finite' is {state['weights_finite']!r}, not true/false")


def check_resume(checkpoint: str, output_dir: str) -> dict:
    """The checkpoint's state files, present and well-formed; returns its trainer state."""
    from sa2va_rl.rl.spikes import SKIP_FILE
    from sa2va_rl.rl.stability import STATE_FILE

    fix = f"resume from another checkpoint (--resume_from_checkpoint {output_dir}/checkpoint-N) or start a new " \
          "--output_dir"
    trainer_state = _read_json(os.path.join(checkpoint, "trainer_state.json"), "the step count and the logs of "
                               "the run cannot be restored", fix)
    if not isinstance(trainer_state, dict) or not isinstance(trainer_state.get("global_step"), int):
        raise ResumeError(f"{os.path.join(checkpoint, 'trainer_state.json')}: no integer 'global_step'; {fix}")
    path = os.path.join(checkpoint, STATE_FILE)
    state = _read_json(path, "the checkpoint's stability counters cannot be restored (they would start from zero)",
                       fix)
    _check_stability_state(path, state, fix)
    skipped = (state["parts"].get("skipped_data") or {}).get("rows") or []
    skip_path = os.path.join(output_dir, SKIP_FILE)
    if skipped or os.path.exists(skip_path):
        saved = _read_json(skip_path, f"the checkpoint says {len(skipped)} data row(s) were skipped by rollbacks, "
                           "and rows skipped by rollbacks after it are listed only there (they would be trained on "
                           "again)", f"restore it from a backup, or start a new --output_dir")
        if not isinstance(saved, dict) or not isinstance(saved.get("rows", []), list) or \
                not all(isinstance(r, int) and not isinstance(r, bool) for r in saved.get("rows", [])):
            raise ResumeError(f"{skip_path}: 'rows' is not a list of row numbers; restore it from a backup, or "
                              "start a new --output_dir")
    return trainer_state


def check_settings(checkpoint: str, settings: dict, allow_changed: bool) -> dict:
    """The checkpoint's run settings ({} when it has none); a ResumeError naming each difference from this run's
    unless ``allow_changed`` (then a warning lists them)."""
    path = os.path.join(checkpoint, RUN_SETTINGS)
    if not os.path.exists(path):
        logger.info("%s has no %s (written by an earlier version): the run's settings are not compared", checkpoint,
                    RUN_SETTINGS)
        return {}
    old = _read_json(path, "the settings the run was started with cannot be compared", "start a new --output_dir")
    if not isinstance(old, dict):
        raise ResumeError(f"{path}: not a JSON object; start a new --output_dir")
    changes = settings_changes(old, settings)
    if changes and not allow_changed:
        raise ResumeError(f"--resume_from_checkpoint {checkpoint}: this run's settings differ from the run that "
                          f"wrote it ({'; '.join(changes)}); resume with the same settings, pass "
                          "--allow_changed_run true if the change is meant, or start a new --output_dir")
    if changes:
        logger.warning("resuming %s with changed settings (--allow_changed_run): %s", checkpoint, "; ".join(changes))
    return old
