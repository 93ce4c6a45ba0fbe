"""Issue H's failure table, one row each: the input, the exit code, and what the message must name. Rows that need
a whole run (signals, I/O errors, locks, resume, seeds, fp16) are exercised in the tests named in ``ELSEWHERE``;
this file checks that each of those still exists, so the table cannot silently lose a row."""

import importlib
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sa2va_rl import cli
from sa2va_rl.data.synthetic import synthetic_row, write_arrow


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
}


@pytest.mark.parametrize("row", list(ELSEWHERE))
def test_every_other_row_has_its_test(row):
    module, name = ELSEWHERE[row].split(":")
    assert callable(getattr(importlib.import_module(module), name, None)), f"{row}: {ELSEWHERE[row]} is gone"
