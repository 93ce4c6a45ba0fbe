"""`sa2va-rl eval` end to end on the tiny Sa2VA and a short trained output, the scoring glue on known answers, the
[SEG] -> mask path, the judge column against the stub server, and the TensorBoard sample images."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from sa2va_rl import cli
from sa2va_rl.data.gar import GARReader
from sa2va_rl.eval.meteor import meteor_scores
from sa2va_rl.eval.metrics import meteor_backend
from sa2va_rl.eval.runner import eval_rows, predict, score
from sa2va_rl.models.policy import Generation
from sa2va_rl.models.sa2va import load_sa2va, make_policy
from sa2va_rl.rl.rewards import caption_meteor

EVAL = ["--max_samples", "3", "--max_new_tokens", "6", "--sample_images", "2"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_matplotlib_png(path):
    with Image.open(path) as im:
        assert im.info.get("Software", "").startswith("Matplotlib")
        assert np.asarray(im.convert("L")).std() > 5


@pytest.fixture(scope="module")
def trained(tiny_sa2va, gar_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trained"))
    assert cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--max_steps", "2", "--output_dir",
                     out, "--max_completion_length", "6", "--lora_r", "0", "--learning_rate", "1e-2",
                     "--report_to", "none", "--disable_tqdm", "true"]) == 0
    return out


def test_eval_trained_output_against_its_warm_start(trained, tiny_sa2va, gar_dir, tmp_path, capsys):
    out = str(tmp_path / "e")
    rc = cli.main(["eval", "--model_path", trained, "--compare", tiny_sa2va, "--data_dir", gar_dir, "--out_dir", out,
                   *EVAL])
    printed = capsys.readouterr().out
    assert rc == 0
    with open(os.path.join(out, "metrics.json")) as f:
        payload = json.load(f)
    labels = list(payload["models"])
    assert len(labels) == 2 and [payload["models"][lab]["model_path"] for lab in labels] == [trained, tiny_sa2va]
    backend = meteor_backend()
    assert payload["settings"]["meteor"]["implementation"] == backend.describe()
    assert payload["settings"]["decoding"] == "greedy"
    assert payload["settings"]["meteor_impl"] == backend.impl in ("meteor-1.5", "nltk")
    assert f"METEOR: {backend.describe()}" in printed and (backend.impl != "nltk" or "fell back" in printed)
    with open(os.path.join(out, "metrics.md")) as f:
        table = f.read()
    assert table in printed and table.startswith(f"| task | metric | {labels[0]} | {labels[1]} | difference |")
    for lab in labels:
        m = payload["models"][lab]
        assert m["mask2caption"]["n"] == 3 and m["caption2mask"]["n"] == 3
        preds = read_jsonl(os.path.join(out, f"predictions-{lab}.jsonl"))
        caps = [p for p in preds if p["task"] == "mask2caption"]
        segs = [p for p in preds if p["task"] == "caption2mask"]
        # the reported numbers are the predictions' own scores, pooled
        assert [p["meteor"] for p in caps] == caption_meteor([p["text"] for p in caps],
                                                             caption=[p["reference"] for p in caps])
        corpus, _ = meteor_scores([p["text"] for p in caps], [p["reference"] for p in caps], backend)
        assert m["mask2caption"]["METEOR"] == pytest.approx(corpus) and m["mask2caption"]["meteor_impl"] == backend.impl
        assert m["caption2mask"]["gIoU"] == pytest.approx(np.mean([p["iou"] for p in segs]))
        assert m["caption2mask"]["no_seg"] == pytest.approx(np.mean([not p["has_seg"] for p in segs]))
        assert all((p["mask_pixels"] is None) == (not p["has_seg"]) for p in segs)
        row = next(line for line in table.splitlines() if "| gIoU |" in line)
        assert f"{m['caption2mask']['gIoU']:.4f}" in row
    assert_matplotlib_png(os.path.join(out, "samples.png"))


def test_eval_is_deterministic_and_shows_the_judge(tiny_sa2va, gar_dir, tmp_path, capsys):
    """Greedy: the same checkpoint twice gives identical answers and a zero difference; --judge_url adds the
    judge's mean (stub server: every caption scores 0 -> 0.0, no failures)."""
    from tests.rl.test_judge import Stub

    stub = Stub()
    try:
        out = str(tmp_path / "e")
        rc = cli.main(["eval", "--model_path", tiny_sa2va, "--compare", tiny_sa2va, "--data_dir", gar_dir,
                       "--out_dir", out, "--task", "mask2caption", "--judge_url", stub.url, *EVAL])
    finally:
        stub.close()
    assert rc == 0
    with open(os.path.join(out, "metrics.json")) as f:
        payload = json.load(f)
    a, b = payload["models"].values()
    assert a["mask2caption"] == b["mask2caption"] and "caption2mask" not in a
    assert a["mask2caption"]["judge"] == 0.0 and a["mask2caption"]["judge_unscored"] == 0
    assert payload["settings"]["judge"].get("failed", 0) == 0
    preds = [read_jsonl(os.path.join(out, f"predictions-{lab.replace(' ', '_')}.jsonl")) for lab in payload["models"]]
    assert preds[0] == preds[1]
    # a pair is asked once: the second model's identical captions come from the cache
    assert len(stub.requests) == len({(p["text"], p["reference"]) for p in preds[0]})
    table = capsys.readouterr().out
    assert "| mask2caption | LLM judge (score/10) | 0.0000 | 0.0000 | +0.0000 |" in table


def test_predict_segments_the_seg_answers(tiny_sa2va, gar_dir):
    """A caption2mask answer with [SEG] gets a bool mask at the image's size; one without gets none."""
    model, tok = load_sa2va(tiny_sa2va)
    policy = make_policy(model, tok, tiny_sa2va)
    rows, samples = eval_rows(GARReader(gar_dir), policy, ["mask2caption", "caption2mask"], 2)
    assert [r["task"] for r in rows] == ["mask2caption", "caption2mask"] * 2
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    answers = {0: tok("a red circle").input_ids + [eos], 1: [policy.seg_id, eos], 3: tok("Sure").input_ids + [eos]}
    policy.generate = lambda model, ids, gc, guard, contexts=None: Generation(
        [answers[i] for i in range(len(ids))], [[False] * len(answers[i]) for i in range(len(ids))])
    rows = rows[:2] + rows[3:]  # mask2caption, caption2mask ([SEG]), caption2mask (no [SEG])
    answers[2] = answers.pop(3)
    preds = predict(model, policy, rows)
    assert preds[0]["text"] == "a red circle" and preds[0]["mask"] is None
    s = samples[rows[1]["source"]]
    assert preds[1]["text"] == "[SEG]" and preds[1]["has_seg"] and preds[1]["mask"].dtype == bool and preds[1]["mask"].shape == s.mask.shape
    assert not preds[2]["has_seg"] and preds[2]["mask"] is None
    m = score(preds, samples, meteor_backend())
    assert m["caption2mask"]["n"] == 2 and m["caption2mask"]["no_seg"] == 0.5
    assert m["mask2caption"]["n"] == 1


def test_eval_usage_errors(tiny_sa2va, gar_dir, tmp_path, capsys):
    assert cli.main(["eval", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--task", "boxes"]) == cli.EXIT_USAGE
    assert "mask2caption, caption2mask or both" in capsys.readouterr().err
    assert cli.main(["eval", "--model_path", str(tmp_path), "--data_dir", gar_dir]) == cli.EXIT_USAGE
    assert "has no config.json" in capsys.readouterr().err
    ckpt = tmp_path / "checkpoint-2"  # a training checkpoint (rl/checkpoints.py): named as such, not "no config"
    ckpt.mkdir()
    (ckpt / "trainable.safetensors").write_bytes(b"")
    assert cli.main(["eval", "--model_path", str(ckpt), "--data_dir", gar_dir]) == cli.EXIT_USAGE
    assert "is a training checkpoint: it holds only the trained parameters" in capsys.readouterr().err
    out = tmp_path / "e"
    assert cli.main(["eval", "--model_path", tiny_sa2va, "--data_dir", str(tmp_path), "--out_dir", str(out)]) == \
        cli.EXIT_DATA
    assert "no GAR files" in capsys.readouterr().err and not out.exists()  # nothing written on failure


def test_train_with_tensorboard_logs_sample_images(tiny_sa2va, gar_dir, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = str(tmp_path / "tb")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", logs)  # transformers 5's TensorBoardCallback writes there
    assert cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--max_steps", "1", "--output_dir",
                     str(tmp_path / "o"), "--max_completion_length", "4", "--lora_r", "4", "--lora_alpha", "8",
                     "--report_to", "tensorboard", "--disable_tqdm", "true"]) == 0
    acc = EventAccumulator(logs, size_guidance={"images": 0})
    acc.Reload()
    assert "samples" in acc.Tags()["images"]
    events = acc.Images("samples")
    assert [e.step for e in events] == [1] and events[0].width >= 600
    assert "train/loss" in acc.Tags()["scalars"] and len(os.listdir(logs)) == 1  # one event file: the trainer's
