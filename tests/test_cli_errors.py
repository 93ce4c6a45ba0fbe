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
}


@pytest.mark.parametrize("row", list(ROWS))
def test_usage_errors_name_the_field(row, tiny_causal, prompt_dir, tmp_path, capsys):
    flags, message = ROWS[row](tmp_path)
    rc = cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir",
                   str(tmp_path / "o"), "--report_to", "none", *flags])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and message in err, err
    assert not (tmp_path / "o" / "stability.json").exists()  # nothing ran
