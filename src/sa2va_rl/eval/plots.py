"""Figures with matplotlib (Agg, no display): training curves on a shared step axis, sample grids and the
filter's reward-std histogram (``plot_std_histogram``).

* ``plot_training_curves(history, path)``: from a Trainer's ``state.log_history``: the mean reward per reward
  function (raw points faint, an exponential moving average solid), the gradient norm, the entropy of the sampled
  tokens and the stability counters (skipped steps, repaired logit rows, dropped tokens, ...), one panel each,
  sharing the optimizer-step axis.
* ``draw_samples(entries)``: per sample, the image, the reference mask, each model's predicted mask (from the
  reference caption, through ``[SEG]``) and the captions (reference and each model's, for the reference mask).
  Used by ``sa2va-rl eval``, the demo and the TensorBoard sample-image callback.
"""

from __future__ import annotations

import textwrap

import numpy as np

STABILITY_KEYS = ["skipped_steps", "nonfinite_grad_steps", "repaired_rows", "dropped_tokens", "empty_completions",
                  "reward_errors", "nonfinite_rewards", "rollbacks"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def ema(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's smoothing: s_t = w s_{t-1} + (1 - w) x_t, debiased (the first point is x_0)."""
    out, s, norm = [], 0.0, 0.0
    for x in values:
        s = weight * s + (1 - weight) * x
        norm = weight * norm + (1 - weight)
        out.append(s / norm)
    return out


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for h in history:
        v = h.get(key)
        if v is None or "step" not in h:
            continue
        v = float(v)
        if np.isfinite(v):
            xs.append(float(h["step"]))
            ys.append(v)
    return xs, ys


def _smoothed(ax, xs, ys, label: str, color) -> None:
    ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1, marker="o", markersize=2.5)
    ax.plot(xs, ema(ys), color=color, linewidth=2, label=label)


def plot_training_curves(history: list[dict], path: str | None = None, title: str = "GRPO training"):
    """The figure (saved to ``path`` when given, then the path is returned)."""
    train = [h for h in history if "step" in h and ("reward" in h or "loss" in h or "grad_norm" in h)]
    fig = _figure(10, 11)
    axes = fig.subplots(4, 1, sharex=True)
    colors = [f"C{i}" for i in range(10)]
    reward_keys = ["reward"] + sorted({k for h in train for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    for i, key in enumerate(reward_keys):
        xs, ys = _series(train, key)
        if xs:
            name = "total (weighted)" if key == "reward" else key[len("rewards/"):-len("/mean")]
            _smoothed(axes[0], xs, ys, name, colors[i % 10])
    axes[0].set_ylabel("mean reward")
    axes[0].set_title(f"{title}: reward per function (faint: per step; solid: moving average)")
    for ax, key, label in ((axes[1], "grad_norm", "gradient norm\n(before clipping)"),
                           (axes[2], "entropy", "entropy of sampled\ntokens (nats)")):
        xs, ys = _series(train, key)
        if xs:
            _smoothed(ax, xs, ys, key, "C0")
        else:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_ylabel(label)
    drawn, top = 0, 0.0
    for i, name in enumerate(STABILITY_KEYS):
        xs, ys = _series(train, f"stability/{name}")
        if xs and (any(ys) or name in ("skipped_steps", "repaired_rows")):
            axes[3].step(xs, ys, where="post", color=colors[i % 10], linewidth=1.5, label=name)
            drawn, top = drawn + 1, max([top, *ys])
    from matplotlib.ticker import MaxNLocator

    axes[3].yaxis.set_major_locator(MaxNLocator(integer=True))  # counts
    axes[3].set_ylim(-0.05 * max(1.0, top), max(1.0, top) * 1.08)
    if not drawn:
        axes[3].text(0.5, 0.5, "no stability counters logged", ha="center", va="center",
                     transform=axes[3].transAxes, color="gray")
    axes[3].set_ylabel("stability counters\n(cumulative)")
    axes[3].set_xlabel("optimizer step")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path)
    return path


def mask_view(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The mask in white over a darkened image: readable whatever the region's colour."""
    out = np.asarray(image, dtype=np.float32) * 0.3
    out[np.asarray(mask, dtype=bool)] = 255.0
    return out.astype(np.uint8)


def draw_samples(entries: list[dict], path: str | None = None, title: str | None = None):
    """``entries``: one dict per sample: ``image`` (uint8 [H, W, 3]), ``gt_mask`` (bool [H, W]), ``reference``
    (caption) and ``models``: a list of {label, mask (bool [H, W], None: no [SEG]; key absent: not asked),
    caption (None: not asked)}. Returns the figure, or ``path`` once saved."""
    labels = [m["label"] for m in entries[0]["models"]] if entries else []
    ncols = 2 + len(labels) + 1  # image, reference mask, one predicted mask per model, captions
    fig = _figure(2.2 * (ncols - 1) + 5.0, 2.3 * max(1, len(entries)) + (0.4 if title else 0))
    widths = [1] * (ncols - 1) + [2.6]
    axes = fig.subplots(max(1, len(entries)), ncols, squeeze=False, gridspec_kw={"width_ratios": widths})
    heads = ["image", "reference mask"] + [f"{lab}: mask from caption" for lab in labels] + ["captions"]
    for j, h in enumerate(heads):
        axes[0][j].set_title(h, fontsize=9)
    for r, e in enumerate(entries):
        row = axes[r]
        row[0].imshow(e["image"])
        row[1].imshow(mask_view(e["image"], e["gt_mask"]))
        for j, m in enumerate(e["models"]):
            ax = row[2 + j]
            if "mask" not in m:
                ax.text(0.5, 0.5, "not asked", ha="center", va="center", transform=ax.transAxes, color="gray")
            elif m["mask"] is None:
                ax.imshow((np.asarray(e["image"]) * 0.4).astype(np.uint8))
                ax.text(0.5, 0.5, "no [SEG]", ha="center", va="center", transform=ax.transAxes, color="white",
                        fontsize=10, fontweight="bold")
            else:
                ax.imshow(mask_view(e["image"], m["mask"]))
                if m.get("iou") is not None:
                    ax.set_xlabel(f"IoU {m['iou']:.2f}", fontsize=8)
        lines = [("reference", e["reference"], "darkgreen")] + [
            (m["label"], m.get("caption"), f"C{j + 1}") for j, m in enumerate(e["models"])]
        ax = row[-1]
        y = 0.95
        for name, text, color in lines:
            if text is None:
                continue
            text = "".join(ch if ch.isprintable() else "?" for ch in text.strip())
            wrapped = textwrap.fill(f"{name}: {text or '(empty)'}", 60, max_lines=3, placeholder=" ...")
            ax.text(0.0, y, wrapped, va="top", ha="left", fontsize=8, color=color, transform=ax.transAxes)
            y -= 0.12 * (wrapped.count("\n") + 1) + 0.04
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        for side in ("top", "right", "bottom", "left"):
            row[-1].spines[side].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path)
    return path


def figure_to_array(fig) -> np.ndarray:
    """uint8 [H, W, 3] of a rendered figure (for TensorBoard's add_image)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def eval_entries(samples: dict, preds_by_model: dict[str, list[dict]], n: int) -> list[dict]:
    """The first ``n`` samples of an evaluation as ``draw_samples`` entries, every model's answers side by side."""
    by = {lab: {(p["source"], p["task"]): p for p in preds} for lab, preds in preds_by_model.items()}
    entries = []
    for source, s in list(samples.items())[:n]:
        models = []
        for lab, table in by.items():
            m = {"label": lab, "caption": None}
            cap, seg = table.get((source, "mask2caption")), table.get((source, "caption2mask"))
            if cap is not None:
                m["caption"] = cap["text"]
            if seg is not None:
                m["mask"], m["iou"] = seg["mask"], seg.get("iou")
            models.append(m)
        entries.append({"image": s.image, "gt_mask": s.mask, "reference": s.caption, "models": models})
    return entries


def plot_eval_samples(samples: dict, preds_by_model: dict[str, list[dict]], path: str, n: int = 4) -> str:
    return draw_samples(eval_entries(samples, preds_by_model, n), path,
                        title="held-out samples: masks from the reference caption, captions for the reference mask")


def plot_std_histogram(stds: list[float], cutoff: float | None, path: str, title: str = "reward std") -> str:
    """``sa2va-rl filter``'s histogram of the per-row reward std, the top-K cutoff as a vertical line."""
    fig = _figure(7, 4)
    ax = fig.subplots()
    values = np.asarray(stds, dtype=np.float64)
    if values.size:
        ax.hist(values, bins=min(40, max(5, values.size // 4)), color="C0", alpha=0.8)
        zero = int((np.abs(values) <= 1e-8).sum())
        ax.text(0.98, 0.95, f"{values.size} rows, {zero} with std 0", ha="right", va="top", transform=ax.transAxes,
                fontsize=9)
    else:
        ax.text(0.5, 0.5, "no row has a defined std", ha="center", va="center", transform=ax.transAxes, color="gray")
    if cutoff is not None:
        ax.axvline(cutoff, color="C3", linestyle="--", label=f"top-K cutoff {cutoff:.4f}")
        ax.legend(loc="upper center", fontsize=8, frameon=False)
    ax.set_xlabel("std of the weighted reward over the rollouts")
    ax.set_ylabel("task rows")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path
