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
``trl.GRPOTrainer`` / ``trl.GRPOConfig`` with ours and lets a mocked ``generate()`` through
(``_accept_mocked_generate``: TRL's tool and environment tests mock it; sa2va-rl itself refuses tokens the
LogitsGuard did not see). The config swapped in is ``Sa2VAGRPOConfig`` with TRL's defaults
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
# The mirror revision whose test file docs/trl_parity.md reports on, and CI runs (tests/test_trl_peer_suite.py).
PINNED_REV = "f2cd57710ae345ea6428ae95363267fcf38a3dc8"

# Pass with stock TRL and not with ours, each on purpose (docs/trl_parity.md, "Peer suite"). ``--check`` fails on
# any other test that passes with stock TRL only.
DELIBERATE = {
    "TestGRPOTrainer::test_train_with_generation_kwargs": "generation_kwargs num_beams=2: refused at start by name",
    "TestGRPORolloutDispatch::test_generate_rollout_func_raises_when_required_keys_are_missing":
        "rollout_func: refused at start by name; the test skips __init__ (no StepRecord)",
}

_Q = "trl-internal-testing/tiny-"
# ``--subset ci``: what CI runs (both sides, ~5 min on 2 cores): every test under a second, and one of each thing
# issue N fixed or refused: plain VLMs with their pixels, MoE aux loss, the entropy bonus, beam search refused,
# optional reward_funcs, the last-log-entry metrics, tool and environment rollouts.
CI_SUBSET = (
    "TestGetHighEntropyMask", "TestTransformersContinuousBatchingContract",
    "TestGRPOTrainer::test_get_off_policy_mask", "TestGRPOTrainer::test_get_off_policy_mask_padding",
    "TestGRPOTrainer::test_no_reward_source_raises", "TestGRPOTrainer::test_warning_raised_sequence_level_with_token_"
    "summed_loss", "TestGRPOTrainer::test_iterable_eval_keeps_map_style_train_workers",
    "TestGRPOTrainer::test_mismatched_reward_processing_classes_length", "TestGRPOTrainer::test_init_with_eval_dataset",
    "TestGRPOTrainer::test_iterable_dataset_requires_dispatch_batches_false",
    "TestGRPOTrainer::test_iterable_dataset_forces_num_workers_zero",
    "TestGRPOTrainer::test_dataset_required_without_environment",
    "TestGRPOTrainer::test_liger_kernel_with_peft_lm_head_raises",
    "TestGRPOTrainer::test_correct_reward_processing_classes_list",
    "TestGRPOTrainer::test_single_reward_model_with_single_processing_class", "TestGRPOTrainer::test_init_minimal",
    "TestGRPOTrainer::test_evaluate_with_eval_dataset[dataset]",
    f"TestGRPOTrainer::test_train_with_cast_lm_head_to_fp32[{_Q}Gemma2ForCausalLM]",
    f"TestGRPOTrainer::test_train[{_Q}Cohere2ForCausalLM]", f"TestGRPOTrainer::test_train[{_Q}GptOssForCausalLM]",
    f"TestGRPOTrainer::test_train[{_Q}Glm4MoeForCausalLM]", "TestGRPOTrainer::test_train_moe_peft_model",
    "TestGRPOTrainer::test_entropy_bonus_flows_gradients", "TestGRPOTrainer::test_train_with_generation_kwargs",
    "TestGRPOTrainer::test_train_reward_func_with_log_metric",
    "TestGRPOTrainer::test_train_with_mask_truncated_completions",
    "TestGRPOTrainer::test_train_with_environment_owned_reward", "TestGRPOTrainer::test_train_with_malformed_tool_calls",
    "TestGRPOTrainer::test_train_with_environment_factory", "TestGRPOTrainer::test_train_with_environment_owned_data",
    "TestGRPOTrainer::test_train_with_unknown_environment_raises",
    "TestGRPOTrainer::test_environment_owned_data_requires_max_steps",
    "TestGRPOTrainer::test_multiple_environments_without_dataset_raises",
    f"TestGRPOTrainerVLM::test_train_vlm[{_Q}Gemma3ForConditionalGeneration]",
    "TestGRPOTrainerVLM::test_train_vlm_log_multimodal_false",
    "TestGRPOTrainerVLM::test_train_vlm_with_pad_to_multiple_of",
    f"TestGRPOTrainerVLM::test_train_vlm[{_Q}Qwen2VLForConditionalGeneration]",
)


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


# Of CI_SUBSET, run with ours only: tool-calling training tests that take from 80 s to 17 min with stock TRL on this
# CPU (TRL's chunked log-prob kernel runs its torch fallback over ~450-token tool prompts x 151,936 logits; 1-6 s
# with ours); their stock outcome is the full run's (docs/trl_parity.md). ``--check`` requires them to pass with ours.
OURS_ONLY = ("TestGRPOTrainer::test_train_with_environment_owned_reward",
             "TestGRPOTrainer::test_train_with_malformed_tool_calls",
             "TestGRPOTrainer::test_train_with_environment_factory")


def _accept_mocked_generate() -> None:
    """TRL's tests mock ``model.generate`` (tool and environment rollouts, truncated completions) with functions
    that return the prompt and fixed tokens without running the logits processors. sa2va-rl refuses such output
    (models/policy.py ``new_tokens``: the LogitsGuard saw none of those steps); in the peer run only, tokens after an
    echoed prompt from a generate() that ran no decoding step are taken as they are, with no repaired flags, so the
    rest of the rollout (the tool loop, masks, rewards, the loss) runs under TRL's tests."""
    import torch

    from sa2va_rl.models import policy, sampling

    collect = policy.collect_generation

    def collect_generation(out, prompt, logits_guard, counter, eos, cut=None):
        seen = logits_guard.steps_seen if logits_guard is not None else counter.steps
        n = prompt.shape[1]
        if seen == 0 and out.shape[1] > n and torch.equal(out[:, :n], prompt):
            if logits_guard is not None:
                logits_guard.reset()
            mocked = policy.StepCounter()
            mocked.steps = out.shape[1] - n
            return collect(out[:, n:], prompt, None, mocked, eos, cut)
        return collect(out, prompt, logits_guard, counter, eos, cut)

    policy.collect_generation = sampling.collect_generation = collect_generation  # causal LMs / Sa2VA


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
    _accept_mocked_generate()

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
        extra: list[str], subset: tuple[str, ...] = ()) -> tuple[dict, float]:
    import trl_stand_ins

    env = {**os.environ, **trl_stand_ins.environment(cache), "SA2VA_RL_TRL_PEER": "1" if ours else "0",
           "SA2VA_RL_TRL_PEER_DEFAULTS": "ours" if our_defaults else "trl",
           "PYTHONPATH": os.pathsep.join(p for p in [HERE, os.environ.get("PYTHONPATH", "")] if p)}
    targets = [f"{tests}::{t}" for t in subset] or [tests]
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-p", "trl_peer_suite",
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
    ap.add_argument("--rev", default=PINNED_REV, help=f"with --from-mirror: the revision (default {PINNED_REV[:7]}, the "
                    "one docs/trl_parity.md reports on)")
    ap.add_argument("--workdir", default="/tmp/trlpeer", help="with --from-mirror: where the tests go (outside "
                    "this repository; default /tmp/trlpeer)")
    ap.add_argument("--cache", default="/tmp/trlpeer/stand_ins", help="where the stand-ins are built (once)")
    ap.add_argument("-k", default=None, help="pytest -k expression (a subset)")
    ap.add_argument("--only", choices=["stock", "ours"], help="run one side only")
    ap.add_argument("--our-defaults", action="store_true", help="swap in Sa2VAGRPOConfig with its own defaults")
    ap.add_argument("--junit-dir", help="keep the two junit reports here")
    ap.add_argument("--subset", choices=["all", "ci"], default="all", help="ci: the tests CI runs (CI_SUBSET)")
    ap.add_argument("--check", action="store_true", help="exit 1 if a test passes with stock TRL and not with ours "
                    "and is not in DELIBERATE, or a test of the subset did not run")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args()
    if args.check and args.only:
        ap.error("--check compares both runs: leave out --only")
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
                                      args.cache, args.our_defaults, args.pytest_args,
                                      subset_for(side, args.subset))
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
    if args.check:
        problems = check(stock, ours, CI_SUBSET if args.subset == "ci" else ())
        for p in problems:
            print(f"CHECK: {p}")
        print("check: " + ("FAILED" if problems else "passed"))
        sys.exit(1 if problems else 0)


def subset_for(side: str, subset: str) -> tuple[str, ...]:
    if subset == "all":
        return ()
    return CI_SUBSET if side == "ours" else tuple(t for t in CI_SUBSET if t not in OURS_ONLY)


def short(name: str) -> str:
    """junit's ``tests.test_grpo_trainer.Class::test[param]`` -> ``Class::test[param]``."""
    cls, _, test = name.partition("::")
    return f"{cls.rsplit('.', 1)[-1]}::{test}"


def check(stock: dict, ours: dict, subset: tuple[str, ...]) -> list[str]:
    """What ``--check`` fails on: a test passing with stock TRL only and not in DELIBERATE; a test of OURS_ONLY that
    ran and did not pass with ours; a test (or class) of the subset that ran on neither side (renamed, or the test
    file changed)."""
    problems = []
    for name, (outcome, message) in sorted(ours.items()):
        if short(name) in OURS_ONLY and name not in stock and outcome != "passed":
            problems.append(f"{short(name)} (run with ours only): {outcome}: {message}")
    for name in sorted(set(stock) | set(ours)):
        if stock.get(name, ("-",))[0] == "passed" and ours.get(name, ("-",))[0] != "passed" and \
                short(name) not in DELIBERATE:
            problems.append(f"{short(name)} passes with stock TRL, {ours.get(name, ('missing',))[0]} with ours: "
                            f"{ours.get(name, ('', ''))[1]}")
    ran = {short(n) for n in set(stock) | set(ours)}
    for t in subset:
        if not any(r == t or r.startswith(t + "::") or r.startswith(t + "[") for r in ran):
            problems.append(f"{t}: in the subset, but no such test ran")
    return problems


if __name__ == "__main__":
    main()
