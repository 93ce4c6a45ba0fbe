"""TRL's own GRPO tests, run twice: against stock ``trl.GRPOTrainer`` and with ``Sa2VAGRPOTrainer`` swapped in; prints
the tests whose outcome differs (docs/trl_parity.md says which differences are deliberate: refused options, the
``logging_steps`` default).

TRL's tests load tiny models and datasets from the Hugging Face Hub (``trl-internal-testing/*``): run where the Hub
is reachable, or with a warm HF cache. Get the test file from a TRL checkout of the installed version:

    python benchmarks/trl_peer_suite.py --tests PATH/TO/trl/tests/test_grpo_trainer.py [-k EXPR] [--jobs-note]

The swap is a pytest plugin (this file, loaded with ``-p``): before the test module imports ``trl``, it replaces
``trl.GRPOTrainer`` / ``trl.GRPOConfig`` with ours (``Sa2VAGRPOConfig`` is a ``GRPOConfig``; stability fields keep
their defaults). The junit reports of the two runs are compared test by test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

SWAP = os.environ.get("SA2VA_RL_TRL_PEER") == "1"

if SWAP:  # loaded as a pytest plugin: patch trl before the tests import it
    import trl
    import trl.trainer.grpo_trainer

    from sa2va_rl.rl.config import Sa2VAGRPOConfig
    from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer

    trl.GRPOTrainer = Sa2VAGRPOTrainer
    trl.GRPOConfig = Sa2VAGRPOConfig


def outcomes(junit: str) -> dict[str, str]:
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = [c.tag for c in case]
        result[name] = ("failed" if "failure" in kinds else "error" if "error" in kinds else
                        "skipped" if "skipped" in kinds else "passed")
    return result


def run(tests: str, ours: bool, k: str | None, out: str) -> dict[str, str]:
    env = {**os.environ, "SA2VA_RL_TRL_PEER": "1" if ours else "0",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", tests, "-q", "-p", "no:cacheprovider", f"--junitxml={out}"]
    if ours:
        cmd += ["-p", "trl_peer_suite"]
    if k:
        cmd += ["-k", k]
    subprocess.run(cmd, env=env, check=False)
    return outcomes(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", required=True, help="TRL's tests/test_grpo_trainer.py")
    ap.add_argument("-k", default=None, help="pytest -k expression (a subset)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stock = run(args.tests, False, args.k, os.path.join(tmp, "stock.xml"))
        ours = run(args.tests, True, args.k, os.path.join(tmp, "ours.xml"))
    names = sorted(set(stock) | set(ours))
    differ = [n for n in names if stock.get(n) != ours.get(n)]
    width = max([len(n) for n in differ] + [4])
    print(f"\n{'test':<{width}}  stock    ours")
    for n in differ:
        print(f"{n:<{width}}  {stock.get(n, '-'):<7}  {ours.get(n, '-')}")
    both = sum(1 for n in names if stock.get(n) == ours.get(n) == "passed")
    print(f"\n{len(names)} tests: {both} pass with both; {len(differ)} differ "
          f"({sum(1 for n in differ if stock.get(n) == 'passed')} pass with stock TRL only)")


if __name__ == "__main__":
    main()
