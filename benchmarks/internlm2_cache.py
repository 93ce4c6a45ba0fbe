"""InternLM2 (Sa2VA-8B/26B's LLM, the checkpoint's own pristine code) generating with the KV-cache bridge of
sa2va_rl.models.upstream (transformers 5's DynamicCache <-> the code's legacy tuples) vs the cache-free path (each
step a forward over the whole sequence), and vs transformers' own Qwen2 (the LLM of the other Sa2VA releases,
native DynamicCache) at equal width and depth. ``--arch phi3``: the same for the v1 code's Phi3 (its 4.x Cache API
bridge).

Per-new-token cost (generate() seconds / new tokens) at 16, 64 and 256 new tokens, from inputs_embeds (as Sa2VA
generates), a left-padded batch of prompts of different lengths, greedy with min_new_tokens = max_new_tokens and
the LogitsGuard. Medians of interleaved repeats in one run; greedy tokens are checked identical cached vs
cache-free. The upstream files come from ../shared/upstream (SA2VA_UPSTREAM_DIR overrides).

Run: python benchmarks/internlm2_cache.py [--arch internlm2|phi3 --hidden 256 --layers 4 --batch 4 --prompt 96 --repeats 3 --threads N
--cpu_time --device cuda]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM

from _timing import interleaved_medians
from sa2va_rl.numerics import LogitsGuard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.upstream's builder of the LLM alone
UPSTREAM = Path(os.environ.get("SA2VA_UPSTREAM_DIR", REPO.parent / "shared" / "upstream"))
NEW = (16, 64, 256)


def upstream_llm(arch: str, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int):
    """InternLM2ForCausalLM or Phi3ForCausalLM from the pristine sa2va_v1_llava_sam2 files, through the
    compatibility fixes."""
    from tests.upstream.internvl import build_upstream_llm

    return build_upstream_llm(arch, UPSTREAM / "sa2va_v1_llava_sam2", tempfile.mkdtemp(prefix=f"{arch}_"),
                              hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, ffn=ffn, vocab=vocab)


def qwen2(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int):
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        num_key_value_heads=kv_heads, tie_word_embeddings=False,
                                        rope_theta=1e6)).eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=["internlm2", "phi3"], default="internlm2")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=96, help="longest prompt; the others are shorter (left padding)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, nargs="+", default=list(NEW))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu_time", action="store_true", help="process CPU seconds instead of wall time")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)
    torch.set_grad_enabled(False)
    dtype, dev = getattr(torch, args.dtype), torch.device(args.device)
    dims = (args.hidden, args.layers, args.heads, args.kv_heads, args.ffn, args.vocab)
    ilm, qwen = upstream_llm(args.arch, *dims).to(dev, dtype), qwen2(*dims).to(dev, dtype)
    name = {"internlm2": "InternLM2", "phi3": "Phi3"}[args.arch]
    n = sum(p.numel() for p in ilm.parameters())
    torch.manual_seed(1)
    lengths = [max(4, args.prompt - 13 * i) for i in range(args.batch)]
    mask = torch.tensor([[0] * (args.prompt - n_) + [1] * n_ for n_ in lengths], device=dev)
    ids = torch.randint(3, args.vocab, mask.shape, device=dev) * mask
    clock = time.process_time if args.cpu_time else time.perf_counter
    unit = "wall" if clock is time.perf_counter else "CPU"
    print(f"== {name} (pristine upstream code, {n / 1e6:.1f}M parameters: hidden {args.hidden}, {args.layers} "
          f"layers, {args.heads}/{args.kv_heads} heads, vocab {args.vocab}) vs Qwen2 at the same sizes; batch "
          f"{args.batch}, prompts {lengths} tokens (left-padded to {args.prompt}), from inputs_embeds, greedy, "
          f"LogitsGuard; {args.device} {args.dtype}, {unit} time, {torch.get_num_threads()} thread(s), medians of "
          f"{args.repeats} interleaved repeats")
    print(f"  {'new':>4s} {name + ' cache-free':>22s} {name + ' cached':>18s} {'Qwen2 cached':>14s}"
          f"   {'free/cached':>11s} {'cached ' + name[:4] + '/Qwen2':>17s}  tokens identical")
    for new in args.new:
        gc = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=2,
                              pad_token_id=0)
        guard = LogitsGuard(eos_token_id=2)

        def run(model, cached):
            def fn():
                model.sa2va_rl_kv_cache = cached  # read by the bridge; transformers' Qwen2 ignores it
                out = model.generate(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask,
                                     generation_config=gc, logits_processor=LogitsProcessorList([guard]))
                guard.pop_repaired()
                return out
            return fn

        fns = {"free": run(ilm, False), "cached": run(ilm, True), "qwen": run(qwen, True)}
        same = fns["free"]().tolist() == fns["cached"]().tolist()
        med = interleaved_medians(fns, repeats=args.repeats, inner=1, warmup=1, clock=clock)
        per = {k: v / new for k, v in med.items()}
        print(f"  {new:>4d} {per['free'] * 1e3:>19.2f} ms {per['cached'] * 1e3:>15.2f} ms "
              f"{per['qwen'] * 1e3:>11.2f} ms   {med['free'] / med['cached']:>11.2f} "
              f"{med['cached'] / med['qwen']:>17.2f}  {same}")
    print("  (per new token: generate() time / new tokens, prefill included)")


if __name__ == "__main__":
    main()
