"""One run per output directory (part of issue H): a live owner makes a second run refuse, naming it, without
touching its files; a dead owner's lock is taken over; the lock goes when the run ends."""

import os
import subprocess
import sys

from sa2va_rl import cli
from sa2va_rl.rl.run_lock import LOCK, RunLock

BASE = ["--max_steps", "1", "--batch_size", "2", "--num_generations", "2", "--max_completion_length", "4",
        "--report_to", "none", "--disable_tqdm", "true"]


def _lock_owned_by(out, pid: int) -> None:
    import json
    import socket

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOCK), "w") as f:
        json.dump({"pid": pid, "host": socket.gethostname(), "started": "earlier"}, f)


def test_second_run_refuses_and_leaves_the_first_runs_staging(tiny_causal, prompt_dir, tmp_path, capsys):
    out = str(tmp_path / "o")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_owned_by(out, owner.pid)
        os.makedirs(os.path.join(out, ".staging", "checkpoint-7"))  # the live run's save in progress
        rc = cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", out, *BASE])
        err = capsys.readouterr().err
        assert rc == cli.EXIT_USAGE and f"is in use by pid {owner.pid}" in err
        assert os.path.isdir(os.path.join(out, ".staging", "checkpoint-7"))
    finally:
        owner.kill()
        owner.wait()


def test_dead_owners_lock_is_taken_over_and_released(tiny_causal, prompt_dir, tmp_path):
    out = str(tmp_path / "o")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock_owned_by(out, dead.pid)
    assert cli.main(["train", "--model_path", tiny_causal, "--data_dir", prompt_dir, "--output_dir", out, *BASE]) == 0
    assert not os.path.exists(os.path.join(out, LOCK))


def test_release_leaves_someone_elses_lock(tmp_path):
    _lock_owned_by(str(tmp_path), os.getpid() + 1)
    RunLock(str(tmp_path)).release()
    assert os.path.exists(tmp_path / LOCK)
