"""An LLM judge of region captions: an OpenAI-compatible chat-completions server (e.g. vLLM serving
Llama-3.1-8B-Instruct, as the original trainer did) scores a caption against its reference from 0 to 10; the
reward is that score / 10.

The default prompt is the original trainer's (ANS ``projects/llava_sam2/rl_train/llm_reward.py``,
``CAPTION_EVAL_PROMPT``); ``--judge_template FILE`` replaces it (a text with ``{reference}`` and ``{hypothesis}``).
Unlike the original, a call that fails (timeout, HTTP error, a reply that is not JSON or holds no score in [0, 10])
gives ``None`` after the retries, which TRL reads as "no opinion" for that sample, never a silent 0: a judge that
is down must not look like a model that got worse. Failures are counted (``LLMJudge.stats``), logged (rate
limited) and reported in ``stability.json`` under ``judge``.

Calls run concurrently on a thread pool; each distinct (caption, reference) pair is asked once and cached (the G
samples of a group often repeat a caption; failures are not cached, so a later step asks again). Only the standard
library is used (urllib).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sa2va_rl.numerics._ratelimit import PowerOfTwoLimiter

logger = logging.getLogger(__name__)

# The original trainer's prompt, verbatim (ANS rl_train/llm_reward.py, CAPTION_EVAL_PROMPT).
DEFAULT_TEMPLATE = """You are an expert evaluator of image region descriptions. Your task is to rate how well a generated description matches a reference description.

Reference description (ground truth):
{reference}

Generated description (to evaluate):
{hypothesis}

Rate the generated description on a scale from 0 to 10 based on:
1. **Semantic Accuracy**: Does it describe the same object/region correctly?
2. **Detail Coverage**: Does it capture the key details from the reference?
3. **Factual Correctness**: Are the stated facts consistent with the reference?

IMPORTANT RULES:
- Exact word matching is NOT required
- Focus on meaning and content, not wording
- A score of 10 means perfect semantic match
- A score of 0 means completely wrong or irrelevant
- Partial matches should get proportional scores (e.g., 5-7)

Output ONLY a single number between 0 and 10 (decimals allowed, e.g., 7.5).
Do NOT include any explanation or other text.

Score:"""

DEFAULT_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"
API_KEY_ENV = "SA2VA_RL_JUDGE_API_KEY"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class JudgeArgs:
    """The LLM judge of captions (reward and eval metric); off unless --judge_url is given."""

    judge_url: str | None = field(default=None, metadata={
        "help": "OpenAI-compatible server of the caption judge, e.g. http://localhost:9100/v1 (vLLM); "
                "/chat/completions is appended unless the URL ends with it. With it, mask2caption is rewarded "
                "0.25 x METEOR + 0.75 x judge score/10 (the original trainer's weights)."})
    judge_model: str = field(default=DEFAULT_MODEL, metadata={"help": "Model name sent to the judge server."})
    judge_template: str | None = field(default=None, metadata={
        "help": "File holding the judge prompt, with {reference} and {hypothesis} in it (default: the original "
                "trainer's 0-10 prompt). The reply's first number, in [0, 10], is the score."})
    judge_timeout: float = field(default=30.0, metadata={"help": "Seconds per judge request."})
    judge_retries: int = field(default=2, metadata={"help": "Further attempts after a failed judge request; then "
                                                           "the sample gets no opinion (None), counted."})
    judge_workers: int = field(default=8, metadata={"help": "Concurrent judge requests."})

    def __post_init__(self) -> None:
        if self.judge_url is not None and not self.judge_url.startswith(("http://", "https://")):
            raise ValueError(f"judge_url={self.judge_url!r}: give an http(s) URL, e.g. http://localhost:9100/v1")
        if self.judge_timeout <= 0:
            raise ValueError(f"judge_timeout={self.judge_timeout}: use a positive number of seconds")
        if self.judge_retries < 0:
            raise ValueError(f"judge_retries={self.judge_retries}: use 0 or more")
        if self.judge_workers < 1:
            raise ValueError(f"judge_workers={self.judge_workers}: use 1 or more")
        if self.judge_template is not None:
            read_template(self.judge_template)  # fails now, naming the file, rather than at the first step

    def build(self) -> LLMJudge | None:
        if self.judge_url is None:
            return None
        template = DEFAULT_TEMPLATE if self.judge_template is None else read_template(self.judge_template)
        return LLMJudge(self.judge_url, model=self.judge_model, template=template, timeout=self.judge_timeout,
                        retries=self.judge_retries, workers=self.judge_workers)


def read_template(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"judge_template {path!r}: cannot read it ({e})") from e
    missing = [k for k in ("{reference}", "{hypothesis}") if k not in text]
    if missing:
        raise ValueError(f"judge_template {path!r} lacks {' and '.join(missing)}: the prompt must show the judge "
                         "both captions")
    return text


def chat_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def parse_score(reply: str) -> float | None:
    """The reply's first number / 10, or None when there is none or it is outside [0, 10]."""
    m = _NUMBER.search(reply or "")
    if m is None:
        return None
    value = float(m.group())
    return value / 10.0 if 0.0 <= value <= 10.0 else None


class JudgeFailure(Exception):
    """One request failed; ``kind`` is the counter it goes to (timeout, http_error, connection, malformed)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class LLMJudge:
    """Scores (hypothesis, reference) caption pairs in [0, 1] through a chat-completions endpoint; None when a
    pair could not be scored after ``retries`` further attempts."""

    def __init__(self, url: str, model: str = DEFAULT_MODEL, template: str = DEFAULT_TEMPLATE, timeout: float = 30.0,
                 retries: int = 2, workers: int = 8, retry_delay: float = 0.5, max_tokens: int = 10) -> None:
        self.url = chat_url(url)
        self.model, self.template = model, template
        self.timeout, self.retries, self.workers = timeout, retries, workers
        self.retry_delay, self.max_tokens = retry_delay, max_tokens
        self.stats: Counter = Counter()  # requests, scored, failed (pairs), cache_hits, and failures by kind
        self._cache: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._limiter = PowerOfTwoLimiter()

    # ------------------------------------------------------------------ one request
    def _request(self, prompt: str) -> float:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get(API_KEY_ENV):
            headers["Authorization"] = f"Bearer {os.environ[API_KEY_ENV]}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise JudgeFailure("http_error", f"HTTP {e.code} from {self.url}") from None
        except TimeoutError:
            raise JudgeFailure("timeout", f"no reply from {self.url} within {self.timeout:g} s") from None
        except urllib.error.URLError as e:
            kind = "timeout" if isinstance(e.reason, TimeoutError) else "connection"
            raise JudgeFailure(kind, f"{self.url}: {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:  # connection reset, a truncated body and the like
            raise JudgeFailure("connection", f"{self.url}: {type(e).__name__}: {e}") from None
        try:
            reply = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeFailure("malformed", f"reply is not a chat completion: {raw[:120]!r}") from None
        score = parse_score(reply if isinstance(reply, str) else "")
        if score is None:
            raise JudgeFailure("malformed", f"reply holds no score in [0, 10]: {str(reply)[:120]!r}")
        return score

    def _score_pair(self, hypothesis: str, reference: str) -> float | None:
        prompt = self.template.replace("{reference}", reference).replace("{hypothesis}", hypothesis)
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_delay * 2 ** (attempt - 1))
            with self._lock:
                self.stats["requests"] += 1
            try:
                score = self._request(prompt)
            except JudgeFailure as e:
                error = e
                with self._lock:
                    self.stats[e.kind] += 1
                continue
            with self._lock:
                self._cache[(hypothesis, reference)] = score
                self.stats["scored"] += 1
            return score
        with self._lock:
            self.stats["failed"] += 1
        if self._limiter():
            logger.warning("caption judge: no score after %d attempt(s) (%s); the sample gets no opinion (%d such "
                           "samples so far)", self.retries + 1, error, self.stats["failed"])
        return None

    # ------------------------------------------------------------------ batches
    def score(self, hypotheses: list[str], references: list[str]) -> list[float | None]:
        """Scores in [0, 1] (None: no score), one request per distinct uncached pair, ``workers`` at a time."""
        pairs = list(zip(hypotheses, references, strict=True))
        with self._lock:
            todo = list(dict.fromkeys(p for p in pairs if p not in self._cache))
            self.stats["cache_hits"] += len(pairs) - len(todo)
        if todo:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sa2va-rl-judge")
            fresh = dict(zip(todo, self._pool.map(lambda p: self._score_pair(*p), todo)))
        else:
            fresh = {}
        return [self._cache.get(p, fresh.get(p)) for p in pairs]

    def report(self) -> dict:
        return {"url": self.url, "model": self.model, **{k: int(v) for k, v in sorted(self.stats.items())}}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def judge_reward(judge: LLMJudge):
    """The judge as a TRL reward function ``caption_judge(completions, caption=...)``: score/10 in [0, 1] on
    mask2caption rows, None on rows without a reference caption and where the judge gave no score."""
    from sa2va_rl.rl.rewards import _text

    def caption_judge(completions, caption=None, **kwargs) -> list[float | None]:
        if caption is None:
            return [None] * len(completions)
        rows = [i for i, ref in enumerate(caption) if ref is not None]
        out: list[float | None] = [None] * len(completions)
        scores = judge.score([_text(completions[i]).strip() for i in rows], [caption[i] for i in rows])
        for i, s in zip(rows, scores, strict=True):
            out[i] = s
        return out

    caption_judge.judge = judge
    return caption_judge
