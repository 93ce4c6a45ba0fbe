"""``sa2va-rl demo``: a short GRPO run on the tiny Sa2VA model and synthetic GAR data, end to end.

It goes through the same code as ``sa2va-rl train`` on a real checkpoint (load_sa2va, Sa2VAPolicy,
GARTaskDataset, Sa2VAGRPOTrainer, save_sa2va), with settings sized for a laptop CPU (83 s on 2 idle cores):
the tiny LLM trains fully (no LoRA) at a high learning rate. A supervised warm start on both tasks (as Sa2VA
is SFT-trained before RL) teaches the answer formats, the masks and part of the colour/shape mapping; GRPO on
mask2caption then rewards METEOR plus the right colour and shape words (demo_eval.py), and the held-out captions'
colour/shape accuracy is printed before and after GRPO, greedy and sampled. The warm-started model is saved too, so
``sa2va-rl eval --model_path OUT/run --compare OUT/warm-start --data_dir OUT/gar-eval`` compares the two. It writes

* ``samples.png``: a few held-out samples: image, reference mask, predicted mask, reference and predicted caption;
* ``curves.png``: mean reward (overall and per reward function, smoothed), gradient norm, entropy and the
  stability counters per step (matplotlib);
* ``run/stability.json`` and the trained model in ``run/``, the warm-started one in ``warm-start/``.

Why these sizes: the tiny model's vision tower is random and frozen (as Sa2VA's is in RL), so the LLM has to learn
colour and shape from random features. With 96 training rows the warm start memorised them (train 23/24, held-out
6/24) and GRPO had nothing left to learn on them (training reward 0.95); with 1000 rows the warm start generalises
and GRPO's gains show on held-out samples. GRPO trains on mask2caption only by default: a caption2mask answer is the
template "Sure, [SEG]." for every prompt, so its groups are identical text with nothing for GRPO to compare, and
they halve the caption signal per step. ``--segmentation`` trains both tasks and adds the mask loss on caption2mask
rows (rl/mask_loss.py), the gradient that reaches the mask path, and prints the held-out masks' gIoU/cIoU before and
after; steps whose batch holds only template answers have near-zero entropy, so the entropy monitor warns on them.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

logger = logging.getLogger(__name__)


STEPS = 200  # GRPO steps
WARM_START_STEPS = 600  # supervised steps before GRPO (batch 8): captions that depend on the region
TRAIN_ROWS = 1000  # synthetic GAR rows to train on: few enough to write in seconds, enough not to be memorised
BETA = 0.0  # KL to the warm-started model
EVAL_SAMPLES = 48  # held-out samples whose captions are checked before and after GRPO
GRPO_TASKS = "mask2caption"
SEGMENTATION_MASK_LOSS = 16.0  # --segmentation's mask loss weight (rl/mask_loss.py; docs/segmentation.md: 1, 4, 16)
DEMO_METEOR = "nltk"  # the caption reward's METEOR: nltk's, pinned (see run_demo)
# torch's CPU threads, pinned: a float sum split over another number of threads rounds differently, and 200 steps of
# training turn that into other printed counts (seed 0: 1 thread printed 18/48 -> 19/48 where 2 threads print the
# README's numbers); pinned, the same seed prints the same numbers on any machine of the same CPU type
DEMO_THREADS = 2


def run_demo(out_dir: str = "sa2va-rl-demo", steps: int = STEPS, seed: int = 0,
             warm_start_steps: int = WARM_START_STEPS, learning_rate: float = 3e-4, beta: float | None = None,
             dynamic_sampling: bool = False, eval_samples: int = EVAL_SAMPLES, task: str = GRPO_TASKS,
             train_rows: int = TRAIN_ROWS, mask_loss_weight: float | None = None, mask_loss_rollouts: str = "best",
             segmentation: bool = False) -> int:
    """``segmentation``: GRPO on both tasks with the mask loss (SEGMENTATION_MASK_LOSS unless ``mask_loss_weight``),
    and the held-out masks' gIoU/cIoU printed before and after (docs/segmentation.md)."""
    if segmentation:
        task = "both"
        mask_loss_weight = SEGMENTATION_MASK_LOSS if mask_loss_weight is None else mask_loss_weight
    mask_loss_weight = mask_loss_weight or 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)
    try:
        return _run_demo(out_dir, steps, seed, warm_start_steps, learning_rate, beta, dynamic_sampling, eval_samples,
                         task, train_rows, mask_loss_weight, mask_loss_rollouts, segmentation)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir, steps, seed, warm_start_steps, learning_rate, beta, dynamic_sampling, eval_samples, task,
              train_rows, mask_loss_weight, mask_loss_rollouts, segmentation) -> int:
    from sa2va_rl.data.gar import GARReader
    from sa2va_rl.data.synthetic import make_gar_data
    from sa2va_rl.demo_eval import caption_accuracy, demo_rewards, mask_accuracy, sampled_accuracy
    from sa2va_rl.models.sa2va import Sa2VAModelArgs, Sa2VAPolicy, load_sa2va, prepare_for_training, save_sa2va
    from sa2va_rl.models.tiny_sa2va import make_tiny_sa2va
    from sa2va_rl.rl.config import Sa2VAGRPOConfig
    from sa2va_rl.rl.tasks import GARTaskDataset, task_list
    from sa2va_rl.rl.trainer import Sa2VAGRPOTrainer

    os.makedirs(out_dir, exist_ok=True)
    model_dir = make_tiny_sa2va(os.path.join(out_dir, "tiny-sa2va"), seed=seed)
    data_dir = make_gar_data(os.path.join(out_dir, "gar-train"), n=train_rows, seed=seed)
    held_out = make_gar_data(os.path.join(out_dir, "gar-heldout"), n=4, seed=seed + 1000, shards=1)
    eval_reader = GARReader(make_gar_data(os.path.join(out_dir, "gar-eval"), n=eval_samples, seed=seed + 2000,
                                          shards=1))
    run_dir = os.path.join(out_dir, "run")
    logger.info("demo: tiny Sa2VA in %s, synthetic GAR in %s, run in %s", model_dir, data_dir, run_dir)

    model, tokenizer = load_sa2va(model_dir)
    prepare_for_training(model, Sa2VAModelArgs(lora_r=0), mask_loss=mask_loss_weight > 0)
    policy = Sa2VAPolicy(model, tokenizer)
    tasks = task_list(task)
    # nltk's METEOR, not train's default METEOR 1.5: the demo runs on CPU in about a minute and prints numbers the
    # README (and tests/test_demo_learning.py) pin; a java process per run (~10 s to start, one more CPU busy)
    # and a system dependency would make it slower and its numbers depend on whether java is installed.
    funcs, weights = demo_rewards(tasks, meteor=DEMO_METEOR)
    reader = GARReader(data_dir)
    config = Sa2VAGRPOConfig(
        output_dir=run_dir, max_steps=steps, batch_size=4, num_generations=8, learning_rate=learning_rate,
        warmup_steps=2, max_completion_length=16, reward_weights=weights, logging_steps=1, save_strategy="no",
        report_to=["tensorboard"], seed=seed, stability_summary_steps=10, disable_tqdm=False,
        beta=BETA if beta is None else beta,
        dynamic_sampling=dynamic_sampling, mask_loss_weight=mask_loss_weight, mask_loss_rollouts=mask_loss_rollouts,
        caption_meteor_impl=DEMO_METEOR,
    )
    rows = GARTaskDataset(reader, policy, tasks)
    if warm_start_steps:
        both = rows if task == "both" else GARTaskDataset(reader, policy, task_list("both"))
        loss0, loss1 = warm_start(model, tokenizer, policy, both, warm_start_steps, seed)
        logger.info("warm start (supervised, %d steps): loss %.3f -> %.3f", warm_start_steps, loss0, loss1)
        save_sa2va(model, tokenizer, os.path.join(out_dir, "warm-start"))
    before = caption_accuracy(model, tokenizer, eval_reader)
    before_sampled = sampled_accuracy(model, policy, eval_reader, seed=seed)
    masks_before = mask_accuracy(model, policy, eval_reader) if segmentation else None
    trainer = Sa2VAGRPOTrainer(model=model, reward_funcs=funcs, args=config, processing_class=tokenizer,
                               train_dataset=rows.to_dataset(), policy=policy)
    trainer.train()
    after = caption_accuracy(model, tokenizer, eval_reader)
    after_sampled = sampled_accuracy(model, policy, eval_reader, seed=seed)
    masks_after = mask_accuracy(model, policy, eval_reader) if segmentation else None
    save_sa2va(model, tokenizer, run_dir)

    history = [h for h in trainer.state.log_history if "reward" in h]
    # a non-finite logged value is kept as None in log_history (strict JSON in trainer_state.json)
    rewards = [h["reward"] for h in history if h["reward"] is not None]
    k = max(1, min(5, len(rewards) // 4))
    first, last = float(np.mean(rewards[:k])), float(np.mean(rewards[-k:]))
    curves = plot_curves(history, os.path.join(out_dir, "curves.png"))
    samples = plot_samples(model, tokenizer, GARReader(held_out), os.path.join(out_dir, "samples.png"))
    print(f"mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    print(f"held-out captions naming the right colour and shape (greedy, {after.n} samples): "
          f"before GRPO {before.both}/{before.n} -> after GRPO {after.both}/{after.n}")
    print(f"  before GRPO: {before.line()}")
    print(f"  after GRPO:  {after.line()}")
    print(f"held-out captions sampled as in training ({after_sampled.k} per sample, temperature 1) naming the right "
          f"colour and shape: before GRPO {before_sampled.both}/{before_sampled.n * before_sampled.k} -> after GRPO "
          f"{after_sampled.both}/{after_sampled.n * after_sampled.k}")
    print(f"  before GRPO: {before_sampled.line()}")
    print(f"  after GRPO:  {after_sampled.line()}")
    if segmentation:
        print(f"held-out masks from the reference captions (caption2mask, greedy, {masks_after['n']} samples): gIoU "
              f"{masks_before['gIoU']:.4f} -> {masks_after['gIoU']:.4f}, cIoU {masks_before['cIoU']:.4f} -> "
              f"{masks_after['cIoU']:.4f}")
    print(zero_std_line(history, trainer.stability.counters.dynamic_sampling))
    print(trainer.stability.summary_line(trainer.state.global_step))
    print(f"wrote {samples}, {curves}, {os.path.join(run_dir, 'stability.json')} and the trained model in {run_dir}")
    if warm_start_steps:
        print(f"compare it with its warm start: sa2va-rl eval --model_path {run_dir} --compare "
              f"{os.path.join(out_dir, 'warm-start')} --data_dir {os.path.join(out_dir, 'gar-eval')}"
              + (" --task both" if segmentation else ""))
    return 0


def zero_std_line(history: list[dict], counts: dict) -> str:
    """The share of groups with zero reward std (no learning signal) in the batches trained on, and with dynamic
    sampling what it cost to refill them."""
    def mean(key: str) -> float:
        vals = [float(h[key]) for h in history if h.get(key) is not None]
        return float(np.mean(vals)) if vals else float("nan")

    if not counts:
        return f"groups with zero reward std: {mean('frac_reward_zero_std'):.1%} of the groups trained on"
    return (f"groups with zero reward std: {mean('dynamic_sampling/zero_std_share_drawn'):.1%} of those drawn, "
            f"{mean('dynamic_sampling/zero_std_share_trained'):.1%} of those trained on (dynamic sampling: "
            f"{counts['refilled_groups']} of {counts['zero_std_groups']} refilled, {counts['extra_groups']} extra "
            f"groups generated for {counts['groups']} drawn)")


def warm_start(model, tokenizer, policy, rows, steps: int, seed: int, batch: int = 8, lr: float = 3e-3):
    """A short supervised warm start, as Sa2VA is SFT-trained before RL: teacher-forced answers (the caption for
    mask2caption, ``Sure, [SEG].`` for caption2mask) plus a BCE mask loss through the [SEG] hidden state, so the
    random tiny model writes words and its masks mean something. Returns (first loss, last loss)."""
    import torch
    import torch.nn.functional as F

    from sa2va_rl.models.sa2va import lm_parts
    from sa2va_rl.models.grounding import encode_image, mask_logits

    _lm, backbone, head = lm_parts(model)
    decoder = [model.text_hidden_fcs, model.grounding_encoder]
    frozen = [p for m in decoder for p in m.parameters() if not p.requires_grad]  # frozen again afterwards
    for m in decoder:
        m.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        items = [rows[int(i)] for i in torch.randint(len(rows), (batch,), generator=gen)]
        seqs, starts = [], []
        for it in items:
            answer = it["caption"] if it["task"] == "mask2caption" else "Sure, [SEG]."
            p = tokenizer(it["prompt"]).input_ids
            seqs.append(p + tokenizer(answer, add_special_tokens=False).input_ids + [end])
            starts.append(len(p))
        width = max(map(len, seqs))
        ids = torch.tensor([s + [policy.pad_token_id] * (width - len(s)) for s in seqs])
        att = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        hidden = backbone(inputs_embeds=policy.embed(model, ids, [it["visual"] for it in items]),
                          attention_mask=att).last_hidden_state
        logits = head(hidden[:, :-1]).float()
        labels = ids[:, 1:].clone()
        for b, (s, st) in enumerate(zip(seqs, starts)):
            labels[b, : st - 1] = -100
            labels[b, len(s) - 1:] = -100
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        for b, it in enumerate(items):  # mask loss at the [SEG] of caption2mask answers
            if it["gt_mask"] is None:
                continue
            pos = seqs[b].index(policy.seg_id, starts[b])
            pred = mask_logits(model, hidden[b, pos:pos + 1], encode_image(model, it["visual"].image))  # [1, h', w']
            target = F.interpolate(torch.from_numpy(it["gt_mask"]).float()[None, None], size=pred.shape[-2:])[0]
            loss = loss + F.binary_cross_entropy_with_logits(pred, target) / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in frozen:
        p.requires_grad_(False)
    k = max(1, steps // 10)
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


# ------------------------------------------------------------------------------------------------ plots
def plot_curves(history: list[dict], path: str) -> str:
    """Reward per reward function (smoothed), gradient norm, entropy and the stability counters per step, from
    the trainer's log history (matplotlib: eval/plots.py)."""
    from sa2va_rl.eval.plots import plot_training_curves

    return plot_training_curves(history, path, title="GRPO on the tiny Sa2VA")


def plot_samples(model, tokenizer, reader, path: str) -> str:
    """Per held-out sample: the image, the reference mask, the mask the model predicts from the reference
    caption (caption2mask), and the caption it writes for the reference mask (mask2caption)."""
    from sa2va_rl.eval.plots import draw_samples
    from sa2va_rl.rl.rewards import mask_overlap
    from sa2va_rl.rl.tasks import DEFAULT_QUESTION, caption2mask_question

    model.eval()
    entries = []
    for i in range(len(reader)):
        s = reader.get(i)
        if s is None:
            continue
        caption = model.predict_forward(image=s.image, text="<image>\n" + (s.question or DEFAULT_QUESTION),
                                        tokenizer=tokenizer, mask_prompts=[s.mask])["prediction"]
        seg = model.predict_forward(image=s.image, text="<image>\n" + caption2mask_question(s.caption),
                                    tokenizer=tokenizer)
        pred = seg["prediction_masks"][0][0] if seg["prediction_masks"] else None
        inter, union = mask_overlap(pred, s.mask)
        entries.append({"image": s.image, "gt_mask": s.mask, "reference": s.caption,
                        "models": [{"label": "model", "mask": pred, "iou": inter / union if union else 0.0,
                                    "caption": caption.replace("<|im_end|>", "").strip()}]})
    return draw_samples(entries, path, title="held-out samples after GRPO (greedy)")
