"""Issue H's failure table (and issue O's eval rows), one row each: the input, the exit code, and what the message
must name. Rows that need a whole run (signals, I/O errors, locks, resume, seeds, fp16) or a stub judge server are
exercised in the tests named in ``ELSEWHERE``; this file checks that each of those still exists, so the table
cannot silently lose a row."""

import importlib
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sa2va_rl import cli
from sa2va_rl.data.synthetic import synthetic_row, write_arrow
from sa2va_rl.jsonio import loads_strict


def _rows(n=4):
    return [synthetic_row(random.Random(i)) for i in range(n)]


def _truncated_arrow(d):
    path = d / "data-00000-of-00001.arrow"
    write_arrow(str(path), _rows(8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ["data-00000-of-00001.arrow: cannot be read", "truncated"]


def _mistyped_column(d):
    pq.write_table(pa.Table.from_pylist([dict(r, image=7) for r in _rows()]), d / "x.parquet")
    return ["x.parquet: column 'image' has type int64"]


def _missing_column(d):
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "mask_rle"} for r in _rows()]),
                   d / "x.parquet")
    return ["x.parquet: column(s) ['mask_rle'] missing"]


def _non_utf8_jsonl(d):
    (d / "x.jsonl").write_bytes(b'{"a": 1}\n{"caption": "caf\xe9"}\n')
    return ["x.jsonl: line 2: not UTF-8"]


def _bad_jsonl_line(d):
    (d / "x.jsonl").write_text("\n" + json.dumps({"a": 1}) + "\n\n{not json\n")
    return ["x.jsonl: row 1 (line 4)", "not valid JSON"]


def _every_row_bad(d):
    write_arrow(str(d / "x.arrow"), [dict(r, image={"bytes": b"not an image", "path": None}) for r in _rows()])
    return ["every one of the 4 rows is bad", "4 row(s) with a bad 'image'"]


GAR_ROWS = {  # GAR data, Sa2VA model: exit 3 with file (and row/line, field) named
    "truncated .arrow shard": _truncated_arrow,
    "mistyped column": _mistyped_column,
    "mask_rle column missing": _missing_column,
    "non-UTF8 jsonl": _non_utf8_jsonl,
    "jsonl bad line 4 (row vs line)": _bad_jsonl_line,
    "every row bad, default skip": _every_row_bad,
}


@pytest.mark.parametrize("row", list(GAR_ROWS))
def test_bad_gar_data_is_exit_3_and_named(row, tiny_sa2va, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    expected = GAR_ROWS[row](d)
    rc = cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", str(d), "--output_dir", str(tmp_path / "o"),
                   "--max_steps", "1", "--max_completion_length", "4", "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_DATA, err
    for text in expected:
        assert text in err, (text, err)
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_bad_prompt_line_is_exit_3_with_file_and_line(tiny_causal, tmp_path, capsys):
    d = tmp_path / "p"
    d.mkdir()
    lines = [json.dumps({"prompt": "a", "solution": "b"}), json.dumps({"prompt": ""})]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    rc = cli.main(["train", "--model_path", tiny_causal, "--data_dir", str(d), "--output_dir", str(tmp_path / "o"),
                   "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_DATA and f"{d / 'train.jsonl'}:2:" in err and "prompt" in err, err


def _eval_out_dir_is_a_file(tmp_path, monkeypatch):
    out = tmp_path / "metrics.txt"
    out.write_text("keep me")
    return {"out": out, "argv": [], "code": cli.EXIT_USAGE,
            "says": [f"out_dir '{out}' is a file", "pass a directory for --out_dir"],
            "after": lambda: out.read_text() == "keep me"}


def _eval_out_dir_locked(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    from sa2va_rl.rl.run_lock import LOCK

    out = tmp_path / "e"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # the first eval's
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (out / LOCK).write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "started": "earlier"}))

    def after():
        owner.kill()
        owner.wait()
        return (out / "metrics.json").read_text() == "{}" and (out / LOCK).exists()

    return {"out": out, "argv": [], "code": cli.EXIT_USAGE,
            "says": [f"is in use by pid {owner.pid}", "two evals into one --out_dir", "pass another --out_dir"],
            "after": after}


def _eval_sigint(tmp_path, monkeypatch):
    """SIGINT arrives while the first batch is answered (the progress bar's first update raises it)."""
    import signal

    import tqdm.auto

    from sa2va_rl.rl.run_lock import LOCK

    class Bar(tqdm.auto.tqdm):
        def update(self, n=1):
            out = super().update(n)
            if str(self.desc).startswith("eval ") and self.n == n:  # eval's bar (not the weight-loading one)
                signal.raise_signal(signal.SIGINT)
            return out

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    out = tmp_path / "e"

    def after():
        (partial,) = [p for p in os.listdir(out) if p.endswith(".partial.jsonl")]
        with open(out / partial) as f:
            rows = [loads_strict(line) for line in f]
        return len(rows) == 2 and sorted(os.listdir(out)) == [partial] and not (out / LOCK).exists()

    return {"out": out, "argv": ["--batch_size", "2"], "code": 130,
            "says": ["stopped by SIGINT: the answers so far (2 of 6 for", ".partial.jsonl", "no metrics written"],
            "after": after}


def _eval_judge_always_fails(tmp_path, monkeypatch):
    out = tmp_path / "e"

    def after():
        with open(out / "metrics.json") as f:
            payload = loads_strict(f.read())
        (m,) = payload["models"].values()
        return (m["mask2caption"]["judge"] is None and m["mask2caption"]["judge_unscored"] == 3
                and payload["settings"]["judge"]["failed"] >= 1)

    return {"out": out, "argv": ["--task", "mask2caption", "--judge_url", "http://127.0.0.1:9/v1",  # nothing there
                                 "--judge_retries", "0", "--judge_timeout", "5"],
            "code": cli.EXIT_OK, "says": [], "stdout": ["| mask2caption | LLM judge (score/10) | - |",
                                                         "| mask2caption | judge: no score (failed calls) | 3 |"],
            "after": after}


EVAL_ROWS = {  # sa2va-rl eval: exit code, what stderr/stdout say, and what is left in --out_dir
    "eval --out_dir naming a file (exit 2 before any evaluation)": _eval_out_dir_is_a_file,
    "two evals into one --out_dir (the second refused by the lock)": _eval_out_dir_locked,
    "SIGINT during eval (exit 130, partial predictions kept)": _eval_sigint,
    "every judge call fails (judge null, failures counted)": _eval_judge_always_fails,
}


@pytest.mark.parametrize("row", list(EVAL_ROWS))
def test_eval_failure_rows(row, tiny_sa2va, gar_dir, tmp_path, monkeypatch, capsys):
    case = EVAL_ROWS[row](tmp_path, monkeypatch)
    rc = cli.main(["eval", "--model_path", tiny_sa2va, "--data_dir", gar_dir, "--out_dir", str(case["out"]),
                   "--max_samples", "3", "--max_new_tokens", "4", "--sample_images", "0", *case["argv"]])
    captured = capsys.readouterr()
    assert rc == case["code"], captured.err
    for text in case["says"]:
        assert text in captured.err, (text, captured.err)
    for text in case.get("stdout", []):
        assert text in captured.out, (text, captured.out)
    assert "Traceback" not in captured.err
    assert case["after"](), os.listdir(case["out"]) if os.path.isdir(case["out"]) else case["out"]


RUN_ARGS = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--batch_size", "2",
            "--num_generations", "4", "--max_completion_length", "4", "--learning_rate", "1e-2",
            "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--report_to", "none", "--disable_tqdm", "true",
            "--seed", "0"]


@pytest.fixture(scope="module")
def finished_run(tiny_causal, prompt_dir, tmp_path_factory):
    """A finished 2-step causal run with checkpoint-1 and checkpoint-2 (each with run_settings.json)."""
    out = tmp_path_factory.mktemp("finished") / "o"
    assert cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", str(out),
                     *RUN_ARGS]) == 0
    return out


def _snapshot(root):
    """Every file under ``root`` with its size and mtime: a row that must write nothing leaves it equal."""
    return {os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(root) for f in files}


def _copy_run(ctx):
    import shutil

    out = ctx["tmp"] / "o"
    shutil.copytree(ctx["finished"], out)
    return out


def _out_is_model(ctx):
    return {"model": ctx["model"], "out": ctx["model"], "code": cli.EXIT_USAGE,
            "says": [f"--output_dir {ctx['model']!r} is the model directory --model_path {ctx['model']!r}",
                     "would overwrite its input model"], "keep": ctx["model"]}


def _out_inside_model(ctx):
    out = os.path.join(ctx["model"], "run")
    return {"model": ctx["model"], "out": out, "code": cli.EXIT_USAGE,
            "says": [f"--output_dir {out!r} is inside the model directory --model_path {ctx['model']!r}"],
            "keep": ctx["model"]}


def _model_in_output_checkpoint(ctx):
    out = _copy_run(ctx)
    model = str(out / "checkpoint-1")  # rotation or the run's own checkpoint-1 would replace it
    return {"model": model, "out": str(out), "code": cli.EXIT_USAGE,
            "says": ["contains the model where saving or checkpoint rotation would overwrite it", model],
            "keep": str(out)}


def _out_is_root(ctx):
    return {"model": ctx["model"], "out": "/", "code": cli.EXIT_USAGE,
            "says": ["--output_dir '/' is the filesystem root", "pass a new directory"], "keep": ctx["model"]}


def _out_is_home(ctx):
    home = ctx["tmp"] / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine\n")
    ctx["monkeypatch"].setenv("HOME", str(home))
    return {"model": ctx["model"], "out": str(home), "code": cli.EXIT_USAGE,
            "says": [f"--output_dir {str(home)!r} is the home directory"], "keep": str(home)}


def _out_is_someone_elses(ctx):
    out = ctx["tmp"] / "photos"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "holiday.jpg").write_bytes(b"\xff\xd8")
    return {"model": ctx["model"], "out": str(out), "code": cli.EXIT_USAGE,
            "says": ["is a non-empty directory that is not a sa2va-rl run (config.json, holiday.jpg)",
                     "pass an empty or new directory"], "keep": str(out)}


def _resume_finished(ctx):
    out = _copy_run(ctx)
    return {"out": str(out), "argv": ["--resume_from_checkpoint", "latest"], "code": cli.EXIT_OK,
            "stdout": ["run already finished at step 2", "nothing to do"], "keep": str(out)}


def _resume_state(mutate, says):
    def row(ctx):
        out = _copy_run(ctx)
        ckpt = out / "checkpoint-1"
        mutate(out, ckpt)
        return {"out": str(out), "argv": ["--resume_from_checkpoint", str(ckpt)], "code": cli.EXIT_USAGE,
                "says": [t.format(ckpt=ckpt, out=out) for t in says], "keep": str(out)}
    return row


def _edit_state(edit):
    def mutate(out, ckpt):
        path = ckpt / "stability_state.json"
        state = json.loads(path.read_text())
        edit(state)
        path.write_text(json.dumps(state))
    return mutate


def _skipped_rows(state):
    state["parts"]["skipped_data"]["rows"] = [1, 2]


def _changed(argv, says, ok=False):
    def row(ctx):
        out = _copy_run(ctx)
        return {"out": str(out), "argv": ["--resume_from_checkpoint", str(out / "checkpoint-1"), *argv],
                "code": cli.EXIT_USAGE, "says": says, "keep": str(out)}
    return row


def _never_loaded(ctx):
    """The model must not load (the row is decided from config.json and the weight headers)."""
    from transformers import AutoModelForCausalLM

    def load(*a, **k):
        raise AssertionError("the model was loaded before the limits were checked")

    ctx["monkeypatch"].setattr(AutoModelForCausalLM, "from_pretrained", load)


def _too_many_generations(ctx):
    from sa2va_rl import plan

    _never_loaded(ctx)
    ctx["monkeypatch"].setattr(plan, "device_memory", lambda: (8 * plan.GiB, "the test's device (8 GiB)"))
    return {"out": str(ctx["tmp"] / "o"), "argv": ["--num_generations", "100000"], "code": cli.EXIT_USAGE,
            "says": ["the estimated memory per device", "(at --num_generations 100000, --batch_size 2",
                     "is more than the test's device (8 GiB) allows", "the largest --num_generations that fits is",
                     "--memory_check false"], "keep": ctx["model"]}


def _completion_past_context(ctx):
    _never_loaded(ctx)
    return {"out": str(ctx["tmp"] / "o"), "argv": ["--max_completion_length", "1000000000"], "code": cli.EXIT_USAGE,
            "says": ["--max_completion_length 1000000000: the longest prompt (", "over the model's context of 2048",
                     "the largest --max_completion_length that fits is 20"], "keep": ctx["model"]}


TRAIN_ROWS = {  # sa2va-rl train, issue O: nothing lost; exit code, what is said, and nothing written
    "--num_generations 100000 (exit 2 before loading, the largest G named)": _too_many_generations,
    "--max_completion_length 1000000000 (exit 2 before loading, the context named)": _completion_past_context,
    "--output_dir is --model_path (exit 2 before loading)": _out_is_model,
    "--output_dir inside --model_path": _out_inside_model,
    "--model_path is a checkpoint inside --output_dir": _model_in_output_checkpoint,
    "--output_dir /": _out_is_root,
    "--output_dir the home directory": _out_is_home,
    "--output_dir non-empty, not a run": _out_is_someone_elses,
    "resume latest on a finished run (exit 0, nothing trained or written)": _resume_finished,
    "resume: stability_state.json deleted": _resume_state(
        lambda out, ckpt: (ckpt / "stability_state.json").unlink(),
        ["{ckpt}/stability_state.json is missing", "stability counters cannot be restored"]),
    "resume: stability_state.json not JSON": _resume_state(
        lambda out, ckpt: (ckpt / "stability_state.json").write_text("{\"counters\": {"),
        ["{ckpt}/stability_state.json cannot be read", "Expecting"]),
    "resume: stability_state.json wrong types": _resume_state(
        _edit_state(lambda s: s["counters"].update(steps="1")),
        ["{ckpt}/stability_state.json: counter 'steps' is '1', not int"]),
    "resume: skipped_rows.json deleted while rows were skipped": _resume_state(
        _edit_state(_skipped_rows), ["{out}/skipped_rows.json is missing", "2 data row(s) were skipped"]),
    "resume: trainer_state.json deleted": _resume_state(
        lambda out, ckpt: (ckpt / "trainer_state.json").unlink(), ["{ckpt}/trainer_state.json is missing"]),
    "resume with another learning rate and num_generations (each named)": _changed(
        ["--learning_rate", "2e-2", "--num_generations", "2"],
        ["settings differ from the run that wrote it", "learning_rate: 0.01 -> 0.02", "num_generations: 4 -> 2",
         "--allow_changed_run true"]),
    "resume with another max_steps": _changed(["--max_steps", "5"], ["max_steps: 2 -> 5"]),
}


@pytest.mark.parametrize("row", list(TRAIN_ROWS))
def test_train_nothing_lost_rows(row, tiny_causal, prompt_dir, finished_run, tmp_path, monkeypatch, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_causal, model)
    ctx = {"tmp": tmp_path, "model": str(model), "finished": finished_run, "monkeypatch": monkeypatch}
    case = TRAIN_ROWS[row](ctx)
    argv = [a for a in RUN_ARGS]
    for flag, value in zip(case.get("argv", [])[::2], case.get("argv", [])[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    before = _snapshot(case["keep"]) if case["keep"] != "/" else None
    rc = cli.main(["train", "--model_path", case.get("model", tiny_causal), "--data_dir", prompt_dir,
                   "--output_dir", case["out"], *argv])
    captured = capsys.readouterr()
    assert rc == case["code"], captured.err
    for text in case.get("says", []):
        assert text in captured.err, (text, captured.err)
    for text in case.get("stdout", []):
        assert text in captured.out, (text, captured.out)
    assert "Traceback" not in captured.err
    assert _snapshot(case["keep"]) == before  # nothing written, nothing replaced


def test_run_settings_are_in_each_checkpoint(finished_run):
    for step in (1, 2):
        with open(finished_run / f"checkpoint-{step}" / "run_settings.json") as f:
            settings = loads_strict(f.read())
        assert settings["learning_rate"] == 1e-2 and settings["max_steps"] == 2 and settings["num_generations"] == 4
        assert len(settings["model_fingerprint"]) == 16 and settings["lr_scheduler_type"] == "constant"


def test_allowed_change_warns_and_the_new_learning_rate_applies(tiny_causal, prompt_dir, finished_run, tmp_path,
                                                                 caplog):
    import shutil

    out = tmp_path / "o"
    shutil.copytree(finished_run, out)
    argv = [a if a != "1e-2" else "3e-2" for a in RUN_ARGS]
    with caplog.at_level("WARNING"):
        rc = cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", str(out),
                       *argv, "--resume_from_checkpoint", str(out / "checkpoint-1"), "--allow_changed_run", "true"])
    assert rc == 0
    assert "changed settings (--allow_changed_run): learning_rate: 0.01 -> 0.03" in caplog.text
    with open(out / "checkpoint-2" / "trainer_state.json") as f:
        logs = json.load(f)["log_history"]
    lrs = {e["step"]: e["learning_rate"] for e in logs if "learning_rate" in e}
    assert lrs[1] == pytest.approx(1e-2) and lrs[2] == pytest.approx(3e-2), lrs
    with open(out / "checkpoint-2" / "run_settings.json") as f:
        assert json.load(f)["learning_rate"] == 3e-2


@pytest.mark.parametrize("kind", ["sa2va model, prompt data", "causal model, GAR data"])
def test_data_of_the_other_kind_is_named_before_loading(kind, tiny_sa2va, tiny_causal, prompt_dir, gar_dir,
                                                        tmp_path, capsys):
    model, data, says = ((tiny_sa2va, prompt_dir, "prompt data (rows of 'prompt' and 'solution', for a causal LM)")
                         if kind.startswith("sa2va") else
                         (tiny_causal, gar_dir, "GAR data (image, region mask, caption files), not prompt data"))
    rc = cli.main(["train", "--model_path", model, "--data_dir", data, "--output_dir", str(tmp_path / "o"),
                   "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_DATA and says in err and "Traceback" not in err, err


def test_doctor_names_an_empty_model_dir_and_prompt_data_for_sa2va(tiny_sa2va, prompt_dir, tmp_path):
    from sa2va_rl.doctor import run_doctor

    lines: list[str] = []
    assert run_doctor(str(tmp_path), None, out=lines.append) == 1
    text = "\n".join(lines)
    assert f"--model_path {str(tmp_path)!r} has no config.json" in text and "sentencepiece" not in text, text
    lines.clear()
    assert run_doctor(tiny_sa2va, prompt_dir, out=lines.append) == 1
    text = "\n".join(lines)
    assert "prompt data (rows of 'prompt' and 'solution', for a causal LM)" in text, text
    assert "--bad_rows skip" not in text and "point --data_dir at a GAR directory" in text, text


ELSEWHERE = {  # table row -> the test that runs it end to end (exit code, names, nothing lost)
    "16-bit / palette / CMYK / LA / EXIF images":
        "tests.data.test_gar_inputs:test_image_modes_decode_to_the_right_8_bit_values",
"a 10,000-word caption (prompt over max_prompt_tokens)":
        "tests.rl.test_sa2va_trainer:test_runaway_caption_prompt_is_skipped_and_counted",
    "demo output: readable lines, no raw metric dicts":
        "tests.test_demo_learning:test_demo_learns_the_held_out_colours_and_shapes",
    "EXIF orientation": "tests.data.test_gar_inputs:test_exif_rotated_image_follows_its_mask",
    "any per-row failure skipped and counted":
        "tests.data.test_gar_inputs:test_any_row_failure_is_skipped_counted_and_named",
    "YAML error, lr <= 0, max_steps 0, --task on a causal model":
        "tests.test_cli_errors:test_usage_errors_name_the_field",
    "corrupted or truncated model.safetensors": "tests.test_cli_errors:test_truncated_weights_named_before_loading",
    "remote-code causal model without the flag": "tests.test_cli_errors:test_remote_code_causal_model_needs_the_flag",
    "resume with another LoRA rank / model kind":
        "tests.test_cli_errors:test_resume_with_another_lora_rank_or_model_is_named_before_training",
    "resume with another number of processes":
        "tests.test_cli_errors:test_resume_with_another_world_size_is_named_before_training",
    "same seed, same weights (causal)": "tests.test_cli_errors:test_same_seed_same_weights_causal",
    "same seed, same weights (Sa2VA, LoRA init included)": "tests.rl.test_sa2va_trainer:test_same_seed_same_weights",
    "full disk / EIO / EACCES": "tests.rl.test_io_errors:test_io_error_exits_6_keeps_the_last_checkpoint_and_resumes",
    "output dir not writable": "tests.rl.test_io_errors:test_unwritable_output_dir_is_exit_6_before_training",
    "--fp16 on CPU": "tests.rl.test_io_errors:test_fp16_summary_says_the_grad_guard_is_off",
    "two runs on one output_dir": "tests.rl.test_run_lock:test_second_run_refuses_and_leaves_the_first_runs_staging",
    "stale lock of a dead run": "tests.rl.test_run_lock:test_dead_owners_lock_is_taken_over_and_released",
    "SIGINT / SIGTERM": "tests.rl.test_signals:test_signal_saves_a_checkpoint_stops_cleanly_and_resumes",
    "judge redirects to another origin (no request, no key, reaches it)":
        "tests.rl.test_judge:test_no_redirect_is_followed_and_the_key_goes_nowhere_else",
    "judge trickles its reply past --judge_timeout": "tests.rl.test_judge:test_one_deadline_cuts_a_trickled_reply",
    "judge replies 50 MB": "tests.rl.test_judge:test_a_huge_reply_is_not_read_whole",
    "judge reply off the one answer format (10/10 but 2, 1e309, two scores)":
        "tests.rl.test_judge:test_replies_off_the_format_are_no_score_and_counted",
    "caption injecting instructions / closing its delimiter":
        "tests.rl.test_judge:test_caption_is_escaped_data_between_its_delimiters",
    "NaN/inf in a written JSON file (strict JSON, null)":
        "tests.test_strict_json:test_trainer_state_json_keeps_null_for_non_finite_log_values",
}


@pytest.mark.parametrize("row", list(ELSEWHERE))
def test_every_other_row_has_its_test(row):
    module, name = ELSEWHERE[row].split(":")
    assert callable(getattr(importlib.import_module(module), name, None)), f"{row}: {ELSEWHERE[row]} is gone"


def test_a_model_in_its_own_folder_under_output_dir_is_left_alone(tmp_path):
    from sa2va_rl.rl.resume_checks import output_dir_problem

    model = tmp_path / "out" / "base"
    model.mkdir(parents=True)
    assert output_dir_problem(str(tmp_path / "out"), str(model)) is None  # saving writes beside it, never into it
    assert "is the model directory" in output_dir_problem(str(tmp_path / "out") + "/", str(tmp_path / "out"))


@pytest.mark.parametrize("broken", ["stability_state.json deleted", "trainer_state.json not JSON"])
def test_library_resume_names_the_broken_state_file_before_training(broken, tiny_causal, prompt_dir, finished_run,
                                                                     tmp_path):
    """Trainer.train(resume_from_checkpoint=...) checks the checkpoint as the CLI does: never a silent reset."""
    import shutil

    from sa2va_rl.rl.resume_checks import ResumeError
    from tests.rl.test_trainer import make_trainer

    out = tmp_path / "o"
    shutil.copytree(finished_run, out)
    ckpt = out / "checkpoint-1"
    if broken.startswith("stability"):
        (ckpt / "stability_state.json").unlink()
    else:
        (ckpt / "trainer_state.json").write_text("{\"global_step\": ")
    trainer = make_trainer(tiny_causal, prompt_dir, out, max_steps=2)
    before = _snapshot(out)
    with pytest.raises(ResumeError, match=str(ckpt / broken.split()[0])):
        trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 0 and _snapshot(out) == before
