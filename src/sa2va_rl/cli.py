"""The ``sa2va-rl`` command line: train | eval | filter | plan | make-tiny | make-data | demo | doctor."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field

logger = logging.getLogger("sa2va_rl")

EXIT_OK, EXIT_USAGE, EXIT_DATA, EXIT_NONFINITE, EXIT_REWARD, EXIT_IO = 0, 2, 3, 4, 5, 6


@dataclass
class TrainArgs:
    """What the run trains on; everything else is a Sa2VAGRPOConfig or Sa2VAModelArgs field."""

    model_path: str = field(default=None, metadata={"help": "Local directory of the model (from_pretrained): a "
                                                          "Sa2VA checkpoint, or any causal LM."})
    data_dir: str = field(default=None, metadata={"help": "Sa2VA: a GAR directory (*.arrow, *.parquet or *.jsonl, "
                                                        "or a gar_index.json subset from `sa2va-rl filter`). "
                                                        "Causal LM: DIR/train.jsonl."})
    task: str = field(default=None, metadata={"help": "Sa2VA only: mask2caption, caption2mask or both (the "
                                                      "default)."})
    seg_format: str = field(default="plain", metadata={
        "help": "Sa2VA caption2mask answers: 'plain' (Sa2VA's template answer 'Sure, [SEG].'; every rollout of a "
                "prompt alike) or 'think' (reasoning inside <think></think>, then the answer inside "
                "<answer></answer>; rewarded by think_format_reward and answer_iou on the answer's [SEG] masks; "
                "docs/segmentation.md). Needs --task caption2mask or both."})
    bad_rows: str = field(default="skip", metadata={"help": "Bad GAR rows: 'skip' (counted, reported in "
                                                            "stability.json) or 'error' (stop, naming file and row)."})
    reward: str = field(default="token_f1", metadata={"help": "Causal LM only: token_f1 or exact_match."})
    max_prompt_tokens: int = field(default=8192, metadata={
        "help": "Sa2VA: a GAR sample whose prompt (image tokens included) is longer is skipped and counted under "
                "bad_rows (a runaway caption would cost a step minutes and gigabytes); set it to the model's "
                "context minus max_completion_length."})
    cycle_reward: float = field(default=0.0, metadata={
        "help": "Sa2VA, mask2caption rows: weight of the cycle reward (0: off). Each sampled caption is segmented "
                "again by the model with its LoRA adapters off (the policy itself under full fine-tuning), on the "
                "same image, and rewarded with the IoU of that mask and the row's region. Reference-free; adds to "
                "METEOR and the judge. See docs/segmentation.md."})
    cycle_length_factor: bool = field(default=False, metadata={
        "help": "With --cycle_reward: multiply the IoU by the original trainer's length factor (captions under 25 "
                "words scaled down to 0.25x, over 120 words to 0.6x; docs/segmentation.md)."})
    allow_changed_run: bool = field(default=False, metadata={
        "help": "With --resume_from_checkpoint: resume although settings that define the run differ from the "
                "checkpoint's run_settings.json (model, task, num_generations, batch size, learning rate and "
                "schedule, max_steps); the differences are listed in a warning. A new --learning_rate applies from "
                "the resumed step on. Without it such a resume is refused (exit 2), naming each difference."})


def _merge_repeated(argv: list[str], flag: str) -> list[str]:
    """``--inject a --inject b`` -> ``--inject a b`` (the parser keeps only the last occurrence)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, *values] if values else [])


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """``--flag -1e-5`` -> ``--flag=-1e-5``: argparse reads a negative number in scientific notation as a flag
    ("expected one argument"); joined, the value reaches validation, which says what is wrong with it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


@dataclass
class PlanArgs:
    """`sa2va-rl plan` only: the device and engine to plan for (default: this machine and the launch environment)."""

    device_memory: float = field(default=None, metadata={
        "help": "GiB per device to plan for (default: this machine's GPU total minus 1.5 GiB, or on CPU the RAM "
                "available now)."})
    engine: str = field(default=None, metadata={
        "help": "none, ddp, fsdp, zero2 or zero3 (default: from --deepspeed / --fsdp and accelerate's launch "
                "environment)."})
    num_devices: int = field(default=None, metadata={"help": "Processes (GPUs) the run uses (default: WORLD_SIZE "
                                                             "or 1)."})


def _fail(code: int, message: str, command: str = "train") -> int:
    print(f"sa2va-rl {command}: {message}", file=sys.stderr)
    return code


def _train(argv: list[str]) -> int:
    import yaml
    from trl import TrlParser

    from sa2va_rl.models.sa2va import Sa2VAModelArgs, is_sa2va_checkpoint
    from sa2va_rl.rl.config import Sa2VAGRPOConfig
    from sa2va_rl.rl.judge import JudgeArgs

    argv = _join_negative_numbers(_merge_repeated(argv, "--inject"))
    parser = TrlParser((TrainArgs, Sa2VAModelArgs, Sa2VAGRPOConfig, JudgeArgs), prog="sa2va-rl train",
                       description="GRPO with guarded sampling and steps. Flags after --config FILE.yaml override it.")
    try:
        script, margs, config, jargs = parser.parse_args_and_config(args=argv)
    except ValueError as e:  # config validation: the message says how to fix
        return _fail(EXIT_USAGE, str(e))
    except yaml.YAMLError as e:  # --config FILE.yaml that does not parse: file and line
        mark = getattr(e, "problem_mark", None)
        where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else "--config"
        return _fail(EXIT_USAGE, f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}")
    if not script.model_path or not script.data_dir:
        return _fail(EXIT_USAGE, "--model_path and --data_dir are required")
    from sa2va_rl.models.layout import model_dir_problem

    if why := model_dir_problem(script.model_path):
        return _fail(EXIT_USAGE, why)
    from sa2va_rl.rl.resume_checks import output_dir_problem

    why = output_dir_problem(config.output_dir, script.model_path)  # before anything is loaded or written
    if why:
        return _fail(EXIT_USAGE, why)
    if script.bad_rows not in ("skip", "error"):
        return _fail(EXIT_USAGE, f"--bad_rows {script.bad_rows!r}: use skip or error")
    sa2va = is_sa2va_checkpoint(script.model_path)
    if not sa2va and script.task is not None:
        return _fail(EXIT_USAGE, f"--task {script.task}: {script.model_path} is a causal LM, not a Sa2VA checkpoint; "
                                 "--task applies to Sa2VA only (drop it, or point --model_path at a Sa2VA model)")
    from sa2va_rl.rl.tasks import SEG_FORMATS

    if script.seg_format not in SEG_FORMATS:
        return _fail(EXIT_USAGE, f"--seg_format {script.seg_format!r}: use plain (Sa2VA's template answer) or think "
                                 "(reasoning, then the answer)")
    if script.seg_format != "plain" and not sa2va:
        return _fail(EXIT_USAGE, f"--seg_format {script.seg_format}: {script.model_path} is a causal LM, not a Sa2VA "
                                 "checkpoint; --seg_format formats Sa2VA's caption2mask answers (drop it)")
    script.task = script.task or "both"
    if config.mask_loss_weight > 0 and (not sa2va or script.task == "mask2caption"):
        return _fail(EXIT_USAGE, f"--mask_loss_weight {config.mask_loss_weight}: the mask loss trains Sa2VA's "
                                 "caption2mask rows; use a Sa2VA checkpoint with --task caption2mask or both (or "
                                 "--mask_loss_weight 0)")
    if script.seg_format == "think" and script.task == "mask2caption":
        return _fail(EXIT_USAGE, "--seg_format think formats caption2mask answers; --task mask2caption has none: use "
                                 "--task caption2mask or both, or drop --seg_format")
    if jargs.judge_url and (not sa2va or script.task == "caption2mask"):
        return _fail(EXIT_USAGE, "--judge_url scores captions: it needs a Sa2VA checkpoint and --task mask2caption "
                                 "or both")
    if not script.cycle_reward >= 0:
        return _fail(EXIT_USAGE, f"--cycle_reward {script.cycle_reward}: use a weight >= 0 (0 turns it off)")
    if script.cycle_reward and (not sa2va or script.task == "caption2mask"):
        return _fail(EXIT_USAGE, "--cycle_reward re-segments mask2caption captions: it needs a Sa2VA checkpoint and "
                                 "--task mask2caption or both (drop --cycle_reward for caption2mask)")
    if script.cycle_length_factor and not script.cycle_reward:
        return _fail(EXIT_USAGE, "--cycle_length_factor scales the cycle reward: add --cycle_reward WEIGHT (> 0)")
    try:  # before any model loads (the trainer would create it, with a traceback)
        os.makedirs(config.output_dir, exist_ok=True)
    except OSError as e:
        return _fail(EXIT_IO, _io_error(e, config.output_dir))
    resumed = _check_resume(script, config, sa2va)  # before any model loads
    if isinstance(resumed, int):
        return resumed
    settings, old_settings = resumed
    run = _build_sa2va_run if sa2va else _build_causal_run
    built = run(script, margs, config, jargs)
    if isinstance(built, int):
        return built
    trainer, save = built
    trainer.run_settings = settings
    old_lr = old_settings.get("learning_rate")
    if isinstance(old_lr, (int, float)) and old_lr > 0 and old_lr != config.learning_rate:  # allowed: applied
        from sa2va_rl.rl.resume_checks import LearningRateChange

        trainer.add_callback(LearningRateChange(old_lr, config.learning_rate))
    rc = _run_training(trainer, config, save)
    del built, trainer, save  # the DDP/FSDP wrappers hold the process group: let them go before it is torn down
    _close_process_group(rc == EXIT_OK)
    return rc


def _plan(argv: list[str]) -> int:
    """Print the run's memory per device by part and whether it fits (exit 0), or why not (exit 1)."""
    from trl import TrlParser

    from sa2va_rl.models.layout import model_dir_problem
    from sa2va_rl.models.sa2va import Sa2VAModelArgs, is_sa2va_checkpoint
    from sa2va_rl.plan import ENGINES, GiB, PlanError, check_limits, prompt_token_lengths
    from sa2va_rl.rl.config import Sa2VAGRPOConfig

    parser = TrlParser((TrainArgs, Sa2VAModelArgs, Sa2VAGRPOConfig, PlanArgs), prog="sa2va-rl plan",
                       description="Memory per device and context length of a run, from config.json and the weight "
                                   "headers, before anything loads. Takes train's command line unchanged (and --config FILE.yaml), so a run "
                                   "can be planned by swapping `train` for `plan`; flags that do not change memory "
                                   "or context length have no effect here.")
    try:
        script, margs, config, pargs = parser.parse_args_and_config(args=_join_negative_numbers(argv))
    except ValueError as e:
        return _fail(EXIT_USAGE, str(e), "plan")
    if not script.model_path:
        return _fail(EXIT_USAGE, "--model_path is required", "plan")
    if why := model_dir_problem(script.model_path):
        return _fail(EXIT_USAGE, why, "plan")
    if pargs.engine is not None and pargs.engine not in ENGINES:
        return _fail(EXIT_USAGE, f"--engine {pargs.engine!r}: use one of {', '.join(ENGINES)}", "plan")
    sa2va = is_sa2va_checkpoint(script.model_path)
    lengths = None
    if not sa2va and script.data_dir:
        from transformers import AutoTokenizer

        from sa2va_rl.data.prompts import DataError, load_prompt_dataset

        try:
            prompts = list(load_prompt_dataset(script.data_dir)["prompt"])
        except DataError as e:
            return _fail(EXIT_DATA, str(e), "plan")
        tok = AutoTokenizer.from_pretrained(script.model_path, trust_remote_code=config.trust_remote_code)
        lengths = prompt_token_lengths(tok, prompts)
    budget = None if pargs.device_memory is None else int(pargs.device_memory * GiB)
    try:
        limits = check_limits(script.model_path, config, margs if sa2va else None, lengths, script.max_prompt_tokens,
                              budget, f"--device_memory {pargs.device_memory:g} GiB" if budget else None,
                              pargs.engine, pargs.num_devices)
    except PlanError as e:
        return _fail(EXIT_USAGE, str(e), "plan")
    d, s = limits.dims, limits.shape
    g = max(1, config.num_generations)
    print(f"model   {script.model_path}: {'Sa2VA' if sa2va else 'causal LM'}, {d.params:,} parameters; LLM "
          f"{d.layers} layers x {d.hidden} wide, {d.kv_heads} KV heads, vocabulary {d.vocab:,}, context {d.context:,}")
    print(f"run     {s.rows // g} prompt(s) x {g} generations per device step ({s.generation_rows} generated at once), "
          f"{s.prompt_tokens} prompt + {s.completion_tokens} completion tokens"
          f"{'' if sa2va or lengths else ' (prompt length unknown: pass --data_dir)'}; "
          f"{f'LoRA r={s.lora_r}' if s.lora_r else 'full fine-tuning'}; {'bf16' if s.compute_bytes == 2 else 'fp32'}"
          f"; gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}; {s.engine} x {s.devices}")
    print("memory per device (estimate, docs/scale.md):")
    print("\n".join(limits.plan.table()))
    if limits.context_error:
        print(f"context: {limits.context_error}")
    if limits.memory_error:
        print(f"memory:  {limits.memory_error}")
    else:
        print(f"fits: {limits.plan.total / GiB:.2f} of {limits.budget / GiB:.2f} GiB; the largest --num_generations "
              f"that fits is {limits.largest_g}")
    return 1 if (limits.context_error or limits.memory_error) else EXIT_OK


def _check_resume(script, config, sa2va: bool):
    """This run's settings and the resumed checkpoint's ({} when not resuming); or an exit code: a checkpoint
    whose state files are missing or corrupt, whose settings differ (without --allow_changed_run), or a run that
    already finished (exit 0, nothing trained or written)."""
    from sa2va_rl.rl.resume_checks import ResumeError, check_resume, check_settings, run_settings

    settings = run_settings(script.model_path, script.task if sa2va else f"causal LM ({script.reward})", config)
    resume = config.resume_from_checkpoint
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
    if not resume:
        return settings, {}
    if not os.path.isdir(resume):
        return _fail(EXIT_USAGE, f"--resume_from_checkpoint {resume}: no such checkpoint directory; pass a "
                                 f"checkpoint-N directory, or latest (the newest in --output_dir)")
    try:
        trainer_state = check_resume(resume, config.output_dir)
        old = check_settings(resume, settings, script.allow_changed_run)
    except ResumeError as e:
        return _fail(EXIT_USAGE, str(e))
    step = trainer_state["global_step"]
    target = config.max_steps if config.max_steps > 0 else trainer_state.get("max_steps")
    if isinstance(target, int) and target > 0 and step >= target:
        print(f"sa2va-rl train: run already finished at step {step} ({resume}, max_steps {target}); nothing to "
              "do. To train further, raise --max_steps and pass --allow_changed_run true; for a new run, pass a new "
              "--output_dir")
        return EXIT_OK
    return settings, old


def _check_limits(script, config, margs=None, prompt_lengths=None) -> int | None:
    """Before the model loads (plan.py): the completion against the model's context, and the memory estimate
    against the device (``--memory_check``). An exit code when the run cannot fit, else None."""
    from sa2va_rl.plan import GiB, PlanError, check_limits

    try:
        limits = check_limits(script.model_path, config, margs, prompt_lengths, script.max_prompt_tokens)
    except (PlanError, KeyError, ValueError, TypeError) as e:
        logger.warning("context and memory not checked before loading: %s", e)
        return None
    if limits.context_error:
        return _fail(EXIT_USAGE, limits.context_error)
    if config.memory_check and limits.memory_error:
        return _fail(EXIT_USAGE, limits.memory_error)
    logger.info("estimated memory per device: %.2f GiB (%s)", limits.plan.total / GiB,
                ", ".join(f"{k} {v / GiB:.2f}" for k, v in limits.plan.parts.items()))
    return None


def _close_process_group(ok: bool) -> None:
    """Tear the process group down before the interpreter exits: left to exit-time destructors, gloo can abort
    one rank ("terminate called without an active exception") after a run that finished (seen twice in 3 CI runs of
    about 8 two-process runs each, once after a barrier and destroy_process_group alone). So the trainer is released
    first: its DDP/FSDP wrappers hold references to the group, which would otherwise be freed only at interpreter
    exit. Ranks that finished meet at a barrier, so none closes its side while another still talks to it; after a
    failure there is no barrier (the other ranks may never arrive)."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # the trainer's wrappers and their references to the group go now, not at exit
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def _build_causal_run(script, margs, config, jargs=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sa2va_rl.data.prompts import DataError, load_prompt_dataset
    from sa2va_rl.rl.rewards import REWARDS
    from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer

    if script.reward not in REWARDS:
        return _fail(EXIT_USAGE, f"--reward {script.reward!r} is not one of {sorted(REWARDS)}")
    try:
        dataset = load_prompt_dataset(script.data_dir)
    except DataError as e:
        return _fail(EXIT_DATA, str(e))
    from sa2va_rl.models.layout import LayoutError, verify_weight_files
    from sa2va_rl.models.upstream import is_remote_code, read_config

    if is_remote_code(read_config(script.model_path)) and not config.trust_remote_code:
        return _fail(EXIT_USAGE, f"{script.model_path}: its config.json names its own modeling code (auto_map); "
                                 "loading it runs that code. Pass --trust_remote_code if you trust this checkpoint.")
    try:
        verify_weight_files(script.model_path)
    except LayoutError as e:
        return _fail(EXIT_USAGE, str(e))
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(script.model_path, trust_remote_code=config.trust_remote_code)
    from sa2va_rl.plan import prompt_token_lengths

    rc = _check_limits(script, config, prompt_lengths=prompt_token_lengths(tokenizer, dataset["prompt"]))
    if rc is not None:
        return rc
    model = AutoModelForCausalLM.from_pretrained(script.model_path, dtype=dtype,
                                                 trust_remote_code=config.trust_remote_code)
    trainer = Sa2VAGRPOTrainer(model=model, reward_funcs=[REWARDS[script.reward]], args=config,
                               train_dataset=dataset, processing_class=tokenizer)
    logger.info("training causal LM %s on %d prompts from %s", script.model_path, len(dataset), script.data_dir)
    return trainer, lambda: trainer.save_model(config.output_dir)


def _build_sa2va_run(script, margs, config, jargs=None):
    import torch

    from sa2va_rl.data.gar import GARReader
    from sa2va_rl.models.layout import LayoutError
    from sa2va_rl.models.sa2va import SAVE_DTYPES, load_sa2va, make_policy, prepare_for_training, save_sa2va
    from sa2va_rl.models.upstream import UpstreamLoadError
    from sa2va_rl.rl.tasks import GARTaskDataset, task_list, task_rewards
    from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer

    try:
        tasks = task_list(script.task)
    except ValueError as e:
        return _fail(EXIT_USAGE, f"--task: {e}")
    try:
        reader = GARReader(script.data_dir, bad_rows=script.bad_rows)
    except (FileNotFoundError, ValueError) as e:
        return _fail(EXIT_DATA, str(e))
    rc = _check_limits(script, config, margs)
    if rc is not None:
        return rc
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    try:
        model, tokenizer = load_sa2va(script.model_path, dtype, trust_remote_code=config.trust_remote_code)
        policy = make_policy(model, tokenizer, script.model_path, margs.max_tiles, config.trust_remote_code)
    except (ValueError, UpstreamLoadError, LayoutError) as e:
        return _fail(EXIT_USAGE, str(e))
    from transformers import set_seed

    set_seed(config.seed)  # the LoRA init draws before the trainer seeds anything: same --seed, same run
    prepare_for_training(model, margs, mask_loss=config.mask_loss_weight > 0)
    judge = jargs.build() if jargs is not None else None
    try:
        funcs, weights = task_rewards(tasks, judge=judge, cycle_weight=script.cycle_reward,
                                      cycle_length_factor=script.cycle_length_factor, seg_format=script.seg_format,
                                      meteor=config.caption_meteor_impl)
    except ValueError as e:  # --caption_meteor_impl meteor-1.5 where it cannot run
        return _fail(EXIT_USAGE, str(e))
    if config.reward_weights is None:
        config.reward_weights = weights
    elif len(config.reward_weights) != len(funcs):
        return _fail(EXIT_USAGE, f"--reward_weights has {len(config.reward_weights)} values; task {script.task!r} "
                                 f"has {len(funcs)} rewards: {[f.__name__ for f in funcs]}")
    dataset = GARTaskDataset(reader, policy, tasks, max_prompt_tokens=script.max_prompt_tokens,
                             seg_format=script.seg_format)
    try:
        trainer = Sa2VAGRPOTrainer(model=model, reward_funcs=funcs, args=config, train_dataset=dataset.to_dataset(),
                                   processing_class=tokenizer, policy=policy)
    except ValueError as e:  # a setup the trainer refuses at start (engine, options): the message says why and how
        return _fail(EXIT_USAGE, str(e))
    trainer.stability.extras["bad_rows"] = lambda: {f"{f}:{fld}": n for (f, fld), n in reader.bad_counts.items()}
    if judge is not None:
        trainer.stability.extras["judge"] = judge.report
    if "tensorboard" in (config.report_to or []):
        from sa2va_rl.eval.callbacks import SampleImagesCallback

        trainer.add_callback(SampleImagesCallback(policy, dataset, callbacks=trainer.callback_handler.callbacks))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("training Sa2VA %s (%s trainable parameters, LoRA r=%d) on %d GAR samples x tasks %s from %s",
                script.model_path, f"{trainable:,}", margs.lora_r, len(reader), tasks, script.data_dir)

    def save() -> None:
        if config.should_save:
            save_sa2va(trainer.accelerator.unwrap_model(trainer.model), tokenizer, config.output_dir,
                       SAVE_DTYPES[margs.save_dtype])
        if reader.bad_counts:
            logger.warning("bad GAR rows skipped: %s", reader.bad_report())

    return trainer, save


def _run_training(trainer, config, save) -> int:
    from sa2va_rl.rl.run_lock import OutputDirBusy, RunLock

    logger.info("%d prompts x %d generations per device step, lr %g, bf16 %s",
                config.per_device_train_batch_size // config.num_generations, config.num_generations,
                config.learning_rate, config.bf16)
    # one lock per run, held by its main process (the other ranks of the same run share the directory), taken
    # before anything touches the directory (the stale .staging cleanup included)
    lock = RunLock(config.output_dir) if trainer.accelerator.is_main_process else None
    refused = [None]  # (exit code, message) when the lock cannot be taken
    try:
        if lock is not None:
            lock.acquire()
    except OutputDirBusy as e:
        refused[0] = (EXIT_USAGE, str(e))
    except OSError as e:  # output_dir not writable: the first write of the run
        refused[0] = (EXIT_IO, _io_error(e, config.output_dir))
    if trainer.accelerator.num_processes > 1:  # every rank stops, or none does
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(refused, from_process=0)
    if refused[0] is not None:
        return _fail(*refused[0])
    try:
        return _train_and_save(trainer, config, save)
    finally:
        if lock is not None:
            lock.release()


def _train_and_save(trainer, config, save) -> int:
    from sa2va_rl.data.gar import BadRow, NoGoodRows
    from sa2va_rl.rl.reward_guard import RewardError
    from sa2va_rl.rl.signals import GracefulStop
    from sa2va_rl.rl.stability import NonFiniteTrainingError

    resume = config.resume_from_checkpoint
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
        logger.info("--resume_from_checkpoint latest: %s", resume or f"no checkpoint in {config.output_dir}, "
                                                                      "starting from the beginning")
    if resume:
        from sa2va_rl.models.layout import resume_mismatch
        from sa2va_rl.rl.checkpoints import checkpoint_state

        why = resume_mismatch(resume, trainer.accelerator.unwrap_model(trainer.model),
                              (trainer.run_settings or {}).get("weights_fingerprint"))
        written_by = (checkpoint_state(resume) or {}).get("world_size")  # None: a checkpoint from before it was kept
        if why is None and written_by not in (None, trainer.accelerator.num_processes):
            why = (f"{written_by} process(es) wrote it, this run has {trainer.accelerator.num_processes}: the global "
                   "batch, the data order and the per-rank RNG states depend on it")
        if why:
            return _fail(EXIT_USAGE, f"--resume_from_checkpoint {resume}: it was written by another setup ({why}); "
                                     "resume with that run's setup (--lora_r, --model_path, number of processes, "
                                     "...) or start a new --output_dir")
    stop = GracefulStop(config.save_on_signal)
    trainer.add_callback(stop)
    stop.install()
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteTrainingError as e:
        return _fail(EXIT_NONFINITE, f"stopped: {e}")
    except NoGoodRows as e:
        return _fail(EXIT_DATA, str(e))
    except BadRow as e:
        return _fail(EXIT_DATA, f"bad data row (pass --bad_rows skip to count and skip such rows): {e}")
    except RewardError as e:
        return _fail(EXIT_REWARD, str(e))
    except OSError as e:  # a full, failing or read-only disk under output_dir
        return _fail(EXIT_IO, _io_error(e, config.output_dir))
    finally:
        stop.uninstall()
    if stop.received is not None:
        import signal

        saved = (f"checkpoint-{stop.saved_at} saved in {config.output_dir}; continue with "
                 "--resume_from_checkpoint latest" if stop.saved_at is not None else "no checkpoint saved "
                 "(--save_on_signal false)")
        return _fail(stop.exit_code, f"stopped by {signal.Signals(stop.received).name} after step "
                                     f"{trainer.state.global_step}: {saved}")
    try:
        save()
    except OSError as e:
        return _fail(EXIT_IO, _io_error(e, config.output_dir, "the final model was not saved"))
    if trainer.accelerator.is_main_process:
        print(trainer.stability.summary_line(trainer.state.global_step))
        print(f"model and stability.json written to {config.output_dir}")
    return EXIT_OK


def _io_error(e: OSError, output_dir: str, what: str = "") -> str:
    """The first I/O error of the run, then what is left and how to go on."""
    import errno

    from sa2va_rl.rl.checkpoints import last_good_checkpoint

    name = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    try:
        good = last_good_checkpoint(output_dir)
    except OSError:  # listing the directory fails too (ENOTDIR, EIO)
        good = None
    kept = (f"the last complete checkpoint, {good}, is intact (a checkpoint whose writing failed is never used)"
            if good else "no complete checkpoint in the output directory")
    fix = {"ENOSPC": "free space", "EACCES": "make it writable", "EROFS": "make it writable",
           "EPERM": "make it writable"}.get(name, "check the disk")
    return (f"I/O error: {e.strerror or e} ({name or type(e).__name__}) at {e.filename or output_dir}"
            f"{'; ' + what if what else ''}; {kept}. {fix.capitalize()} under {output_dir} and continue with "
            "--resume_from_checkpoint latest")


def _eval(argv: list[str]) -> int:
    """``sa2va-rl eval``: the library is sa2va_rl.eval.runner; here only flags and exit codes."""
    from transformers import HfArgumentParser

    from sa2va_rl.eval.runner import EvalArgs, run_eval
    from sa2va_rl.rl.judge import JudgeArgs

    parser = HfArgumentParser((EvalArgs, JudgeArgs), prog="sa2va-rl eval",
                              description="Score a Sa2VA checkpoint (and --compare another) on a held-out GAR split.")
    try:
        args, jargs = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:
        return _fail(EXIT_USAGE, str(e), "eval")
    from sa2va_rl.data.gar import BadRow, NoGoodRows
    from sa2va_rl.models.layout import LayoutError
    from sa2va_rl.models.upstream import UpstreamLoadError

    from sa2va_rl.eval.runner import EvalStopped
    from sa2va_rl.rl.run_lock import OutputDirBusy
    from sa2va_rl.rl.signals import GracefulStop

    judge = jargs.build()
    stop = GracefulStop(save_on_signal=False, doing="batch of answers")
    stop.install()
    try:
        payload = run_eval(args, judge, stop)
    except EvalStopped as e:
        return _fail(e.code, str(e), "eval")
    except KeyboardInterrupt:  # a second Ctrl-C: out at once
        return _fail(128 + 2, "stopped at once by a second SIGINT: no predictions or metrics written", "eval")
    except OutputDirBusy as e:
        return _fail(EXIT_USAGE, str(e), "eval")
    except (FileNotFoundError, NoGoodRows, BadRow) as e:
        return _fail(EXIT_DATA, str(e), "eval")
    except (ValueError, UpstreamLoadError, LayoutError) as e:
        return _fail(EXIT_USAGE, str(e), "eval")
    except OSError as e:  # out_dir cannot be created or written
        return _fail(EXIT_IO, f"I/O error: {e.strerror or e} at {e.filename or args.out_dir}: fix --out_dir "
                              "(space, permissions) and run the eval again", "eval")
    finally:
        stop.uninstall()
        if judge is not None:
            judge.close()
    meteor = payload["settings"]["meteor"]
    print(f"METEOR: {meteor['implementation']}" + ("" if payload["settings"]["meteor_impl"] == "meteor-1.5"
                                                   else f" ({meteor['note']})"))
    print(payload["table"], end="")
    print(f"wrote metrics.json, metrics.md, predictions-*.jsonl and samples.png to {args.out_dir}")
    return EXIT_OK


def _filter(argv: list[str]) -> int:
    """``sa2va-rl filter``: the library is sa2va_rl.filter; here only flags and exit codes."""
    from transformers import HfArgumentParser

    from sa2va_rl.filter import FilterArgs, FilterConfigMismatch, ScoresFileError, run_filter

    parser = HfArgumentParser(FilterArgs, prog="sa2va-rl filter",
                              description="Score GAR samples by the std of their rewards over G rollouts, sampled and "
                                          "rewarded as train does, and write the top K as a data dir for train.")
    try:
        (args,) = parser.parse_args_into_dataclasses(args=_join_negative_numbers(argv))
    except ValueError as e:
        return _fail(EXIT_USAGE, str(e), "filter")
    from sa2va_rl.data.gar import BadRow, DataFileError, NoGoodRows
    from sa2va_rl.models.layout import LayoutError
    from sa2va_rl.models.upstream import UpstreamLoadError
    from sa2va_rl.rl.reward_guard import RewardError
    from sa2va_rl.rl.run_lock import OutputDirBusy

    try:
        payload = run_filter(args)
    except (FilterConfigMismatch, OutputDirBusy) as e:
        return _fail(EXIT_USAGE, str(e), "filter")
    except (FileNotFoundError, NoGoodRows, BadRow, DataFileError, ScoresFileError) as e:  # ValueErrors: first
        return _fail(EXIT_DATA, str(e), "filter")
    except (ValueError, UpstreamLoadError, LayoutError) as e:
        return _fail(EXIT_USAGE, str(e), "filter")
    except RewardError as e:
        return _fail(EXIT_REWARD, str(e), "filter")
    except OSError as e:
        return _fail(EXIT_IO, f"I/O error: {e.strerror or e} at {e.filename or args.out_dir}; the scores saved so "
                              "far are kept: fix it and re-run the same command to continue", "filter")
    print(payload["table"], end="")
    print(f"wrote scores.jsonl, std_hist.png and summary.md to {args.out_dir}; train on the top "
          f"{payload['summary']['selected']} with --data_dir {payload['subset_dir']}")
    return EXIT_OK


def _make_tiny(args: argparse.Namespace) -> int:
    if args.kind == "sa2va":
        from sa2va_rl.models.tiny_sa2va import make_tiny_sa2va

        print(f"tiny Sa2VA-compatible model written to {make_tiny_sa2va(args.out_dir, seed=args.seed)}")
        return EXIT_OK
    from sa2va_rl.models.tiny import make_tiny_causal

    print(f"tiny causal LM written to {make_tiny_causal(args.out_dir, seed=args.seed)}")
    return EXIT_OK


def _make_data(args: argparse.Namespace) -> int:
    if args.kind == "gar":
        from sa2va_rl.data.synthetic import make_gar_data

        out = make_gar_data(args.out_dir, n=args.n, seed=args.seed)
        print(f"synthetic GAR data (Fine-Grained-Dataset/*.arrow) written to {out}")
        return EXIT_OK
    from sa2va_rl.data.prompts import make_prompt_data

    print(f"prompt data written to {make_prompt_data(args.out_dir, n=args.n, seed=args.seed)}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from sa2va_rl.demo import run_demo

    extra = {} if args.steps is None else {"steps": args.steps}
    return run_demo(out_dir=args.out_dir, seed=args.seed, beta=args.beta, dynamic_sampling=args.dynamic_sampling,
                    task=args.task, segmentation=args.segmentation, mask_loss_weight=args.mask_loss_weight, **extra)


def _doctor(args: argparse.Namespace) -> int:
    from sa2va_rl.doctor import run_doctor

    return run_doctor(args.model_path, args.data_dir, trust_remote_code=args.trust_remote_code,
                      max_rows=args.max_rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sa2va-rl",
        description="Numerically guarded GRPO fine-tuning of Sa2VA (and any Hugging Face causal LM) on TRL.",
        epilog="`sa2va-rl train --help` lists every training flag (TRL's GRPOConfig plus the stability fields).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("train", help="GRPO training: --model_path M --data_dir D [--config FILE.yaml] [--flag value ...]",
                   add_help=False)
    sub.add_parser("eval", help="score a checkpoint on a held-out GAR split (METEOR, CIDEr-D, judge, gIoU, cIoU): "
                                "--model_path M --data_dir D [--compare OTHER]", add_help=False)
    sub.add_parser("filter", help="keep the GAR samples whose rewards vary most over G rollouts (the Sa2VA "
                                  "authors' 2k filter): --model_path M --data_dir D --out_dir O --num_generations G "
                                  "--top_k K; writes O/subset, a data dir for train", add_help=False)
    sub.add_parser("plan", help="memory per device (weights, trained states, KV cache, activations) and context "
                                "length of a run, before anything loads: train's flags plus --device_memory GIB "
                                "--engine none|ddp|fsdp|zero2|zero3 --num_devices N", add_help=False)
    tiny = sub.add_parser("make-tiny", help="write a tiny model built in code (no download) to OUT_DIR")
    tiny.add_argument("--kind", choices=["causal", "sa2va"], default="causal",
                      help="causal: a Qwen2 LM; sa2va: a Sa2VA-compatible model (vision, LM, [SEG] decoder)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("out_dir")
    tiny.set_defaults(func=_make_tiny)
    data = sub.add_parser("make-data", help="write a small synthetic dataset to OUT_DIR")
    data.add_argument("--kind", choices=["prompts", "gar"], default="prompts")
    data.add_argument("--n", type=int, default=64, help="number of rows")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("out_dir")
    data.set_defaults(func=_make_data)
    demo = sub.add_parser("demo", help="a short GRPO run on the built-in tiny Sa2VA model and synthetic GAR data; "
                                       "writes samples.png and curves.png")
    demo.add_argument("--out_dir", default="sa2va-rl-demo", help="where the model, data, logs and PNGs go")
    demo.add_argument("--steps", type=int, default=None, help="GRPO steps (default: sa2va_rl/demo.py's STEPS)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--task", choices=["mask2caption", "both"], default="mask2caption",
                      help="what GRPO trains on (the warm start always covers both tasks); 'both' adds caption2mask, "
                           "whose template answers ('Sure, [SEG].') give GRPO identical groups")
    demo.add_argument("--beta", type=float, default=None,
                      help="KL penalty to the warm-started model (default: the demo's own, see sa2va_rl/demo.py)")
    demo.add_argument("--dynamic_sampling", action="store_true",
                      help="refill groups with zero reward std from the data (DAPO), counted in the summary")
    demo.add_argument("--segmentation", action="store_true",
                      help="both halves learn: GRPO on both tasks with the mask loss on caption2mask rows "
                           "(rl/mask_loss.py), and the held-out masks' gIoU/cIoU printed before and after")
    demo.add_argument("--mask_loss_weight", type=float, default=None,
                      help="the mask loss's weight (default: 0, or the demo's SEGMENTATION_MASK_LOSS with "
                           "--segmentation; see sa2va_rl/demo.py)")
    demo.set_defaults(func=_demo)
    doctor = sub.add_parser("doctor", help="check versions, device, model, one guarded generation, one fp32 "
                                           "forward/backward, the data and the rewards; exit 1 on any failure")
    doctor.add_argument("--model_path", help="model directory to check")
    doctor.add_argument("--data_dir", help="data directory to check (GAR for Sa2VA models, train.jsonl otherwise)")
    doctor.add_argument("--trust_remote_code", action="store_true", help="allow the checkpoint's own code")
    doctor.add_argument("--max_rows", type=int, default=200, help="data rows to decode")
    doctor.set_defaults(func=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # TRL 1.16 passes transformers 5's deprecated gradient-checkpointing config field, reads the deprecated
    # is_gradient_checkpointing every step (and under ZeRO-3 calls the deprecated disable/enable around every
    # generation): harmless, not ours to fix, and repeated per rank; docs/troubleshooting.md
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated",
                            category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        import faulthandler

        faulthandler.enable(all_threads=True)  # a rank that aborts (SIGABRT/SIGSEGV) prints where every thread was
    if argv and argv[0] == "train":
        return _train(argv[1:])
    if argv and argv[0] == "eval":
        return _eval(argv[1:])
    if argv and argv[0] == "filter":
        return _filter(argv[1:])
    if argv and argv[0] == "plan":
        return _plan(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
