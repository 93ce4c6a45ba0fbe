"""``sa2va-rl filter``: top-K by reward std, a subset train reads, resume after a kill, refusals by name."""

import json
import os

import pytest

from sa2va_rl import cli

ARGS = ["--task", "mask2caption", "--num_generations", "3", "--batch_size", "2", "--max_completion_length", "8",
        "--top_k", "3", "--seed", "7"]


def strict_jsonl(path):
    """The records of a jsonl file, refusing NaN/Infinity (not JSON) and duplicate (source, task) keys."""
    def no_constant(name):
        raise AssertionError(f"{path}: {name} is not strict JSON")

    with open(path) as f:
        recs = [json.loads(line, parse_constant=no_constant) for line in f]
    keys = [(r["source"], r["task"]) for r in recs]
    assert len(keys) == len(set(keys)), "a row was scored twice"
    return {k: r for k, r in zip(keys, recs)}


def top_k_from_scores(scores: dict, k: int) -> list[tuple[str, int]]:
    """Recomputed from the file: a sample's std is its highest task row's; ties by (file, row number)."""
    best = {}
    for (source, _task), r in scores.items():
        if r["std"] is not None:
            best[source] = max(best.get(source, -1.0), r["std"])
    order = sorted(best, key=lambda s: (-best[s], s.rsplit(":", 1)[0], int(s.rsplit(":", 1)[1])))
    return [(s.rsplit(":", 1)[0], int(s.rsplit(":", 1)[1])) for s in order[:k]]


@pytest.fixture(scope="module")
def gar6(tmp_path_factory):
    from sa2va_rl.data.synthetic import make_gar_data

    return make_gar_data(str(tmp_path_factory.mktemp("gar6")), n=6, seed=3)


@pytest.fixture(scope="module")
def full_run(tiny_sa2va, gar6, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("filter") / "out")
    assert cli.main(["filter", "--model_path", tiny_sa2va, "--data_dir", gar6, "--out_dir", out, *ARGS]) == 0
    return out


def test_top_k_written_is_the_top_k_of_scores_and_train_reads_it(full_run, tiny_sa2va, gar6):
    import torch

    from sa2va_rl.data.gar import INDEX_FILE, GARReader
    from sa2va_rl.models.sa2va import load_sa2va, make_policy
    from sa2va_rl.rl.tasks import GARTaskDataset

    scores = strict_jsonl(os.path.join(full_run, "scores.jsonl"))
    assert len(scores) == 6 and {t for _, t in scores} == {"mask2caption"}
    assert any(r["std"] for r in scores.values())  # rewards that vary: the ranking (and the resume test) mean something
    for r in scores.values():
        assert len(r["totals"]) == 3 and set(r["rewards"]) == {"caption_meteor", "format_reward"}
    with open(os.path.join(full_run, "subset", INDEX_FILE)) as f:
        index = json.load(f)
    assert [(e["file"], e["row"]) for e in index["rows"]] == top_k_from_scores(scores, 3)
    for name in ("std_hist.png", "summary.md", "filter_config.json"):
        assert os.path.getsize(os.path.join(full_run, name)) > 0
    with open(os.path.join(full_run, "std_hist.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    reader = GARReader(os.path.join(full_run, "subset"), bad_rows="error")
    expected = [f"{os.path.join(gar6, e['file'])}:{e['row']}" for e in index["rows"]]
    assert len(reader) == 3 and [reader.get(i).source for i in range(3)] == expected  # provenance: file:row
    model, tok = load_sa2va(tiny_sa2va, torch.float32)
    data = GARTaskDataset(reader, make_policy(model, tok, tiny_sa2va), ["mask2caption", "caption2mask"])
    assert [data[i]["source"] for i in range(0, 6, 2)] == expected


def test_killed_run_resumes_to_the_scores_of_an_uninterrupted_one(full_run, tiny_sa2va, gar6, tmp_path, capsys):
    from sa2va_rl.filter import FilterArgs, run_filter

    out = str(tmp_path / "out")

    def kill(batch):
        raise KeyboardInterrupt(f"killed after batch {batch}")

    args = FilterArgs(model_path=tiny_sa2va, data_dir=gar6, out_dir=out, task="mask2caption", num_generations=3,
                      batch_size=2, max_completion_length=8, top_k=3, seed=7)  # = ARGS
    with pytest.raises(KeyboardInterrupt):
        run_filter(args, on_batch=kill)
    first = strict_jsonl(os.path.join(out, "scores.jsonl"))
    assert len(first) == 2  # one batch of 2 samples, saved before the kill
    assert not os.path.exists(os.path.join(out, ".sa2va-rl.lock"))
    with open(os.path.join(out, "scores.jsonl"), "a") as f:  # and a kill in the middle of the next write
        f.write('{"source": "Fine-Grained-Dataset/data-0')
    assert cli.main(["filter", "--model_path", tiny_sa2va, "--data_dir", gar6, "--out_dir", out, *ARGS]) == 0
    resumed = strict_jsonl(os.path.join(out, "scores.jsonl"))
    assert resumed == strict_jsonl(os.path.join(full_run, "scores.jsonl"))  # seeded per batch: same scores
    assert "K-th highest sample std" in capsys.readouterr().out


def test_changed_arguments_are_refused_by_name(full_run, tiny_sa2va, gar6, capsys):
    base = ["filter", "--model_path", tiny_sa2va, "--data_dir", gar6, "--out_dir", full_run]
    for flag, value in (("--num_generations", "4"), ("--temperature", "0.7"), ("--task", "both"), ("--seed", "8")):
        changed = list(ARGS)
        if flag in changed:
            changed[changed.index(flag) + 1] = value
        else:
            changed += [flag, value]
        assert cli.main([*base, *changed]) == cli.EXIT_USAGE
        err = capsys.readouterr().err
        assert flag[2:] in err and "filter_config.json" in err and "Traceback" not in err
    # another K only selects again: nothing is scored, the subset is rewritten
    before = open(os.path.join(full_run, "scores.jsonl")).read()
    k2 = list(ARGS)
    k2[k2.index("--top_k") + 1] = "2"
    assert cli.main([*base, *k2]) == 0
    assert open(os.path.join(full_run, "scores.jsonl")).read() == before
    with open(os.path.join(full_run, "subset", "gar_index.json")) as f:
        assert len(json.load(f)["rows"]) == 2
    assert cli.main([*base, *ARGS]) == 0  # back to K = 3 for the other tests


def test_out_dir_that_is_a_file_is_a_usage_error(tiny_sa2va, gar6, tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("x")
    assert cli.main(["filter", "--model_path", tiny_sa2va, "--data_dir", gar6, "--out_dir", str(path),
                     *ARGS]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "Traceback" not in err


def test_select_top_ranks_samples_by_their_highest_std_ties_by_source():
    from sa2va_rl.filter import select_top

    rows = [{"source": "a.arrow:10", "task": "mask2caption", "std": 0.5},
            {"source": "a.arrow:2", "task": "mask2caption", "std": 0.5},
            {"source": "a.arrow:2", "task": "caption2mask", "std": 0.1},
            {"source": "b.arrow:0", "task": "caption2mask", "std": 0.9},
            {"source": "b.arrow:0", "task": "mask2caption", "std": 0.0},
            {"source": "b.arrow:1", "task": "mask2caption", "std": None}]
    got = select_top(rows, 10)
    assert [(r["source"], r["task"]) for r in got] == [("b.arrow:0", "caption2mask"), ("a.arrow:2", "mask2caption"),
                                                       ("a.arrow:10", "mask2caption")]  # row 2 before row 10; null out


def test_gar_index_errors_name_the_file_and_the_fix(gar6, tmp_path):
    from sa2va_rl.data.gar import INDEX_FILE, DataFileError, GARReader, find_files, write_index

    sub = tmp_path / "sub"
    sub.mkdir()
    write_index(str(sub), gar6, [{"file": os.path.relpath(find_files(gar6)[0], gar6), "row": 99}])
    with pytest.raises(DataFileError, match="row 99 of .*re-run `sa2va-rl filter`"):
        GARReader(str(sub))
    write_index(str(sub), gar6, [{"file": "gone.arrow", "row": 0}])
    with pytest.raises(FileNotFoundError, match="gone.arrow, which does not exist"):
        GARReader(str(sub))
    (sub / INDEX_FILE).write_text('{"rows": 3}')
    with pytest.raises(DataFileError, match="not a GAR index"):
        GARReader(str(sub))
