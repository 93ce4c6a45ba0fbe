"""Bad input gets exit 2 (usage) with the field or file:line named, before any model loads (part of issue H)."""

import pytest

from sa2va_rl import cli


def _bad_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 1e-5\nmax_steps: [3\n")
    return ["--config", str(path)], f"{path}:3:1: not valid YAML"


ROWS = {
    "yaml syntax error": _bad_yaml,
    "negative learning rate": lambda _: (["--learning_rate", "-1e-5"], "learning_rate=-1e-05: use a positive rate"),
    "zero learning rate": lambda _: (["--learning_rate", "0"], "learning_rate=0.0: use a positive rate"),
    "zero max_steps": lambda _: (["--max_steps", "0"], "max_steps=0: use a positive number"),
    "--task with a causal model": lambda _: (["--task", "both"], "--task both: "),
    "max_grad_norm 0 (guard off)": lambda _: (["--max_grad_norm", "0"], "max_grad_norm=0.0: transformers calls"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_usage_errors_name_the_field(row, tiny_causal, prompt_dir, tmp_path, capsys):
    flags, message = ROWS[row](tmp_path)
    rc = cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir",
                   str(tmp_path / "o"), "--report_to", "none", *flags])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and message in err, err
    assert not (tmp_path / "o" / "stability.json").exists()  # nothing ran


def test_every_row_bad_is_exit_3_with_the_count(tiny_sa2va, tmp_path, capsys):
    import random

    from sa2va_rl.data.synthetic import synthetic_row, write_arrow

    rows = [dict(synthetic_row(random.Random(i)), image={"bytes": b"not an image", "path": None}) for i in range(4)]
    write_arrow(str(tmp_path / "d" / "x.arrow"), rows)
    rc = cli.main(["train", "--model_path", tiny_sa2va, "--data_dir", str(tmp_path / "d"), "--output_dir",
                   str(tmp_path / "o"), "--max_steps", "1", "--max_completion_length", "4", "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_DATA and "every one of the 4 rows is bad" in err and "4 row(s) with a bad 'image'" in err, err


@pytest.mark.parametrize("kind", ["causal", "sa2va"])
def test_truncated_weights_named_before_loading(kind, tiny_causal, tiny_sa2va, gar_dir, prompt_dir, tmp_path, capsys):
    import os
    import shutil

    src, data = (tiny_causal, prompt_dir) if kind == "causal" else (tiny_sa2va, gar_dir)
    model = tmp_path / "m"
    shutil.copytree(src, model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    rc = cli.main(["train", "--model_path", str(model), "--data_dir", data, "--output_dir", str(tmp_path / "o"),
                   "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and f"{weights}: truncated" in err, err


def test_resume_with_another_lora_rank_or_model_is_named_before_training(tiny_sa2va, tiny_causal, gar_dir, prompt_dir,
                                                                          tmp_path, capsys):
    out = str(tmp_path / "o")
    common = ["--data_dir", gar_dir, "--output_dir", out, "--max_completion_length", "4", "--report_to", "none",
              "--disable_tqdm", "true", "--save_steps", "1"]
    assert cli.main(["train", "--model_path", tiny_sa2va, *common, "--max_steps", "1", "--lora_r", "4",
                     "--lora_alpha", "8"]) == 0
    capsys.readouterr()
    rc = cli.main(["train", "--model_path", tiny_sa2va, *common, "--max_steps", "2", "--lora_r", "8", "--lora_alpha",
                   "16", "--resume_from_checkpoint", "latest", "--allow_changed_run", "true"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "differ in shape" in err and "lora_A" in err and "checkpoint [4, " in err, err
    rc = cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", out,
                   "--report_to", "none", "--max_steps", "2", "--resume_from_checkpoint", "latest",
                   "--allow_changed_run", "true"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "this model does not have" in err, err


def test_resume_with_another_world_size_is_named_before_training(tiny_causal, prompt_dir, tmp_path, capsys):
    import json

    out = tmp_path / "o"
    common = ["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", str(out),
              "--report_to", "none", "--disable_tqdm", "true", "--max_completion_length", "4", "--save_steps", "1"]
    assert cli.main([*common, "--max_steps", "1"]) == 0
    state = out / "checkpoint-1" / "stability_state.json"
    saved = json.loads(state.read_text())
    assert saved["world_size"] == 1  # recorded by the run that wrote it
    state.write_text(json.dumps(dict(saved, world_size=2)))  # as if 2 processes had written it
    capsys.readouterr()
    rc = cli.main([*common, "--max_steps", "2", "--resume_from_checkpoint", "latest", "--allow_changed_run", "true"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "2 process(es) wrote it, this run has 1" in err, err
    assert not (out / "checkpoint-2").exists()


def test_remote_code_causal_model_needs_the_flag(tiny_causal, prompt_dir, tmp_path, capsys):
    import json
    import shutil

    model = tmp_path / "m"
    shutil.copytree(tiny_causal, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    rc = cli.main(["train", "--model_path", str(model), "--data_dir", prompt_dir, "--output_dir", str(tmp_path / "o"),
                   "--report_to", "none"])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "Pass --trust_remote_code" in err and "Traceback" not in err, err


def test_same_seed_same_weights_causal(tiny_causal, prompt_dir, tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", str(out),
                         "--max_steps", "2", "--batch_size", "2", "--num_generations", "2", "--max_completion_length",
                         "4", "--report_to", "none", "--disable_tqdm", "true", "--seed", "5"]) == 0
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
