"""Peak memory of scoring (per-token log-probs and entropies) at Qwen's vocabulary, each variant in its own process.

Unit: one fp32 [B, K, V] tensor (B=4, K=256, V=151,936: 622 MB). Each variant runs in a fresh subprocess that builds
last-layer hidden states [B, 16 + K, C] and an fp32 LM head [V, C] (C=64, so that the head's own gradient, which
every method pays, stays small), then scores once: without grad, and with grad (forward + backward of the summed
log-probs). On CUDA the peak is torch.cuda.max_memory_allocated above the baseline; on CPU it is the peak RSS
above the baseline, with glibc's mmap threshold fixed so that freed tensors go back to the OS.

Variants:
  before      the scoring before chunking: full fp32 logits gathered to [B, K, V], log_softmax and entropy over it
  trl         TRL's selective_log_softmax + entropy_from_logits on the full logits
  full        right_aligned_logprobs given full logits (the fallback for wrapped models: DDP, FSDP, DeepSpeed)
  chunked     right_aligned_logprobs with the head applied a chunk at a time (every plain model and Sa2VA)

Run: python benchmarks/scoring_memory.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

B, K, PROMPT, V, C = 4, 256, 16, 151_936, 64
UNIT = B * K * V * 4


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _before(forward, prompt_ids, prompt_mask, completion_ids, completion_mask):
    import torch
    import torch.nn.functional as F

    P = prompt_ids.shape[1]
    L = P + K
    ids = torch.cat([prompt_ids, completion_ids], 1)
    att = torch.cat([prompt_mask, completion_mask], 1)
    keep = K + 1
    logits = forward(ids, att, keep)
    pos = (P + torch.arange(K, device=ids.device) - 1 - (L - keep))[None].expand(B, K)
    logits = logits.gather(1, pos.unsqueeze(-1).expand(B, K, V)).float()
    drop = completion_mask == 0
    logits = torch.where(drop.unsqueeze(-1), 0.0, logits)
    logp_all = F.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all.clamp(min=torch.finfo(torch.float32).min)).sum(-1)
    return logps, entropy


def _trl(forward, prompt_ids, prompt_mask, completion_ids, completion_mask):
    import torch
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    ids = torch.cat([prompt_ids, completion_ids], 1)
    att = torch.cat([prompt_mask, completion_mask], 1)
    logits = forward(ids, att, K + 1)[:, :-1]
    return selective_log_softmax(logits, completion_ids), entropy_from_logits(logits)


def child(variant: str, grad: bool, device: str) -> dict:
    import torch

    from sa2va_rl.models.policy import right_aligned_logprobs

    torch.manual_seed(0)
    dev = torch.device(device)
    hidden = torch.randn(B, PROMPT + K, C, device=dev, requires_grad=grad)
    head = torch.nn.Linear(C, V, bias=False).to(dev)
    head.weight.requires_grad_(grad)
    prompt_ids = torch.randint(0, V, (B, PROMPT), device=dev)
    completion_ids = torch.randint(0, V, (B, K), device=dev)
    prompt_mask = torch.ones_like(prompt_ids)
    completion_mask = torch.ones_like(completion_ids)

    def logits(ids, att, keep):
        return head(hidden[:, -keep:])

    def tail(ids, att, keep):
        return hidden[:, -keep:]

    args = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    run = {
        "before": lambda: _before(logits, *args),
        "trl": lambda: _trl(logits, *args),
        "full": lambda: right_aligned_logprobs(logits, *args, 0),
        "chunked": lambda: right_aligned_logprobs(tail, *args, 0, head=head, head_rows=V),
    }[variant]
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss()
    with torch.set_grad_enabled(grad):
        lp, ent = run()
        if grad:
            lp.sum().backward()
    out = {"logp_sum": float(lp.detach().double().sum()), "entropy_sum": float(ent.double().sum())}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated() - base
    else:
        out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "GRAD"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.device)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    print(f"== scoring peak memory, B={B} K={K} V={V:,} C={C}, {args.device}; unit: one fp32 [B, K, V] tensor "
          f"({UNIT / 2**20:.0f} MiB)")
    targets = {False: 1.0, True: 2.0}
    for grad in (False, True):
        for variant in ("before", "trl", "full", "chunked"):
            res = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", variant, str(int(grad))],
                                 env=env, capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            ratio = r["peak"] / UNIT
            verdict = ""
            if variant == "chunked":
                verdict = f"  [{'ok' if ratio <= targets[grad] else 'MISSES'}, target <= {targets[grad]:.1f}]"
            print(f"  {'with grad' if grad else 'no grad  '}  {variant:<8s} peak {r['peak'] / 2**20:8.0f} MiB = "
                  f"{ratio:5.2f}x   logp sum {r['logp_sum']:.6e}  entropy sum {r['entropy_sum']:.6e}{verdict}")


if __name__ == "__main__":
    main()
