import random

from sa2va_rl import cli
from sa2va_rl.data.synthetic import synthetic_row, write_arrow


def test_doctor_passes_on_a_good_setup(tiny_sa2va, gar_dir, tiny_causal, prompt_dir, capsys):
    assert cli.main(["doctor", "--model_path", tiny_sa2va, "--data_dir", gar_dir]) == 0
    out = capsys.readouterr().out
    for name in ("versions", "device", "data", "model loads", "generation", "forward/backward", "rewards"):
        assert f"PASS  {name}" in out
    assert "all checks passed" in out
    assert cli.main(["doctor", "--model_path", tiny_causal, "--data_dir", prompt_dir]) == 0


def test_doctor_fails_on_broken_data_naming_file_and_row(tiny_sa2va, tmp_path, capsys):
    rng = random.Random(0)
    rows = [synthetic_row(rng) for _ in range(4)]
    rows[2] = dict(rows[2], image={"bytes": b"not an image", "path": None})
    write_arrow(str(tmp_path / "Fine-Grained-Dataset" / "data-00000-of-00001.arrow"), rows)
    assert cli.main(["doctor", "--model_path", tiny_sa2va, "--data_dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  data" in out and "3 good, 1 bad" in out
    assert "data-00000-of-00001.arrow: row 2: field 'image': undecodable" in out
    assert "fix: repair or drop those rows, or train with --bad_rows skip" in out
