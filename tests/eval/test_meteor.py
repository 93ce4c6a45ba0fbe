"""METEOR 1.5 (eval/meteor.py): the standard's numbers on fixed captions (checked against pycocoevalcap's own
``Meteor``), batched = one by one, threads, the stdio protocol's separators in captions, a hung or crashed java,
and the nltk fallback where java is missing."""

import logging
import os
import shutil
import stat
import threading

import pytest

from sa2va_rl.eval import meteor as M
from sa2va_rl.eval.meteor import (Meteor15, MeteorProcessError, MeteorScorer, MeteorUnavailable, get_scorer,
                                  jar_path, meteor_scores, sanitize)
from sa2va_rl.rl.rewards import make_caption_meteor

needs_java = pytest.mark.skipif(shutil.which("java") is None or jar_path() is None,
                                reason="METEOR 1.5 needs a Java runtime on the PATH (apt-get install "
                                       "default-jre-headless) and pycocoevalcap (pip install pycocoevalcap)")

REF = "a red square at the left of the image"
PAIRS = [(REF, REF),
         ("a red squares at the left", REF),  # stem match, fragmentation
         ("a small blue circle near the top", "a tiny blue circle close to the top of the picture"),  # paraphrases
         ("two dogs playing on the grass", "a pair of dogs play in a grassy field"),
         ("blue circles everywhere", REF)]
# METEOR 1.5's scores of PAIRS (pycocoevalcap 1.2's jar, -l en -norm), computed once with the jar: the standard's
# numbers, checked against pycocoevalcap's own Meteor().compute_score below
PINNED = [1.0000, 0.3859, 0.3752, 0.1559, 0.0000]
PINNED_CORPUS = 0.3161  # METEOR 1.5's pooled corpus score of PAIRS (not the mean of PINNED)


@pytest.fixture(scope="module")
def m15():
    scorer = Meteor15()
    yield scorer
    scorer.close()


def as_pairs(pairs):
    return [(h, [r]) for h, r in pairs]


@needs_java
def test_pinned_scores_are_pycocoevalcaps(m15):
    from pycocoevalcap.meteor.meteor import Meteor

    corpus, per = m15.score(as_pairs(PAIRS))
    assert [round(x, 4) for x in per] == PINNED and round(corpus, 4) == PINNED_CORPUS
    ref_corpus, ref_per = Meteor().compute_score({i: [r] for i, (_, r) in enumerate(PAIRS)},
                                                 {i: [h] for i, (h, _) in enumerate(PAIRS)})
    assert per == pytest.approx(ref_per, abs=1e-9) and corpus == pytest.approx(ref_corpus, abs=1e-9)
    # the package's one entry point (tokenized text: these captions are tokens already) gives the same
    assert meteor_scores([h for h, _ in PAIRS], [r for _, r in PAIRS], "meteor-1.5")[1] == pytest.approx(per)


@needs_java
def test_batched_equals_one_by_one(m15):
    _, batched = m15.score(as_pairs(PAIRS))
    assert batched == [m15.score([p])[1][0] for p in as_pairs(PAIRS)]
    assert m15.score([]) == (pytest.approx(float("nan"), nan_ok=True), [])
    assert m15.starts == 1  # one java process for all of it


@needs_java
def test_two_threads_get_the_sequential_numbers(m15):
    forward, backward = as_pairs(PAIRS) * 4, as_pairs(PAIRS[::-1]) * 4
    expected = {"f": m15.score(forward), "b": m15.score(backward)}
    got, errors = {}, []

    def run(key, pairs):
        try:
            for _ in range(5):
                result = m15.score(pairs)
                assert result == expected[key], key
            got[key] = result
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=a) for a in (("f", forward), ("b", backward))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and got == expected


def test_sanitize_leaves_one_line_without_separators():
    assert sanitize("a ||| b\nc\r\nd\re\u2028f\tg  |||| h || i") == "a b c d e f g h || i"
    assert "\n" not in sanitize("x\n\n") and sanitize("|||") == ""


@needs_java
def test_separators_and_newlines_do_not_desync_the_stream(m15):
    nasty = [("a red ||| square\nat the\r left", [REF]), ("SCORE ||| EVAL\n", ["a\u2028b ||| c"]),
             ("|||", ["\n"]), ("a red square at the left of the image", ["a red square ||| at the left\nof the image"])]
    corpus, per = m15.score(nasty + as_pairs(PAIRS))
    assert len(per) == len(nasty) + len(PAIRS) and all(0.0 <= x <= 1.0 for x in per)
    assert [round(x, 4) for x in per[len(nasty):]] == PINNED  # the pairs after them still score right
    assert per[3] == pytest.approx(1.0)  # the separator became a space: the same words
    assert [round(x, 4) for x in m15.score(as_pairs(PAIRS))[1]] == PINNED  # and the next batch too
    assert m15.starts == 1  # nothing crashed


@needs_java
def test_reward_is_one_round_trip_per_batch_and_keeps_none(monkeypatch):
    reward = make_caption_meteor("meteor-1.5")
    assert reward.__name__ == "caption_meteor" and reward.meteor_scorer() is get_scorer("meteor-1.5")
    calls = []
    real = Meteor15.score
    monkeypatch.setattr(Meteor15, "score", lambda self, pairs: calls.append(len(pairs)) or real(self, pairs))
    completions = [h for h, _ in PAIRS] + ["a red square"]
    out = reward(completions, caption=[r for _, r in PAIRS] + [None])
    assert calls == [len(PAIRS)] and out[-1] is None and [round(x, 4) for x in out[:-1]] == PINNED
    conversational = [[{"role": "assistant", "content": REF}]]
    assert reward(conversational, caption=[REF]) == [pytest.approx(1.0)] and reward(["x"]) == [None]
    assert reward.meteor_scorer().report()["meteor_impl"] == "meteor-1.5"


def test_unknown_names_are_refused_by_name():
    with pytest.raises(ValueError, match="caption_meteor_impl='meteor15'.*'auto'.*'meteor-1.5'.*'nltk'"):
        make_caption_meteor("meteor15")
    with pytest.raises(ValueError, match="--meteor='cider'"):
        get_scorer("cider", option="--meteor")
    from sa2va_rl.rl.config import Sa2VAGRPOConfig

    with pytest.raises(ValueError, match="caption_meteor_impl='java'"):
        Sa2VAGRPOConfig(output_dir="unused", caption_meteor_impl="java", report_to=[])


def test_fallback_without_java_names_nltk_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(M.shutil, "which", lambda name: None)
    monkeypatch.setattr(M, "_LOGGED", set())
    caplog.set_level(logging.WARNING, logger="sa2va_rl.eval.meteor")
    scorers = [MeteorScorer("auto"), MeteorScorer("auto")]
    warned = [r for r in caplog.records if r.name == "sa2va_rl.eval.meteor"]
    assert len(warned) == 1 and "no java on the PATH" in warned[0].getMessage() and "nltk" in warned[0].getMessage()
    hyps, refs = ["a red circle at the top", "blue square"], ["a red circle at the top left", "a green circle"]
    for s in scorers:
        assert s.impl == "nltk" and "fell back to nltk's METEOR" in s.note and s.describe().startswith("nltk")
        corpus, per = meteor_scores(hyps, refs, s)
        assert per == meteor_scores(hyps, refs, MeteorScorer("nltk"))[1] and corpus == pytest.approx(sum(per) / 2)
        assert s.report()["meteor_impl"] == "nltk" and s.report()["batches"] == {"nltk": 1}
    with pytest.raises(MeteorUnavailable, match="caption_meteor_impl='meteor-1.5'.*no java.*'auto'.*'nltk'"):
        MeteorScorer("meteor-1.5", option="caption_meteor_impl")  # asked for by name: refused, not swapped
    assert len([r for r in caplog.records if r.name == "sa2va_rl.eval.meteor"]) == 1


def fake_java(tmp_path, body: str) -> str:
    path = tmp_path / "java"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_hung_java_times_out_is_restarted_once_then_nltk(tmp_path, caplog):
    """A java that never answers: each read times out (no hang), the process is killed, restarted once, and then
    the run scores with nltk (a warning; report() says when and why)."""
    jar = tmp_path / "meteor-1.5.jar"
    jar.write_bytes(b"")
    java = fake_java(tmp_path, "exec sleep 600")
    one = Meteor15(jar=str(jar), java=java, start_timeout=0.5, timeout=0.5)
    with pytest.raises(MeteorProcessError, match="did not answer within"):
        one.score(as_pairs(PAIRS))
    assert not one.running
    caplog.set_level(logging.WARNING, logger="sa2va_rl.eval.meteor")
    s = MeteorScorer("meteor-1.5", jar=str(jar), java=java, start_timeout=0.5, timeout=0.5)
    corpus, per = s.score([h for h, _ in PAIRS], [r for _, r in PAIRS])
    assert per == MeteorScorer("nltk").score([h for h, _ in PAIRS], [r for _, r in PAIRS])[1]
    assert s.impl == "nltk" and s.restarts == 1 and s._meteor15 is None
    r = s.report()
    assert r["meteor_impl"] == "nltk" and r["requested"] == "meteor-1.5" and "failed twice" in r["fallback_reason"]
    msgs = [x.getMessage() for x in caplog.records]
    assert any("restarting java once" in x for x in msgs) and any("nltk's METEOR for the rest" in x for x in msgs)


def test_a_java_that_dies_is_reported_with_its_stderr(tmp_path):
    jar = tmp_path / "meteor-1.5.jar"
    jar.write_bytes(b"")
    m = Meteor15(jar=str(jar), java=fake_java(tmp_path, "echo 'Error: no heap' >&2; exit 3"), start_timeout=30)
    with pytest.raises(MeteorProcessError, match="java exited .code 3.*no heap"):
        m.score(as_pairs(PAIRS))


@needs_java
def test_a_killed_java_is_restarted_once_with_the_same_numbers_then_nltk(caplog):
    s = MeteorScorer("meteor-1.5")
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    assert [round(x, 4) for x in s.score(hyps, refs)[1]] == PINNED
    s._meteor15._proc.kill()  # java crashes between batches
    assert [round(x, 4) for x in s.score(hyps, refs)[1]] == PINNED  # restarted: still METEOR 1.5
    assert s.restarts == 1 and s.impl == "meteor-1.5" and s._meteor15.starts == 2
    caplog.set_level(logging.WARNING, logger="sa2va_rl.eval.meteor")
    pid = s._meteor15._proc.pid
    s._meteor15._proc.kill()  # and again: no second restart
    _, per = s.score(hyps, refs)
    assert s.impl == "nltk" and per == MeteorScorer("nltk").score(hyps, refs)[1]
    assert s.report()["batches"] == {"meteor-1.5": 2, "nltk": 1}
    assert any("nltk's METEOR for the rest" in r.getMessage() for r in caplog.records)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the dead one was reaped, nothing left behind
    s.close()
