"""TRL's own GRPO tests, run twice, offline: against stock ``trl.GRPOTrainer`` and with ``Sa2VAGRPOTrainer`` swapped
in; prints the tests whose outcome differs (docs/trl_parity.md, "Peer suite", says which differences are deliberate).

TRL's tests load tiny models and datasets from the Hub (``trl-internal-testing/*``); here they load stand-ins built
in code (benchmarks/trl_stand_ins.py: a local Hub cache, ``HF_HUB_OFFLINE=1``, and ``load_dataset`` redirected for
``trl-internal-testing/*``), built once into ``--cache`` (default /tmp/trlpeer/stand_ins). The test file comes from a
TRL checkout, or from a bare git mirror of huggingface/trl, extracted with its helpers (testing_utils.py,
testing_constants.py, conftest.py) into a folder outside this repository:

    python benchmarks/trl_peer_suite.py --from-mirror /work/.mirror/huggingface+trl/repo [--rev HEAD] [-k EXPR]
    python benchmarks/trl_peer_suite.py --tests PATH/TO/trl/tests/test_grpo_trainer.py [-k EXPR]

Both runs load this file as a pytest plugin (``-p trl_peer_suite``), which before the test module imports ``trl``:
points the process at the stand-ins; adds what a newer test file imports from ``trl.import_utils`` and the
installed TRL lacks (``is_joblib_available``); and, in the second run only (``SA2VA_RL_TRL_PEER=1``), replaces
``trl.GRPOTrainer`` / ``trl.GRPOConfig`` with ours. The config swapped in is ``Sa2VAGRPOConfig`` with TRL's defaults
for the five fields whose defaults differ (learning_rate, warmup_steps, logging_steps, num_generations,
cast_lm_head_to_fp32; and bf16 by TRL's rule), so the suite compares how options behave, not our documented
defaults; ``--our-defaults`` keeps ours. Stability fields keep their defaults. The junit reports of the two runs are
compared test by test; ``--junit-dir`` keeps them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = "SA2VA_RL_TRL_PEER" in os.environ and __name__ != "__main__"
SWAP = os.environ.get("SA2VA_RL_TRL_PEER") == "1"
TEST_FILES = ("test_grpo_trainer.py", "testing_utils.py", "testing_constants.py", "conftest.py", "__init__.py")


def _trl_defaults_config(base: type) -> type:
    """``base`` (Sa2VAGRPOConfig) with TRL's GRPOConfig defaults where ours differ (docs/trl_parity.md); a
    module-level class, so that the trainer can pickle its config."""
    import dataclasses

    global Sa2VAGRPOConfigTRLDefaults

    @dataclasses.dataclass
    class Sa2VAGRPOConfigTRLDefaults(base):
        learning_rate: float = 1e-6
        warmup_steps: int = 0
        logging_steps: float = 10
        num_generations: int | None = 8
        cast_lm_head_to_fp32: bool = False

        def __post_init__(self) -> None:
            if self.bf16 is None:  # TRL's rule (trl/trainer/base_config.py), not bf16_supported()
                self.bf16 = not self.fp16
            super().__post_init__()

    Sa2VAGRPOConfigTRLDefaults.__qualname__ = "Sa2VAGRPOConfigTRLDefaults"
    return Sa2VAGRPOConfigTRLDefaults


def _install_plugin() -> None:
    """Runs when pytest loads this file with ``-p``: before the tests import anything."""
    import trl_stand_ins

    if os.environ.get("SA2VA_RL_TRL_STAND_INS"):
        trl_stand_ins.activate(os.environ["SA2VA_RL_TRL_STAND_INS"])

    import importlib

    import_utils = importlib.import_module("trl.import_utils")
    if not hasattr(import_utils, "is_joblib_available"):  # newer test helpers import it
        import_utils.is_joblib_available = lambda: import_utils._is_package_available("joblib")
    if not SWAP:
        return

    import trl

    from sa2va_rl.rl.config import Sa2VAGRPOConfig
    from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer

    config = Sa2VAGRPOConfig
    if os.environ.get("SA2VA_RL_TRL_PEER_DEFAULTS", "trl") == "trl":
        config = _trl_defaults_config(Sa2VAGRPOConfig)
    trl.GRPOTrainer = Sa2VAGRPOTrainer
    trl.GRPOConfig = config


if PLUGIN:
    sys.path.insert(0, HERE)
    _install_plugin()


def outcomes(junit: str) -> dict[str, tuple[str, str]]:
    """test id -> (outcome, the first line of its failure/error/skip message)."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {c.tag: c for c in case}
        kind = next((k for k in ("failure", "error", "skipped") if k in kinds), None)
        outcome = {"failure": "failed", "error": "error", "skipped": "skipped", None: "passed"}[kind]
        message = (kinds[kind].get("message") or "").strip().splitlines() if kind else []
        result[name] = (outcome, message[0][:160] if message else "")
    return result


def extract_from_mirror(mirror: str, rev: str, dest: str) -> str:
    """TRL's tests/test_grpo_trainer.py and the helpers it imports, at ``rev`` of a git repo/mirror, into
    ``dest/tests``; return the test file's path. Never into this repository."""
    tests = os.path.join(dest, "tests")
    os.makedirs(tests, exist_ok=True)
    for f in TEST_FILES:
        blob = subprocess.run(["git", "-C", mirror, "show", f"{rev}:tests/{f}"], check=True, capture_output=True)
        with open(os.path.join(tests, f), "wb") as out:
            out.write(blob.stdout)
    return os.path.join(tests, "test_grpo_trainer.py")


def run(tests: str, ours: bool, k: str | None, out: str, cache: str, our_defaults: bool,
        extra: list[str]) -> tuple[dict, float]:
    import trl_stand_ins

    env = {**os.environ, **trl_stand_ins.environment(cache), "SA2VA_RL_TRL_PEER": "1" if ours else "0",
           "SA2VA_RL_TRL_PEER_DEFAULTS": "ours" if our_defaults else "trl",
           "PYTHONPATH": os.pathsep.join(p for p in [HERE, os.environ.get("PYTHONPATH", "")] if p)}
    cmd = [sys.executable, "-m", "pytest", tests, "-q", "-p", "no:cacheprovider", "-p", "trl_peer_suite",
           f"--junitxml={out}", "-o", "junit_family=xunit1", "--show-capture=no", "--tb=short", *extra]
    if k:
        cmd += ["-k", k]
    start = time.monotonic()
    subprocess.run(cmd, env=env, check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(tests))))
    if not os.path.exists(out):
        sys.exit(f"pytest wrote no report ({out}): see its output above")
    return outcomes(out), time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tests", help="TRL's tests/test_grpo_trainer.py (its helpers next to it)")
    src.add_argument("--from-mirror", metavar="GIT_DIR", help="a clone or bare mirror of huggingface/trl: extract "
                     "the test file and its helpers at --rev into --workdir")
    ap.add_argument("--rev", default="HEAD", help="with --from-mirror: the revision (default HEAD)")
    ap.add_argument("--workdir", default="/tmp/trlpeer", help="with --from-mirror: where the tests go (outside "
                    "this repository; default /tmp/trlpeer)")
    ap.add_argument("--cache", default="/tmp/trlpeer/stand_ins", help="where the stand-ins are built (once)")
    ap.add_argument("-k", default=None, help="pytest -k expression (a subset)")
    ap.add_argument("--only", choices=["stock", "ours"], help="run one side only")
    ap.add_argument("--our-defaults", action="store_true", help="swap in Sa2VAGRPOConfig with its own defaults")
    ap.add_argument("--junit-dir", help="keep the two junit reports here")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    import trl_stand_ins

    tests = args.tests or extract_from_mirror(args.from_mirror, args.rev, args.workdir)
    start = time.monotonic()
    trl_stand_ins.build(args.cache)
    print(f"stand-ins ready in {args.cache} ({time.monotonic() - start:.0f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.junit_dir or tmp
        os.makedirs(folder, exist_ok=True)
        res = {}
        for side in ("stock", "ours"):
            if args.only in (None, side):
                res[side], took = run(tests, side == "ours", args.k, os.path.join(folder, f"{side}.xml"),
                                      args.cache, args.our_defaults, args.pytest_args)
                print(f"{side}: {took:.0f} s")
    for side, r in res.items():
        counts = {o: sum(1 for v in r.values() if v[0] == o) for o in ("passed", "failed", "error", "skipped")}
        print(f"{side}: {len(r)} tests: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    if len(res) < 2:
        return
    stock, ours = res["stock"], res["ours"]
    names = sorted(set(stock) | set(ours))
    differ = [n for n in names if stock.get(n, ("-",))[0] != ours.get(n, ("-",))[0]]
    print("\ndiffering outcomes (stock -> ours: ours' message):")
    for n in differ:
        print(f"  {n}: {stock.get(n, ('-',))[0]} -> {ours.get(n, ('-', ''))[0]}: {ours.get(n, ('', ''))[1]}")
    both = sum(1 for n in names if stock.get(n, ("-",))[0] == ours.get(n, ("-",))[0] == "passed")
    print(f"\n{len(names)} tests: {both} pass with both; {len(differ)} differ "
          f"({sum(1 for n in differ if stock.get(n, ('-',))[0] == 'passed')} pass with stock TRL only)")


if __name__ == "__main__":
    main()
