"""The ``sa2va-rl`` command line: train | make-tiny | make-data | demo."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field

logger = logging.getLogger("sa2va_rl")

EXIT_OK, EXIT_USAGE, EXIT_DATA, EXIT_NONFINITE = 0, 2, 3, 4

NOT_YET = {
    "demo": "`sa2va-rl demo` (a short GRPO run on the tiny Sa2VA model and synthetic GAR data) is not yet "
            "available: it arrives with the Sa2VA policy and GAR data (issue C). Meanwhile: "
            "`sa2va-rl make-tiny --kind causal M && sa2va-rl make-data --kind prompts D && "
            "sa2va-rl train --model_path M --data_dir D --max_steps 3 --output_dir O`.",
}


@dataclass
class TrainArgs:
    """What the run trains on; everything else is a Sa2VAGRPOConfig field."""

    model_path: str = field(default=None, metadata={"help": "Local directory of the model (from_pretrained)."})
    data_dir: str = field(default=None, metadata={"help": "Data directory (causal LM: DIR/train.jsonl)."})
    reward: str = field(default="token_f1", metadata={"help": "Built-in reward: token_f1 or exact_match."})


def _train(argv: list[str]) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import TrlParser

    from sa2va_rl.data.prompts import DataError, load_prompt_dataset
    from sa2va_rl.rl.config import Sa2VAGRPOConfig
    from sa2va_rl.rl.rewards import REWARDS
    from sa2va_rl.rl.stability import NonFiniteTrainingError
    from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer

    parser = TrlParser((TrainArgs, Sa2VAGRPOConfig), prog="sa2va-rl train",
                       description="GRPO with guarded sampling and steps. Flags after --config FILE.yaml override it.")
    try:
        script, config = parser.parse_args_and_config(args=argv)
    except ValueError as e:  # config validation: the message says how to fix
        print(f"sa2va-rl train: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not script.model_path or not script.data_dir:
        print("sa2va-rl train: --model_path and --data_dir are required", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isfile(os.path.join(script.model_path, "config.json")):
        print(f"sa2va-rl train: --model_path {script.model_path!r} has no config.json; pass a directory saved "
              "with save_pretrained (`sa2va-rl make-tiny --kind causal DIR` writes one)", file=sys.stderr)
        return EXIT_USAGE
    if script.reward not in REWARDS:
        print(f"sa2va-rl train: --reward {script.reward!r} is not one of {sorted(REWARDS)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        dataset = load_prompt_dataset(script.data_dir)
    except DataError as e:
        print(f"sa2va-rl train: {e}", file=sys.stderr)
        return EXIT_DATA

    dtype = torch.bfloat16 if config.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(script.model_path, trust_remote_code=config.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(script.model_path, dtype=dtype,
                                                 trust_remote_code=config.trust_remote_code)
    trainer = Sa2VAGRPOTrainer(model=model, reward_funcs=[REWARDS[script.reward]], args=config,
                               train_dataset=dataset, processing_class=tokenizer)
    logger.info("training %s on %d prompts from %s: %d prompts x %d generations per device step, lr %g, bf16 %s",
                script.model_path, len(dataset), script.data_dir,
                config.per_device_train_batch_size // config.num_generations, config.num_generations,
                config.learning_rate, config.bf16)
    try:
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    except NonFiniteTrainingError as e:
        print(f"sa2va-rl train: stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    trainer.save_model(config.output_dir)
    print(trainer.stability.summary_line(trainer.state.global_step))
    print(f"model and stability.json written to {config.output_dir}")
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


def _not_yet(name: str):
    def run(_args: argparse.Namespace) -> int:
        print(NOT_YET[name], file=sys.stderr)
        return EXIT_USAGE

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sa2va-rl",
        description="Numerically guarded GRPO fine-tuning of Sa2VA (and any Hugging Face causal LM) on TRL.",
        epilog="`sa2va-rl train --help` lists every training flag (TRL's GRPOConfig plus the stability fields).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("train", help="GRPO training: --model_path M --data_dir D [--config FILE.yaml] [--flag value ...]",
                   add_help=False)
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
    demo = sub.add_parser("demo", help="a short GRPO run on the built-in tiny Sa2VA model and synthetic GAR data")
    demo.set_defaults(func=_not_yet("demo"))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
