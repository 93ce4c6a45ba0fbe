"""``sa2va-rl doctor``: check an environment, a model and a data directory before hours are spent.

Each check prints PASS/FAIL with what it saw and, on failure, how to fix it; the exit code is 1 when any fails.
"""

from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass
from importlib import metadata

import torch

CHECKED = ("torch", "transformers", "trl", "accelerate", "peft", "datasets")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _versions() -> Check:
    """The key packages against the ranges sa2va-rl itself declares (its installed metadata: pyproject.toml)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    wanted = {r.name: r.specifier for r in map(Requirement, metadata.requires("sa2va-rl") or []) if r.marker is None}
    bad, seen = [], []
    for pkg in CHECKED:
        try:
            v = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            bad.append(f"{pkg} missing")
            continue
        seen.append(f"{pkg} {v}")
        spec = wanted.get(pkg)
        if spec is not None and not spec.contains(Version(v).base_version, prereleases=True):
            bad.append(f"{pkg} {v} not in {spec}")
    return Check("versions", not bad, "; ".join(bad or seen),
                 "pip install -e . (pyproject.toml pins the supported ranges)" if bad else "")


def _device() -> Check:
    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return Check("device", True, f"{torch.cuda.get_device_name(0)}; bf16 {'yes' if bf16 else 'no (fp32)'}")
    return Check("device", True, "CPU only: training runs in fp32 (bf16 needs a GPU that supports it)")


def _data(data_dir: str, sa2va: bool, max_rows: int):
    """(check, dataset rows to try) ."""
    if not sa2va:
        from sa2va_rl.data.prompts import DataError, load_prompt_dataset

        try:
            ds = load_prompt_dataset(data_dir)
        except DataError as e:
            return Check("data", False, str(e), "fix the named line, or point --data_dir at DIR/train.jsonl"), None
        return Check("data", True, f"{len(ds)} prompts in {data_dir}/train.jsonl"), ds
    from sa2va_rl.data.gar import BadRow, GARReader

    try:
        reader = GARReader(data_dir, bad_rows="error")
    except (FileNotFoundError, ValueError) as e:
        return Check("data", False, str(e), "point --data_dir at a GAR directory"), None
    n = min(len(reader), max_rows)
    bad, first = 0, None
    for i in range(n):
        try:
            reader.get(i)
        except BadRow as e:
            bad += 1
            first = first or str(e)
    detail = f"{len(reader)} rows in {len(reader._files)} file(s); first {n} read: {n - bad} good, {bad} bad"
    if bad:
        return Check("data", False, f"{detail}; first bad: {first}",
                     "repair or drop those rows, or train with --bad_rows skip (they are counted and reported)"), None
    reader.bad_rows = "skip"
    return Check("data", True, detail), reader


def run_doctor(model_path: str | None, data_dir: str | None, trust_remote_code: bool = False,
               max_rows: int = 200, out=print) -> int:
    from sa2va_rl.models.sa2va import is_sa2va_checkpoint

    checks = [_versions(), _device()]
    sa2va = bool(model_path) and is_sa2va_checkpoint(model_path)
    data = None
    if data_dir:
        check, data = _data(data_dir, sa2va, max_rows)
        checks.append(check)
    if model_path:
        checks.extend(_model_checks(model_path, sa2va, trust_remote_code, data))
    width = max(len(c.name) for c in checks)
    for c in checks:
        out(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            out(f"      {'':<{width}}  fix: {c.fix}")
    failed = [c.name for c in checks if not c.ok]
    out("all checks passed" if not failed else f"{len(failed)} check(s) failed: {', '.join(failed)}")
    return 1 if failed else 0


def _load_fix(e: Exception, trust_remote_code: bool) -> str:
    """The fix for a failed model load, by what failed."""
    from sa2va_rl.models.layout import LayoutError
    from sa2va_rl.models.upstream import PIP_EXTRA, UpstreamLoadError

    msg = str(e)
    if "--trust_remote_code" in msg and not trust_remote_code:
        return "add --trust_remote_code (the checkpoint runs its own modeling code; do it if you trust it)"
    if isinstance(e, UpstreamLoadError) and "packages" in msg:
        return PIP_EXTRA
    if isinstance(e, UpstreamLoadError):
        return "the message names the file and line that failed; docs/upstream.md lists the releases and fixes known"
    if isinstance(e, LayoutError):
        return "the checkpoint's safetensors and its model differ: re-download it, or check config.json"
    if isinstance(e, (FileNotFoundError, OSError)):
        return "pass a local directory holding config.json and the weights (from_pretrained reads it offline)"
    return "see the message; a local directory saved with save_pretrained is expected"


def _packages(model_path: str) -> Check | None:
    from sa2va_rl.models.upstream import PIP_EXTRA, code_files, is_remote_code, missing_packages, read_config

    try:
        if not is_remote_code(read_config(model_path)):
            return None
        missing = missing_packages(model_path)
    except (OSError, ValueError, SyntaxError) as e:
        return Check("packages", False, f"cannot read the checkpoint's code: {type(e).__name__}: {e}",
                     "check that config.json and the .py files it names are complete")
    if missing:
        return Check("packages", False, "; ".join(f"{k}: {v}" for k, v in missing.items()), PIP_EXTRA)
    return Check("packages", True, f"everything the checkpoint's {len(code_files(model_path))} code files import is "
                                   "usable")


def _model_checks(model_path: str, sa2va: bool, trust_remote_code: bool, data) -> list[Check]:
    from transformers import GenerationConfig

    from sa2va_rl.numerics import LogitsGuard

    from sa2va_rl.models.layout import model_dir_problem

    if why := model_dir_problem(model_path):
        return [Check("model loads", False, why, "point --model_path at the model's directory")]
    checks = []
    try:
        if sa2va:
            from sa2va_rl.models.sa2va import Sa2VAModelArgs, load_sa2va, make_policy, prepare_for_training

            packages = _packages(model_path)
            if packages is not None:
                checks.append(packages)
                if not packages.ok:
                    return checks
            model, tok = load_sa2va(model_path, trust_remote_code=trust_remote_code)
            policy = make_policy(model, tok, model_path, trust_remote_code=trust_remote_code)
            prepare_for_training(model, Sa2VAModelArgs(lora_r=8, lora_alpha=16))
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from sa2va_rl.models.policy import CausalLMPolicy

            tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            policy = CausalLMPolicy(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    except Exception as e:  # noqa: BLE001 - every load failure is reported with its own fix
        return checks + [Check("model loads", False, f"{type(e).__name__}: {e}", _load_fix(e, trust_remote_code))]
    n = sum(p.numel() for p in model.parameters())
    info = getattr(model, "sa2va_rl_upstream", None)
    how = f"; {info.describe()}" if info is not None else ""
    checks.append(Check("model loads", True, f"{type(model).__name__}, {n:,} parameters{how}"))
    if data is None:
        return checks + [Check("generation", False, "skipped: no usable --data_dir to draw a prompt from",
                               "pass --data_dir")]
    row, contexts = _first_row(data, policy, sa2va)
    prompt_ids = [tok(row["prompt"]).input_ids] * 2
    eos = getattr(model, "generation_config", None)
    eos = eos.eos_token_id if eos is not None else tok.eos_token_id
    guard = LogitsGuard(eos_token_id=eos)
    gc = GenerationConfig(max_new_tokens=8, do_sample=True, pad_token_id=policy.pad_token_id, eos_token_id=eos)
    try:
        with torch.no_grad():
            gen = policy.generate(model.eval(), prompt_ids, gc, guard, **contexts)
    except Exception as e:  # noqa: BLE001
        return checks + [Check("generation", False, f"{type(e).__name__}: {e}", _trace_hint())]
    lengths = [len(c) for c in gen.completion_ids]
    ok = min(lengths) > 0 and guard.stats.rows_repaired == 0
    task = f" ({row['task']})" if sa2va else ""
    checks.append(Check("generation", ok, f"2 guarded samples{task} of {lengths} new tokens; "
                                          f"{guard.stats.rows_repaired}/{guard.stats.rows_seen} logit rows repaired",
                        "" if ok else "repaired rows on a fresh model mean non-finite logits: check the weights "
                                      "and the dtype (try fp32)"))
    checks.append(_backward(model, policy, prompt_ids[:1], gen.completion_ids[:1], contexts))
    if sa2va:
        checks.append(_segmentation(model, tok, policy, data, eos))
    checks.append(_rewards(tok, row, gen, sa2va))
    if sa2va:
        checks.append(_saved_layout(model, tok, model_path))
    return checks


def _segmentation(model, tok, policy, data, eos) -> Check:
    """One caption2mask sample with ``[SEG]`` forced as the answer: hidden state -> text_hidden_fcs -> SAM2."""
    from sa2va_rl.rl.tasks import GARTaskDataset

    row = GARTaskDataset(data, policy, ["caption2mask"])[0]
    end = eos[0] if isinstance(eos, list) else eos
    completion = [[policy.seg_id] + ([end] if end is not None else [])]
    h, w = row["gt_mask"].shape
    try:
        masks = policy.segment(model.eval(), [tok(row["prompt"]).input_ids], completion, [row["visual"]])
    except Exception as e:  # noqa: BLE001
        return Check("segmentation", False, f"caption2mask, [SEG] forced: {type(e).__name__}: {e}", _trace_hint())
    mask = masks[0]
    ok = mask is not None and tuple(mask.shape) == (h, w) and mask.dtype == bool
    detail = (f"caption2mask, [SEG] forced: a {mask.shape[1]}x{mask.shape[0]} mask ({int(mask.sum())} pixels set) "
              f"for a {w}x{h} image" if mask is not None else "caption2mask, [SEG] forced: no mask came back")
    return Check("segmentation", ok, detail, "" if ok else "the [SEG] -> mask path is broken for this checkpoint: "
                                                          "see the traceback of `sa2va-rl train --task caption2mask`")


def _saved_layout(model, tok, model_path: str) -> Check:
    """Save the model (LoRA merged) as training would, to a temporary directory, and compare it with the input:
    weight names, shards, dtypes and shapes; every other file byte for byte; the weights equal the model's."""
    import filecmp
    import shutil
    import tempfile

    from safetensors import safe_open

    from sa2va_rl.models.sa2va import save_sa2va

    tmp = tempfile.mkdtemp(prefix="sa2va-rl-doctor-")
    try:
        save_sa2va(model, tok, tmp)
        layout = model.sa2va_rl_layout
        state = model.state_dict()
        bad = []
        for file, keys in layout.shards.items():
            with safe_open(os.path.join(tmp, file), "pt") as saved, safe_open(os.path.join(model_path, file), "pt") as src:
                if sorted(saved.keys()) != sorted(src.keys()):
                    bad.append(f"{file}: weight names differ")
                    continue
                for k in keys:
                    t = saved.get_tensor(k)
                    ref = src.get_slice(k)
                    want = state[layout.names[k]].detach().to("cpu", t.dtype)
                    if t.dtype != layout.dtypes[k] or list(t.shape) != list(ref.get_shape()) or not torch.equal(t, want):
                        bad.append(f"{file}:{k}")
        differ = [f for f in layout.files if not filecmp.cmp(os.path.join(tmp, f), os.path.join(model_path, f),
                                                             shallow=False)]
    except Exception as e:  # noqa: BLE001
        return Check("saved layout", False, f"{type(e).__name__}: {e}", _trace_hint())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(len(k) for k in layout.shards.values())
    ok = not bad and not differ
    detail = (f"{n} tensors in {len(layout.shards)} file(s) with the input's names and dtypes, "
              f"{len(layout.files)} other files identical" if ok else
              f"{len(bad)} tensors differ (first {bad[:3]}); {len(differ)} files differ (first {differ[:3]})")
    return Check("saved layout", ok, detail, "" if ok else "report this: the saved model would not be the release's "
                                                           "layout")


def _first_row(data, policy, sa2va):
    if not sa2va:
        return {"prompt": data[0]["prompt"], "solution": data[0].get("solution")}, {}
    from sa2va_rl.rl.tasks import GARTaskDataset

    row = GARTaskDataset(data, policy, ["mask2caption"])[0]
    return row, {"contexts": [row["visual"]] * 2}


def _backward(model, policy, prompt_ids, completion_ids, contexts) -> Check:
    model.train()
    for p in model.parameters():
        p.grad = None
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        kw = {"contexts": contexts["contexts"][:1]} if contexts else {}
        logps, _ = policy.logprobs(model, torch.tensor(prompt_ids), torch.ones(1, len(prompt_ids[0]), dtype=torch.long),
                                   torch.tensor(completion_ids), torch.ones(1, len(completion_ids[0]),
                                                                            dtype=torch.long), **kw)
        logps.sum().backward()
    except Exception as e:
        return Check("forward/backward", False, f"{type(e).__name__}: {e}", _trace_hint())
    grads = [p.grad for p in trainable if p.grad is not None]
    finite = bool(torch.isfinite(logps).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    ok = finite and logps.dtype == torch.float32 and bool(grads)
    return Check("forward/backward", ok, f"logprobs {logps.dtype}, {len(grads)} of {len(trainable)} trainable "
                                         f"tensors got finite gradients" if ok else "non-finite logprobs or grads",
                 "" if ok else "check the weights for NaN (train logs the first non-finite module); try fp32")


def _rewards(tok, row, gen, sa2va) -> Check:
    texts = tok.batch_decode(gen.completion_ids, skip_special_tokens=True)
    if sa2va:
        from sa2va_rl.rl.rewards import caption_meteor, format_reward

        values = caption_meteor(texts, caption=[row["caption"]] * len(texts)) + format_reward(
            texts, task=["mask2caption"] * len(texts))
    else:
        from sa2va_rl.rl.rewards import token_f1

        values = token_f1(texts, solution=[row.get("solution")] * len(texts))
    ok = all(v is None or math.isfinite(v) for v in values)
    return Check("rewards", ok, f"{len(values)} values, all finite" if ok else f"non-finite: {values}",
                 "" if ok else "a reward returned NaN/inf: return None for 'no opinion' instead")


def _trace_hint() -> str:
    return "see the traceback above; " + traceback.format_exc(limit=1).strip().splitlines()[-1]
