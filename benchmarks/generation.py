"""Generation of one GRPO step: the project's policy (one batched generate() for every group, with the LogitsGuard)
vs one plain batched ``model.generate()`` over the same left-padded rows, and vs the former one call per group.

8 prompts of different lengths x 4 generations x 64 new tokens, greedy (min_new_tokens = max_new_tokens, so every
variant decodes the same number of steps), on the tiny causal LM and on a random ~40M-parameter Qwen2 with Qwen's
151,936-row vocabulary. Medians of interleaved repeats in one run. Greedy tokens are checked equal across variants.

Run: python benchmarks/generation.py [--repeats 5 --big_repeats 3 --threads N --cpu_time]   (--big_repeats 0: the
tiny model only; --no-big_per_group: skip the slow one-call-per-group variant on the big model; --cpu_time: process
CPU seconds instead of wall time, for a CPU machine that other jobs load)
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM

from _timing import interleaved_medians, report
from sa2va_rl.models.policy import CausalLMPolicy, left_pad, prompt_groups
from sa2va_rl.models.tiny import make_tiny_causal
from sa2va_rl.numerics import LogitsGuard

GROUPS, G, NEW = 8, 4, 64


def per_group(model, prompts, gc, guard):
    """The former CausalLMPolicy.generate: one unpadded generate() per group."""
    out = []
    for s, e in prompt_groups(prompts):
        ids = torch.tensor(prompts[s:e])
        res = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gc,
                             logits_processor=LogitsProcessorList([guard]))
        guard.pop_repaired()
        out += res[:, ids.shape[1]:].tolist()
    return out


def bench(name, model, vocab, repeats, with_per_group=True, clock=time.perf_counter):
    torch.manual_seed(0)
    lengths = [8 + 5 * i for i in range(GROUPS)]
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in lengths for _ in range(G)]
    gc = GenerationConfig(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=2, pad_token_id=0)
    policy = CausalLMPolicy(pad_token_id=0)
    guard = LogitsGuard(eos_token_id=2)
    ids, mask = left_pad(prompts, 0, "cpu")

    def plain():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)[:, ids.shape[1]:].tolist()

    def project():
        return policy.generate(model, prompts, gc, guard).completion_ids

    fns = {"project (batched, guarded)": project, "plain batched generate()": plain}
    if with_per_group:
        fns["one call per group (before)"] = lambda: per_group(model, prompts, gc, guard)
    with torch.no_grad():
        outs = [fn() for fn in fns.values()]
        same = all(o == outs[0] for o in outs)
        medians = interleaved_medians(fns, repeats=repeats, inner=1, warmup=1, clock=clock)
    unit = "wall" if clock is time.perf_counter else "CPU"
    report(f"generation, {name}: {GROUPS} groups x {G} x {NEW} new tokens, greedy, {unit} time, "
           f"{torch.get_num_threads()} thread(s); tokens identical: {same}", medians,
           [("project (batched, guarded)", "plain batched generate()", 1.1)]
           + ([("one call per group (before)", "plain batched generate()", None)] if with_per_group else []))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--big_repeats", type=int, default=3)
    ap.add_argument("--big_per_group", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the former one call per group on the big model (--no-big_per_group: skip it)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--cpu_time", action="store_true",
                    help="time in process CPU seconds instead of wall time (a CPU machine loaded by other jobs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_grad_enabled(False)
    tiny = AutoModelForCausalLM.from_pretrained(make_tiny_causal(tempfile.mkdtemp())).eval()
    clock = time.process_time if args.cpu_time else time.perf_counter
    bench("tiny causal LM", tiny, tiny.config.vocab_size, args.repeats, clock=clock)
    if args.big_repeats < 1:
        return
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151_936, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    big = Qwen2ForCausalLM(cfg).eval()
    n = sum(p.numel() for p in big.parameters())
    bench(f"random Qwen2 {n / 1e6:.0f}M parameters, vocab 151,936", big, 151_936, args.big_repeats,
          with_per_group=args.big_per_group, clock=clock)


if __name__ == "__main__":
    main()
