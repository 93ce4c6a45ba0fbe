"""Strict JSON (issue O, item 1): every file sa2va-rl writes parses with a parser that refuses NaN / Infinity, with
non-finite values written as null; HF's trainer_state.json included (the log values it keeps are made null)."""

import json
import math
import os

import numpy as np
import pytest
import torch

from sa2va_rl.jsonio import dump_json, dump_jsonl, dumps_strict, loads_strict, sanitize

NAN, INF = float("nan"), float("inf")


def read_strict(path):
    with open(path) as f:
        return loads_strict(f.read())


def test_the_strict_parser_refuses_what_json_dump_writes_by_default():
    with pytest.raises(ValueError, match="not strict JSON: NaN"):
        loads_strict(json.dumps({"a": NAN}))


def test_helper_writes_null_for_every_non_finite_kind(tmp_path):
    obj = {"nan": NAN, "inf": INF, "ninf": -INF, "ok": 1.5, "np": np.float32("nan"), "np_ok": np.int64(3),
           "arr": np.array([1.0, np.inf]), "t": torch.tensor(float("nan")), "nested": [(NAN, {"x": [INF]})],
           "flag": True, "none": None}
    expected = {"nan": None, "inf": None, "ninf": None, "ok": 1.5, "np": None, "np_ok": 3, "arr": [1.0, None],
                "t": None, "nested": [[None, {"x": [None]}]], "flag": True, "none": None}
    assert sanitize(obj) == expected and loads_strict(dumps_strict(obj)) == expected
    assert math.isnan(obj["nan"])  # the input is not modified
    dump_json(obj, str(tmp_path / "a.json"))
    assert read_strict(tmp_path / "a.json") == expected
    dump_jsonl([{"v": NAN}, {"v": 2}], str(tmp_path / "b.jsonl"))
    with open(tmp_path / "b.jsonl") as f:
        assert [loads_strict(line) for line in f] == [{"v": None}, {"v": 2}]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]  # atomic writes leave no temp file
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o666 & ~umask  # as open() would, not mkstemp's 0o600


def test_stability_report_and_state_are_strict_and_load_back(tmp_path):
    from sa2va_rl.rl.stability import STATE_FILE, StabilityCallback

    cb = StabilityCallback()
    cb.record_event({"step": 3, "kind": "spike", "value": INF, "mean": NAN})
    cb.extras["judge"] = lambda: {"mean": NAN}
    cb.write_report(str(tmp_path), None)
    report = read_strict(tmp_path / "stability.json")
    assert report["events"][-1] == {"step": 3, "kind": "spike", "value": None, "mean": None}
    assert report["judge"] == {"mean": None}
    cb.save(str(tmp_path))
    read_strict(tmp_path / STATE_FILE)
    again = StabilityCallback()
    assert again.load(str(tmp_path)) and again.counters.events[-1]["value"] is None


def test_eval_writers_are_strict(tmp_path):
    """metrics.json and predictions-*.jsonl go through the helper; a judge that scored nothing is null."""
    from sa2va_rl.eval.metrics import meteor_backend
    from sa2va_rl.eval.runner import _jsonable, score

    class NoJudge:
        def score(self, hyps, refs):
            return [None] * len(hyps)

    preds = [{"source": "s", "task": "mask2caption", "reference": "a red circle", "text": "a red circle",
              "has_seg": False, "mask": None}]
    m = score(preds, {}, meteor_backend(), NoJudge())
    assert m["mask2caption"]["judge"] is None and m["mask2caption"]["judge_unscored"] == 1
    preds[0]["meteor"] = NAN
    dump_jsonl([_jsonable(p) for p in preds], str(tmp_path / "p.jsonl"))
    with open(tmp_path / "p.jsonl") as f:
        assert loads_strict(f.readline())["meteor"] is None


def test_run_lock_file_is_strict(tmp_path):
    from sa2va_rl.rl.run_lock import LOCK, RunLock

    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert read_strict(tmp_path / LOCK)["pid"] == os.getpid()
    lock.release()


def test_trainer_state_json_keeps_null_for_non_finite_log_values(tiny_causal, prompt_dir, tmp_path):
    """A NaN gradient step (skipped) with a checkpoint: trainer_state.json, stability_state.json and
    stability.json parse strictly; a non-finite value handed to log() is null in log_history (and so in
    trainer_state.json), while the callbacks saw it as it was."""
    from transformers import TrainerCallback

    from tests.rl.test_trainer import make_trainer, nan_grad_at

    seen = []

    class Seen(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs or {}))

    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=2, save_strategy="steps", save_steps=2,
                           logging_steps=1)
    nan_grad_at(trainer, {2})
    trainer.add_callback(Seen())
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    for path in (ckpt / "trainer_state.json", ckpt / "stability_state.json", tmp_path / "stability.json"):
        read_strict(path)
    skipped = next(h for h in read_strict(ckpt / "trainer_state.json")["log_history"] if h["step"] == 2)
    assert skipped["grad_norm"] is None  # HF logged the skipped step's NaN norm (written as bare NaN before)
    trainer.model.train()
    trainer.log({"loss": NAN, "grad_norm": INF})
    assert trainer.state.log_history[-1]["loss"] is None and trainer.state.log_history[-1]["grad_norm"] is None
    assert math.isnan(seen[-1]["loss"])  # TensorBoard & co. still get the NaN
    trainer.state.save_to_json(str(tmp_path / "state.json"))
    assert read_strict(tmp_path / "state.json")["log_history"][-1]["grad_norm"] is None
