"""Spike guard, rollback past the data, collapse monitors and their drills (issue 14, items 1, 2, 3 and 7).

The drill matrix on the tiny causal LM (length reward: every step has a learning signal):

==========================  ===========================================================================
drill                       shown
==========================  ===========================================================================
loss_spike@8                step 8 skipped (cause grad_norm), weights and optimizer bit-identical to step 7
healthy run                 guard on vs off: bit-identical weights, no spike
poison_rows (steps 6, 7)    2 spikes -> rollback to checkpoint-4, rows of steps 5-7 skipped, never seen
                            again in epoch 2; a resume from checkpoint-4 keeps the skip
entropy_collapse@3          the entropy monitor crosses and, with collapse_halt, stops the run
==========================  ===========================================================================
"""

import json
import logging
import math
import os

import pytest
import torch

from sa2va_rl.numerics import GradGuard
from sa2va_rl.numerics.spikes import SpikeDetector
from sa2va_rl.rl.collapse import FIXES, CollapseMonitor, completion_shares
from sa2va_rl.rl.faults import Fault
from sa2va_rl.rl.spikes import SKIP_FILE, DataSkip, IndexedRows, SpikeGuard
from sa2va_rl.rl.stability import NonFiniteTrainingError
from tests.rl.test_trainer import Snapshots, make_trainer, nan_grad_at, opt_equal, params, stability_json
from tests.syncs import CountSyncs

FAST = dict(spike_warmup=3, spike_window=8, logging_steps=100, stability_summary_steps=0)


# ---------------------------------------------------------------- SpikeDetector (pure torch)
def test_detector_flags_beyond_sigma_after_warmup_only():
    d = SpikeDetector(["a", "b"], window=8, sigma=3.0, warmup=3, two_sided=("a",))
    history = [1.0, 1.2, 0.8]
    for i, v in enumerate(history):
        assert d.decide(torch.tensor([100.0, 100.0])).tolist() == [False, False]  # warm-up: nothing is judged
        d.update(torch.tensor([v, v]))
    # mean 1.0, std 0.2: the band is 1.0 +- 0.6
    assert d.decide(torch.tensor([1.59, 1.59])).tolist() == [False, False]
    assert d.decide(torch.tensor([1.61, 1.61])).tolist() == [True, True]
    assert d.decide(torch.tensor([0.39, 0.39])).tolist() == [True, False]  # 'a' is two-sided, 'b' upward only
    # non-finite and exact zeros are neither judged nor recorded; absent signals are not judged
    assert d.decide(torch.tensor([math.nan, 0.0])).tolist() == [False, False]
    assert d.decide(torch.tensor([50.0, 50.0]), torch.tensor([False, True])).tolist() == [False, True]
    d.update(torch.tensor([math.inf, 0.0]))
    assert d.count.tolist() == [3, 3]


def test_detector_ring_buffer_and_state_round_trip():
    d = SpikeDetector(["x"], window=4, sigma=6.0, warmup=2)
    for v in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]:
        d.update(torch.tensor([v]))
    n, mean, std = d.stats()
    assert n.tolist() == [4] and mean.tolist() == [4.5]  # the last 4 values: 3, 4, 5, 6
    assert std.tolist() == pytest.approx([math.sqrt(5 / 3)])
    e = SpikeDetector(["x"], window=4, sigma=6.0, warmup=2)
    e.load_state_dict(json.loads(json.dumps(d.state_dict())))
    assert torch.equal(e.buf, d.buf) and torch.equal(e.count, d.count)


def test_log_scale_judges_a_skewed_signal_by_its_factor_over_the_geometric_mean():
    # a GRPO grad norm is skewed (healthy steps of several times the median): lognormal, sigma 0.5, 200 steps
    gen = torch.Generator().manual_seed(1)
    norms = (math.log(0.4) + 0.9 * torch.randn(200, generator=gen, dtype=torch.float64)).exp()
    flagged = {}
    for scale in ("linear", "log"):
        d = SpikeDetector(["g"], window=128, sigma=6.0, warmup=16, log_scale=("g",) if scale == "log" else ())
        flagged[scale] = []
        for i, v in enumerate(norms):
            if d.decide(v[None]).tolist() == [True]:
                flagged[scale].append(i)
            else:
                d.update(v[None])
        assert d.decide(torch.tensor([norms.median() * 1e3])).tolist() == [True]  # the drills' 1e3x spike
    assert flagged["linear"] and flagged["log"] == []  # healthy skew flags linear 6 sigma, not log 6 sigma
    d = SpikeDetector(["g"], window=8, sigma=6.0, warmup=2, log_scale=("g",))
    for v in [-1.0, 0.0, 0.5, 2.0]:  # log signals: values <= 0 are neither judged nor recorded
        assert d.decide(torch.tensor([v])).tolist() == [False]
        d.update(torch.tensor([v]))
    assert d.count.tolist() == [2] and d.stats()[1].tolist() == pytest.approx([0.0])  # mean of log 0.5, log 2
    assert d.threshold().tolist() == pytest.approx([math.exp(6 * math.sqrt(2) * math.log(2))])
    # a step with almost no learning signal (1e-7: a near-tie in every group) is judged as it is (never flags), but
    # recorded winsorised at 1e-3 x the window's median: it cannot widen the log band by more than log(1e3)
    median = 0.5  # torch's median of an even count is the lower middle value: of (0.5, 2), 0.5
    assert d.decide(torch.tensor([1e-7])).tolist() == [False]
    d.update(torch.tensor([1e-7]))
    assert d.count.tolist() == [3] and d.buf[0, 2].item() == pytest.approx(math.log(1e-3 * median))
    d.update(torch.tensor([2e-3]))  # over the bound: recorded as it is
    assert d.count.tolist() == [4] and d.buf[0, 3].item() == pytest.approx(math.log(2e-3))


def test_low_values_are_winsorised_so_the_window_follows_a_change_of_level():
    # an early outlier then a level 2000x lower: every value is recorded, the median follows within half a window,
    # and a 1e3x spike from the new level is flagged (dropping low values instead froze such a window for good)
    d = SpikeDetector(["g"], window=16, sigma=6.0, warmup=4, log_scale=("g",))
    d.update(torch.tensor([2000.0]))
    gen = torch.Generator().manual_seed(0)
    for v in (1.0 + 0.1 * torch.rand(40, generator=gen, dtype=torch.float64)):
        assert d.decide(v[None]).tolist() == [False]
        d.update(v[None])
    assert d.count.tolist() == [41]
    assert d.stats()[1].exp().item() == pytest.approx(1.05, rel=0.05)  # the geometric mean is the new level's
    assert d.decide(torch.tensor([1e3])).tolist() == [True]
    # the cache between decide and update holds only for the same, unmodified tensor
    v = torch.tensor([1.0], dtype=torch.float64)
    d.decide(v)
    v.fill_(50.0)
    d.update(v)
    assert d.buf[0, (d.count.item() - 1) % 16].item() == pytest.approx(math.log(50.0))


def test_std_floor_keeps_a_constant_window_from_flagging_noise():
    d = SpikeDetector(["x"], window=8, sigma=6.0, warmup=2, rel_floor=1e-3)
    for _ in range(4):
        d.update(torch.tensor([2.0]))
    assert d.decide(torch.tensor([2.01])).tolist() == [False]  # 6 * 2e-3 = 0.012 band
    assert d.decide(torch.tensor([2.02])).tolist() == [True]


def test_spike_decision_rides_the_grad_guards_one_sync():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    guard, spikes = GradGuard(), SpikeGuard(window=8, sigma=6.0, warmup=2, signals=("loss", "grad_norm"))
    for step in range(1, 6):
        model.zero_grad()
        loss = model(torch.randn(3, 8)).pow(2).mean() * (1e4 if step == 5 else 1.0)
        loss.backward()
        with CountSyncs() as c:
            spikes.add_loss(loss)
            report = guard.check(model, extra=spikes.flags)
            causes = spikes.conclude(step, report.extra, report.finite)
        assert c.count == 1, c.calls  # the GradGuard's own sync, nothing more
        assert causes == ([] if step < 5 else ["loss", "grad_norm"])
    # the spike did not enter the history; no KL logged, no mask loss
    assert spikes.detector.count.tolist() == [4, 4, 0, 0]


def test_finite_gradients_whose_norm_overflows_are_a_grad_norm_spike():
    # every gradient finite (1e30), but the fp32 L2 norm overflows: the GradGuard calls the step finite and would
    # clip it; the detector cannot judge an inf, so the spike guard names it itself
    model = torch.nn.Linear(4, 4)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e30)
    spikes = SpikeGuard(window=8, sigma=6.0, warmup=2)
    report = GradGuard().check(model, extra=spikes.flags)
    assert report.finite and math.isinf(report.norm)
    assert spikes.conclude(1, report.extra, report.finite, report.norm) == ["grad_norm"]
    assert spikes.detector.count.tolist() == [0, 0, 0, 0]  # nothing recorded
    loss_only = SpikeGuard(window=8, sigma=6.0, warmup=2, signals=("loss",))
    assert loss_only.conclude(1, [0.0] * 4, True, math.inf) == []  # grad_norm not judged: not a cause
    assert spikes.conclude(2, [0.0] * 4, False, math.inf) == []  # non-finite: the GradGuard's business


def test_kl_is_judged_when_logged_and_only_then():
    spikes = SpikeGuard(window=8, sigma=6.0, warmup=2)  # default signals: grad_norm and kl
    norm = torch.tensor(1.0)
    for step, kl in enumerate([0.010, 0.012, 0.011], start=1):
        spikes.add_kl(kl)
        assert spikes.conclude(step, spikes.flags(norm).tolist(), finite=True) == []
    spikes.add_kl(0.5)
    assert spikes.conclude(4, spikes.flags(norm).tolist(), finite=True) == ["kl"]
    assert spikes.conclude(5, spikes.flags(norm).tolist(), finite=True) == []  # no KL logged: not judged
    assert spikes.detector.count.tolist() == [0, 4, 3, 0]  # loss never logged; the KL spike not recorded


def test_norm_read_with_extra_is_the_same_float():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    model(torch.randn(3, 8)).sum().backward()
    a = GradGuard().check(model)
    b = GradGuard().check(model, extra=lambda total: torch.ones(2))
    assert a.norm == b.norm and b.extra == [1.0, 1.0] and a.extra == []


# ---------------------------------------------------------------- trainer: skip, bit-identity
def test_loss_spike_is_skipped_with_the_optimizer_untouched(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=9, inject=["loss_spike@8"], **FAST)
    snaps = Snapshots()
    trainer.add_callback(snaps)
    trainer.train()
    assert opt_equal(snaps.opt[6], snaps.opt[7])  # step 8 (index 7) skipped
    assert all(torch.equal(snaps.params[6][n], snaps.params[7][n]) for n in snaps.params[6])
    assert not opt_equal(snaps.opt[7], snaps.opt[8])  # step 9 healthy
    r = stability_json(tmp_path)
    assert (r["steps"], r["skipped_steps"], r["spike_steps"], r["nonfinite_grad_steps"]) == (9, 1, 1, 0)
    assert r["spike_causes"] == {"grad_norm": 1}
    (event,) = [e for e in r["events"] if e["kind"] == "spike"]
    assert event["step"] == 8 and event["causes"] == ["grad_norm"]
    assert event["scale"]["grad_norm"] == "log"  # judged as log(norm): a factor over the geometric mean
    assert event["values"]["grad_norm"] > event["threshold"]["grad_norm"] > event["mean"]["grad_norm"]
    assert event["threshold"]["grad_norm"] == pytest.approx(
        event["mean"]["grad_norm"] * math.exp(6 * event["std"]["grad_norm"]))
    assert r["final_weights_finite"] is True


def test_healthy_run_is_bit_identical_with_the_spike_guard_on_and_off(tiny_causal, prompt_dir, tmp_path):
    runs = {}
    for on in (True, False):
        trainer = make_trainer(tiny_causal, prompt_dir, tmp_path / str(on), max_steps=10, spike_guard=on, **FAST)
        trainer.train()
        runs[on] = (params(trainer.model), stability_json(tmp_path / str(on)))
    assert runs[True][1]["spike_steps"] == 0 and runs[True][1]["skipped_steps"] == 0
    assert all(torch.equal(runs[True][0][n], runs[False][0][n]) for n in runs[True][0])


# ---------------------------------------------------------------- rollback past the data
def consumed(trainer) -> dict[int, list[int]]:
    return {s: rows for s, rows in trainer.data_skip.consumed}


@pytest.fixture(scope="module")
def clean_order(tiny_causal, prompt_dir, tmp_path_factory):
    """Which rows each step of a healthy 24-step run consumed (the sampler order the poisoned runs share)."""
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path_factory.mktemp("clean"), max_steps=24,
                           learning_rate=1e-9, **FAST)
    trainer.train()
    return consumed(trainer)


def test_poisoned_rows_roll_back_past_the_data_and_are_not_seen_again(tiny_causal, prompt_dir, tmp_path,
                                                                        clean_order):
    poison = sorted(set(clean_order[6]) | set(clean_order[7]))
    since_checkpoint = sorted({r for s in (5, 6, 7) for r in clean_order[s]})
    epoch2 = {r for s in range(17, 25) for r in clean_order[s]}
    assert set(since_checkpoint) & epoch2  # without the skip, epoch 2 would see some of them again
    out = tmp_path / "run"
    trainer = make_trainer(tiny_causal, prompt_dir, out, max_steps=24, learning_rate=1e-9,
                           inject=["poison_rows:" + "+".join(map(str, poison))], save_strategy="steps", save_steps=4,
                           spike_persistent_count=2, on_persistent_spikes="rollback", rollback_lr_factor=0.5, **FAST)
    trainer.train()
    r = stability_json(out)
    assert r["spike_steps"] == 2 and r["rollbacks"] == 1 and r["final_weights_finite"] is True
    assert [e["step"] for e in r["events"] if e["kind"] == "spike"] == [6, 7]
    (rb,) = [e for e in r["events"] if e["kind"] == "rollback"]
    assert rb["step"] == 7 and rb["checkpoint"] == "checkpoint-4" and rb["skipped_rows"] == since_checkpoint
    assert rb["lr_factor"] == 0.5
    saved = json.load(open(out / SKIP_FILE))
    assert saved["rows"] == since_checkpoint and r["skipped_data"]["rows"] == since_checkpoint
    assert saved["events"][0]["steps"] == [5, 7] and r["skipped_rows"] == len(since_checkpoint)
    seen_after = {r_ for s, rows in consumed(trainer).items() if s > 7 for r_ in rows}
    assert not seen_after & set(since_checkpoint)
    assert r["steps"] == 24

    # a resume from the checkpoint before the rollback keeps the skip: steps 5-7 get other rows, nothing spikes
    resumed = make_trainer(tiny_causal, prompt_dir, out, max_steps=8, learning_rate=1e-9,
                           inject=["poison_rows:" + "+".join(map(str, poison))], save_strategy="no",
                           spike_persistent_count=2, on_persistent_spikes="halt", **FAST)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    rows = consumed(resumed)
    assert sorted(rows) == [5, 6, 7, 8]
    assert not {r_ for v in rows.values() for r_ in v} & set(since_checkpoint)
    assert rows[8] == clean_order[8]  # batch positions did not move
    assert stability_json(out)["spike_steps"] == 0  # counters as of checkpoint-4 (before the spikes): no new one


def test_persistent_nonfinite_rollback_also_skips_the_data(tiny_causal, prompt_dir, tmp_path, clean_order):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=10, learning_rate=1e-9, save_strategy="steps",
                           save_steps=4, on_persistent_nonfinite="rollback", max_consecutive_skips=3, **FAST)
    nan_grad_at(trainer, {6, 7, 8})
    trainer.train()
    r = stability_json(tmp_path)
    want = sorted({r_ for s in (5, 6, 7, 8) for r_ in clean_order[s]})
    (rb,) = [e for e in r["events"] if e["kind"] == "rollback"]
    assert (rb["step"], rb["checkpoint"], rb["skipped_rows"]) == (8, "checkpoint-4", want)
    assert json.load(open(tmp_path / SKIP_FILE))["rows"] == want and r["skipped_steps"] == 3


def test_persistent_spikes_halt_by_default(tiny_causal, prompt_dir, tmp_path, clean_order):
    poison = sorted(set(clean_order[6]) | set(clean_order[7]))
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=10, learning_rate=1e-9,
                           inject=["poison_rows:" + "+".join(map(str, poison))], spike_persistent_count=2, **FAST)
    with pytest.raises(NonFiniteTrainingError, match="2 loss/grad-norm/KL spikes within 20 steps"):
        trainer.train()
    r = stability_json(tmp_path)
    assert r["spike_steps"] == 2 and r["rollbacks"] == 0 and r["skipped_data"]["rows"] == []


def test_indexed_rows_substitute_skipped_indices_in_place():
    skip = {1, 2}
    rows = IndexedRows([{"p": i} for i in range(4)], skip)
    assert [rows[i] for i in range(4)] == [{"p": 0, "row_index": 0}, {"p": 3, "row_index": 3},
                                           {"p": 3, "row_index": 3}, {"p": 3, "row_index": 3}]
    skip.update({0, 3})
    with pytest.raises(RuntimeError, match="every one of the 4 training rows is skipped"):
        rows[0]
    ds = DataSkip()
    assert ds.take(3, [{"prompt": "a", "row_index": 5}, {"prompt": "a", "row_index": 5}]) == [{"prompt": "a"}] * 2
    assert ds.last_rows == [5, 5] and ds.since(2) == [5] and ds.since(3) == []


# ---------------------------------------------------------------- collapse monitors
def test_completion_shares_exact():
    comps = [[1, 2], [1, 2], [3], [4, 5], [1, 2], [1, 2]]
    groups = ["a", "a", "b", "b", "c", "c"]
    s = completion_shares(comps, groups, max_len=2)
    assert s["identical_groups"] == pytest.approx(2 / 3)  # a and c
    assert s["max_length"] == pytest.approx(5 / 6)
    assert s["cross_prompt_repeat"] == pytest.approx(4 / 6)  # [1, 2] answers both a and c
    # answers to segmentation prompts (d, e) are one template by design: not a caption collapse; the same template
    # answering caption prompts (f, g) is one
    seg = completion_shares(comps + [[7, 9], [7, 9]], groups + ["d", "e"], max_len=2,
                            templated=[False] * 6 + [True, True])
    assert seg["cross_prompt_repeat"] == pytest.approx(4 / 6) and seg["identical_groups"] == pytest.approx(2 / 3)
    assert "cross_prompt_repeat" not in completion_shares([[7, 9], [7, 9]], ["d", "e"], None, templated=[True] * 2)
    assert completion_shares([[7, 9], [7, 9]], ["f", "g"], None, templated=[False] * 2)["cross_prompt_repeat"] == 1


def test_entropy_monitor_uses_the_early_value_warns_rate_limited_and_halts(caplog):
    halted = []
    m = CollapseMonitor(entropy_floor=0.05, entropy_fraction=0.5, warmup_steps=2, halt=True, patience=2,
                        on_halt=halted.append)
    with caplog.at_level(logging.WARNING, logger="sa2va_rl.rl.collapse"):
        for step, ent in enumerate([2.0, 2.0, 1.5, 0.9, 0.8, 0.7, 0.6, 0.5], start=1):
            m.observe("entropy", ent)
            m.observe("entropy", ent)  # two micro-batches: their mean
            message = m.end_step(step)
            if message:
                halted.append((step, message))
    assert m.entropy_threshold() == 1.0  # 0.5 x early mean 2.0
    assert m.report()["entropy"] == {"crossings": 5, "first_step": 4, "last": 0.5}
    assert halted[0][0] == 5 and "stability/entropy" in halted[0][1] and FIXES["entropy"] in halted[0][1]
    warned = [r for r in caplog.records if "stability/entropy" in r.getMessage()]
    assert [int(r.getMessage().split("at step ")[1].split()[0]) for r in warned] == [4, 5, 7]  # 1st, 2nd, 4th


def test_share_monitors_judge_the_mean_of_their_window(caplog):
    # one batch where two prompts rightly share a caption is not a collapse; a lasting repeat is
    m = CollapseMonitor(repeat_share=0.5, share_window=3)
    with caplog.at_level(logging.WARNING, logger="sa2va_rl.rl.collapse"):
        for step, v in enumerate([1.0, 0.0, 0.0, 0.25, 0.75, 0.75, 0.75], start=1):
            m.observe("cross_prompt_repeat", v)
            m.end_step(step)
            assert m.values["cross_prompt_repeat"] == v  # the logged metric is the step's own
    # windows: steps 3 (1, 0, 0), 4, 5 (0, .25, .75 -> 0.33) stay under 0.5; step 6 (.25, .75, .75) and 7 cross
    assert m.report()["cross_prompt_repeat"] == {"crossings": 2, "first_step": 6, "last": 0.75}
    (first, *_), = [[r.getMessage() for r in caplog.records]]
    assert "stability/cross_prompt_repeat = 0.5833 at step 6 (mean of the last 3 steps above 0.5" in first
    n = CollapseMonitor(repeat_share=0.5, share_window=3)
    n.load_state_dict(json.loads(json.dumps(m.state_dict())))  # a resume keeps the window
    n.observe("cross_prompt_repeat", 0.0)
    n.end_step(8)
    assert n.report()["cross_prompt_repeat"]["crossings"] == 2  # (.75, .75, 0) -> 0.5: not above; count kept
    n.observe("cross_prompt_repeat", 0.9)
    n.end_step(9)
    assert n.report()["cross_prompt_repeat"]["crossings"] == 3  # (.75, 0, .9) -> 0.55
    # the halt's patience counts crossing steps in a row across a resume too
    h = CollapseMonitor(repeat_share=0.5, share_window=1, halt=True, patience=3)
    for step, v in enumerate([0.9, 0.9], start=1):
        h.observe("cross_prompt_repeat", v)
        assert h.end_step(step) is None
    r = CollapseMonitor(repeat_share=0.5, share_window=1, halt=True, patience=3)
    r.load_state_dict(json.loads(json.dumps(h.state_dict())))
    r.observe("cross_prompt_repeat", 0.9)
    assert "for 3 steps in a row at step 3" in r.end_step(3)
    # under several processes a completion-based monitor is this rank's own: it warns (counted) but never halts
    m = CollapseMonitor(repeat_share=0.5, share_window=1, halt=True, patience=1, local=("cross_prompt_repeat",))
    m.observe("cross_prompt_repeat", 0.9)
    m.observe("entropy", 0.01)
    message = m.end_step(1)
    assert m.report()["cross_prompt_repeat"]["crossings"] == 1 and "stability/entropy" in message
    m = CollapseMonitor(repeat_share=0.5, share_window=1, halt=True, patience=1, local=("cross_prompt_repeat",))
    m.observe("cross_prompt_repeat", 0.9)
    assert m.end_step(1) is None and m.report()["cross_prompt_repeat"]["crossings"] == 1


def test_entropy_collapse_drill_halts_with_collapse_halt(tiny_causal, prompt_dir, tmp_path):
    trainer = make_trainer(tiny_causal, prompt_dir, tmp_path, max_steps=8, inject=["entropy_collapse@4:1000"],
                           collapse_max_length_share=1.0, collapse_zero_std_share=1.0, collapse_warmup_steps=2,
                           collapse_halt=True, collapse_patience=2, **FAST)
    with pytest.raises(NonFiniteTrainingError, match="collapse: stability/entropy"):
        trainer.train()
    r = stability_json(tmp_path)
    assert r["collapse"]["entropy"]["first_step"] == 4 and r["collapse"]["entropy"]["crossings"] == 2
    assert r["steps"] == 5


def test_new_fault_kinds_parse_and_refuse_bad_args():
    assert Fault.parse("poison_rows:3+17").rows() == {3, 17}
    assert Fault.parse("loss_spike@5:100") == Fault("loss_spike", 5, "100")
    with pytest.raises(ValueError, match="poison_rows:3"):
        Fault.parse("poison_rows")
    with pytest.raises(ValueError, match="loss_spike@5:1000"):
        Fault.parse("loss_spike@5:big")


def test_config_validates_the_new_fields(tmp_path):
    from sa2va_rl.rl.config import Sa2VAGRPOConfig

    with pytest.raises(ValueError) as e:
        Sa2VAGRPOConfig(output_dir=str(tmp_path), spike_warmup=1, on_persistent_spikes="stop",
                        collapse_repeat_share=2.0)
    msg = str(e.value)
    assert "spike_warmup=1" in msg and "on_persistent_spikes='stop'" in msg and "collapse_repeat_share=2.0" in msg
    assert os.path.basename(SKIP_FILE) == "skipped_rows.json"


def test_mask_loss_is_a_signal_every_step_when_on_and_never_when_off():
    """With the mask loss on (rl/mask_loss.py) its per-step sum is judged (log scale): a step without caption2mask
    rows feeds 0, which is not judged and not recorded; a jump flags ``mask_loss``."""
    spikes = SpikeGuard(window=8, sigma=6.0, warmup=2, mask_loss=True)
    norm = torch.tensor(1.0)
    for step, value in enumerate([0.20, 0.22, 0.21], start=1):
        spikes.add_mask_loss(torch.tensor(value))
        assert spikes.conclude(step, spikes.flags(norm).tolist(), finite=True) == []
    assert spikes.conclude(4, spikes.flags(norm).tolist(), finite=True) == []  # no rows this step: 0, unjudged
    spikes.add_mask_loss(torch.tensor(50.0))
    assert spikes.conclude(5, spikes.flags(norm).tolist(), finite=True) == ["mask_loss"]
    assert spikes.detector.count.tolist()[3] == 3  # the spike and the empty step were not recorded
    off = SpikeGuard(window=8, sigma=6.0, warmup=2)
    for step in range(1, 6):
        assert off.conclude(step, off.flags(norm).tolist(), finite=True) == []
    assert off.detector.count.tolist()[3] == 0
