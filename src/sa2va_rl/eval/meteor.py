"""METEOR, one function for the whole package: the caption reward, ``sa2va-rl eval`` and the doctor all score
through ``meteor_scores`` (or a ``MeteorScorer``), so a run reports one implementation.

* ``meteor-1.5``: the standard, METEOR 1.5 (Denkowski & Lavie, 2014) as the COCO-caption toolkit runs it: the jar
  that pycocoevalcap's wheel ships (``pycocoevalcap/meteor/meteor-1.5.jar``, with its paraphrase table) in Java,
  ``-stdio -l en -norm`` (exact, Porter-stem, WordNet-synonym and paraphrase matches). ``Meteor15`` keeps ONE java
  process per run (started on first use, ~10 s to load the paraphrase table), sends a whole batch in one write
  (``SCORE`` lines, then one ``EVAL`` line: two exchanges per batch whatever its size), holds a lock for the batch
  (threads share it safely), reads java's answers on a reader thread with a timeout per line (a stuck java is
  killed, never waited on forever) and is closed at exit. pycocoevalcap's own ``Meteor`` class is not used: it
  makes one round trip per pair, reads without a timeout and leaves its lock held if a read fails.
* ``nltk``: nltk's ``meteor_score`` (exact + stem matching, WordNet synonyms only where nltk's corpus is
  installed), which no paper reports; the fallback where ``java`` or pycocoevalcap is missing, and what the demo
  pins (speed and determinism on CPU).

``auto`` (the default of train, the reward and eval) is ``meteor-1.5`` where ``java`` is on the PATH, else ``nltk``
with one warning per process. A java process that dies or stops answering is restarted once; if that fails too, the
scorer falls back to nltk for the rest of the run, with a warning, and ``report()`` says from which batch.

Text is sanitized before it reaches the jar: its line protocol splits fields on ``|||`` and requests on line
breaks, so runs of 3+ ``|`` become a space and every whitespace run (newlines, ``\\r``, U+2028...) one space.
``meteor_scores`` also tokenizes both sides as the rest of the metrics do (lower-cased words, punctuation dropped:
the COCO toolkit's PTB-tokenizer step), so the jar only ever sees ``[a-z0-9 ]``.

Corpus score: METEOR 1.5's pools the statistics of all pairs (as the COCO toolkit reports it); nltk's is the mean
of the per-pair scores.
"""

from __future__ import annotations

import atexit
import collections
import importlib.util
import logging
import math
import os
import queue
import re
import shutil
import subprocess
import threading

logger = logging.getLogger(__name__)

METEOR_IMPLS = ("auto", "meteor-1.5", "nltk")
METEOR_15 = "meteor-1.5"
NLTK = "nltk"
JAR_NAME = "meteor-1.5.jar"
_PIPES = re.compile(r"\|{3,}")
_SPACE = re.compile(r"\s+")
_LOGGED: set[str] = set()  # warnings said once per process


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning(msg, *args)


class MeteorUnavailable(ValueError):
    """METEOR 1.5 cannot run here (no java, or no pycocoevalcap); raised to the caller only when it was asked for
    by name (a usage error: the message names the option and the fix)."""


def check_impl(impl: str, option: str = "meteor") -> str:
    """``impl`` when it is a known name; ValueError naming ``option`` and the choices otherwise."""
    if impl not in METEOR_IMPLS:
        raise ValueError(f"{option}={impl!r}: unknown METEOR implementation; use 'auto' (METEOR 1.5 where java is "
                         "installed, else nltk), 'meteor-1.5' (the standard: pycocoevalcap's jar, needs java) or "
                         "'nltk' (nltk's meteor_score)")
    return impl


def jar_path() -> str | None:
    """pycocoevalcap's METEOR 1.5 jar, or None when pycocoevalcap is not installed (nothing is imported)."""
    try:
        spec = importlib.util.find_spec("pycocoevalcap.meteor")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, JAR_NAME)
        if os.path.isfile(path):
            return path
    return None


def java_path() -> str | None:
    return shutil.which("java")


def sanitize(text: str) -> str:
    """One line METEOR's stdio protocol cannot misread: no ``|||`` (its field separator) and no line break."""
    return _SPACE.sub(" ", _PIPES.sub(" ", text)).strip()


class MeteorProcessError(RuntimeError):
    """The java process died, answered something that is not a number, or did not answer in time."""


class Meteor15:
    """METEOR 1.5 in one long-lived java process (see the module docstring). ``score(pairs)`` takes
    ``[(hypothesis, [reference, ...]), ...]`` and returns ``(corpus score, [per-pair score])``; it raises
    ``MeteorProcessError`` (the process is killed first) when java fails, and leaves restarting to the caller."""

    def __init__(self, jar: str | None = None, java: str | None = None, start_timeout: float = 300.0,
                 timeout: float = 60.0, max_heap: str = "2G") -> None:
        self.jar = jar or jar_path()
        self.java = java or java_path()
        if self.jar is None:
            raise MeteorUnavailable("METEOR 1.5: pycocoevalcap is not installed (pip install pycocoevalcap: its "
                                    "wheel ships the jar)")
        if self.java is None:
            raise MeteorUnavailable("METEOR 1.5: no java on the PATH (install a Java runtime, e.g. apt-get install "
                                    "default-jre-headless)")
        self.start_timeout, self.timeout, self.max_heap = start_timeout, timeout, max_heap
        self.lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid = None  # the Python process that started java (a forked child starts its own)
        self._lines: queue.Queue | None = None
        self._stderr: collections.deque = collections.deque(maxlen=20)
        self._fresh = False  # the next answer is the first since start: it waits for the paraphrase table too
        self.starts = 0
        self.retired = False  # set by MeteorScorer when it falls back: never started again
        atexit.register(self.close)

    # ------------------------------------------------------------------ process
    def _start(self) -> None:
        cmd = [self.java, "-jar", f"-Xmx{self.max_heap}", self.jar, "-", "-", "-stdio", "-l", "en", "-norm"]
        self._proc = subprocess.Popen(cmd, cwd=os.path.dirname(self.jar), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._pid, self._fresh = os.getpid(), True
        self.starts += 1
        lines: queue.Queue = queue.Queue()
        self._lines = lines

        def pump(stream, put) -> None:
            try:
                for line in iter(stream.readline, b""):
                    put(line)
            except (OSError, ValueError):
                pass
            put(None)  # end of stream: the process is gone

        threading.Thread(target=pump, args=(self._proc.stdout, lines.put), daemon=True,
                         name="meteor-1.5-stdout").start()
        self._stderr_pump = threading.Thread(target=pump, args=(self._proc.stderr, self._stderr.append),
                                             daemon=True, name="meteor-1.5-stderr")
        self._stderr_pump.start()
        logger.info("METEOR 1.5: started java (pid %d): %s", self._proc.pid, " ".join(cmd))

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin,):
            try:
                stream.close()
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Stop the java process (at exit too); a later ``score`` starts a new one."""
        with self.lock:
            if self._proc is not None and self._pid == os.getpid():
                self._kill()
            self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Meteor15:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ protocol
    def _write(self, data: bytes) -> None:
        proc = self._proc
        try:
            proc.stdin.write(data)
            proc.stdin.flush()
        except (OSError, ValueError):
            pass  # the process is gone: the reader sees the end of its stream

    def _send(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        # a writer thread: a java that stops reading cannot block us (the read below times out and kills it)
        threading.Thread(target=self._write, args=(data,), daemon=True, name="meteor-1.5-stdin").start()

    def _read(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            wait = self.start_timeout if self._fresh else self.timeout
            try:
                line = self._lines.get(timeout=wait)
            except queue.Empty:
                raise MeteorProcessError(f"java did not answer within {wait:.0f} s") from None
            if line is None:
                code = self._proc.wait(timeout=10) if self._proc is not None else None
                self._stderr_pump.join(timeout=2)  # its last words, for the message
                tail = " | ".join(x.decode("utf-8", "replace").strip() for x in list(self._stderr)[-3:] if x)
                raise MeteorProcessError(f"java exited (code {code})" + (f": {tail}" if tail else ""))
            self._fresh = False
            out.append(line.decode("utf-8", "replace").strip())
        return out

    @staticmethod
    def _number(line: str) -> float:
        try:
            value = float(line)
        except ValueError:
            raise MeteorProcessError(f"java answered {line[:200]!r} where a score was expected") from None
        if not math.isfinite(value):
            raise MeteorProcessError(f"java answered a non-finite score {line!r}")
        return value

    def score(self, pairs: list[tuple[str, list[str]]]) -> tuple[float, list[float]]:
        if not pairs:
            return float("nan"), []
        requests = []
        for hyp, refs in pairs:
            if isinstance(refs, str):
                refs = [refs]
            requests.append(" ||| ".join(["SCORE", *(sanitize(r) for r in refs), sanitize(hyp)]))
        with self.lock:
            if self.retired:
                raise MeteorProcessError("retired after failing (the run scores with nltk now)")
            try:
                if self._proc is None or self._pid != os.getpid():
                    self._start()
                self._send(requests)
                stats = self._read(len(requests))
                for s in stats:  # a stats line is numbers only; anything else means the stream is out of step
                    if not s:
                        raise MeteorProcessError("java answered an empty line where statistics were expected")
                    for x in s.split():
                        self._number(x)
                self._send(["EVAL ||| " + " ||| ".join(stats)])
                values = [self._number(x) for x in self._read(len(requests) + 1)]
            except BaseException:
                self._kill()  # out of step or dead: never reuse it
                raise
        return values[-1], values[:-1]


class MeteorScorer:
    """The implementation a run asked for (``auto``, ``meteor-1.5`` or ``nltk``), with the fallbacks: ``auto``
    without java/pycocoevalcap is nltk (one warning); a java process that fails is restarted once, then nltk for
    the rest of the run (a warning). ``impl`` is what the next batch uses, ``report()`` what the run used."""

    def __init__(self, impl: str = "auto", option: str = "meteor", **meteor15_kwargs) -> None:
        self.requested = check_impl(impl, option)
        self.restarts = 0
        self.fallback_reason: str | None = None
        self.batches = collections.Counter()  # impl -> batches scored with it
        self.last_impl: str | None = None  # what the last batch was scored with
        self._meteor15: Meteor15 | None = None
        self._lock = threading.Lock()
        if impl == NLTK:
            self.note = "nltk's meteor_score, as asked"
            return
        try:
            self._meteor15 = Meteor15(**meteor15_kwargs)
            self.note = f"METEOR 1.5 (pycocoevalcap's jar {self._meteor15.jar}, java {self._meteor15.java})"
        except MeteorUnavailable as e:
            if impl == METEOR_15:
                raise MeteorUnavailable(f"{option}='meteor-1.5': {e}; or use {option}='auto' (falls back to nltk, "
                                        "with a warning) or 'nltk'") from None
            self.fallback_reason = str(e)
            self.note = f"fell back to nltk's METEOR: {e}"
            _warn_once(f"auto:{e}", "%s; scoring with nltk's METEOR instead, whose numbers no paper reports "
                                    "(meteor_impl: nltk)", e)

    @property
    def impl(self) -> str:
        """``meteor-1.5`` or ``nltk``: what the next batch is scored with."""
        return METEOR_15 if self._meteor15 is not None else NLTK

    def describe(self) -> str:
        if self.impl == METEOR_15:
            return "METEOR 1.5 (pycocoevalcap, Java)"
        from sa2va_rl.rl.rewards import wordnet_available

        return "nltk, WordNet" if wordnet_available() else "nltk, no WordNet: exact+stem"

    def report(self) -> dict:
        """What stability.json and metrics.json record: ``meteor_impl`` (the implementation now), what was asked,
        why a fallback happened, java restarts and batches per implementation."""
        return {"meteor_impl": self.impl, "requested": self.requested, "describe": self.describe(),
                "note": self.note, "fallback_reason": self.fallback_reason, "java_restarts": self.restarts,
                "batches": dict(self.batches)}

    def close(self) -> None:
        if self._meteor15 is not None:
            self._meteor15.close()

    def score(self, hypotheses: list[str], references: list[str]) -> tuple[float, list[float]]:
        """(corpus, per-pair) METEOR of already tokenized text (see ``meteor_scores``)."""
        if not hypotheses:
            return float("nan"), []
        pairs = list(zip(hypotheses, ([r] for r in references), strict=True))
        with self._lock:
            m = self._meteor15
        while m is not None:
            try:
                result = m.score(pairs)
                self.batches[METEOR_15] += 1
                self.last_impl = METEOR_15
                return result
            except MeteorProcessError as e:
                with self._lock:
                    if self._meteor15 is not m:  # another thread already handled this failure
                        m = self._meteor15
                        continue
                    if self.restarts < 1:
                        self.restarts += 1
                        logger.warning("METEOR 1.5: %s; restarting java once", e)
                        continue  # m.score starts a new process
                    self._meteor15 = None
                    m.retired = True
                    self.fallback_reason = f"java failed twice: {e}"
                    self.note = (f"fell back to nltk's METEOR after {sum(self.batches.values())} batches: "
                                 f"{self.fallback_reason}")
                    logger.warning("METEOR 1.5: %s after one restart; scoring with nltk's METEOR for the rest of "
                                   "this run (meteor_impl: nltk from now on)", e)
                m.close()
                m = None
        per = _nltk_scores(hypotheses, references)
        self.batches[NLTK] += 1
        self.last_impl = NLTK
        return sum(per) / len(per), per


def _nltk_scores(hypotheses: list[str], references: list[str]) -> list[float]:
    from nltk.translate.meteor_score import meteor_score

    from sa2va_rl.rl import rewards

    rewards.wordnet_available()  # loads rewards._WORDNET once
    return [float(meteor_score([r.split()], h.split(), wordnet=rewards._WORDNET)) if h.split() else 0.0
            for h, r in zip(hypotheses, references, strict=True)]


_SCORERS: dict[str, MeteorScorer] = {}
_SCORERS_LOCK = threading.Lock()


def get_scorer(impl: str = "auto", option: str = "meteor") -> MeteorScorer:
    """The process's scorer for ``impl``: one java process per run, shared by the reward and eval."""
    check_impl(impl, option)
    with _SCORERS_LOCK:
        if impl not in _SCORERS:
            _SCORERS[impl] = MeteorScorer(impl, option=option)
        return _SCORERS[impl]


def _tokenized(text: str) -> str:
    from sa2va_rl.rl.rewards import _tokens

    return " ".join(_tokens(text))


def meteor_scores(hypotheses: list[str], references: list[str], impl: str | MeteorScorer = "auto"
                  ) -> tuple[float, list[float]]:
    """(corpus METEOR, per-pair METEOR) of each hypothesis against its reference, both lower-cased words
    (punctuation dropped), in one batch. ``impl``: a name (``get_scorer``) or a scorer. Every METEOR in sa2va-rl
    is computed here."""
    scorer = impl if isinstance(impl, MeteorScorer) else get_scorer(impl)
    return scorer.score([_tokenized(h) for h in hypotheses], [_tokenized(r) for r in references])


def _close_all() -> None:
    for scorer in list(_SCORERS.values()):
        scorer.close()


atexit.register(_close_all)
