"""The ``sa2va-rl`` command line: train | demo | make-tiny | make-data."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("sa2va_rl")

NOT_YET = {
    "demo": "`sa2va-rl demo` (a short GRPO run on the tiny Sa2VA model and synthetic GAR data) is not yet "
            "available: it arrives with the Sa2VA policy and GAR data (issue C).",
}


def _not_yet(name: str):
    def run(_args: argparse.Namespace) -> int:
        print(NOT_YET[name], file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sa2va-rl",
        description="Numerically guarded GRPO fine-tuning of Sa2VA (and any Hugging Face causal LM) on TRL.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = sub.add_parser("demo", help="a short GRPO run on the built-in tiny Sa2VA model and synthetic GAR data")
    demo.set_defaults(func=_not_yet("demo"))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
