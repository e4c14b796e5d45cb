"""Learning from served traffic: the completion log and the online tau gauge.

Lifecycle:

- Opt-in (``ranker.log_completions``). When a request finishes, the
  controller hands ``CompletionLog.record`` its prompt, output length and
  arrival score; one JSON record is pushed to the Redis list
  ``<ns>:ranker:completions`` and the list is trimmed to ``cap`` records
  (newest first), so the log is bounded.
- The prompt text is never stored as is. ``store: features`` keeps a sha256
  of the prompt (the record's id) and the head's input features (MiniLM
  embedding + log length, float16, base64): enough to retrain the head, not
  to read the prompt back. ``store: redacted`` keeps the text with e-mail
  addresses, URLs, IP addresses, long digit runs and secret-looking tokens
  replaced by placeholders, so the text can be embedded again later.
- ``read_completions`` (``baton ranker train --from-redis``) reads the list
  back as training examples or feature rows.
- ``OnlineTau`` keeps the last ``window`` (score, output length) pairs and
  publishes their Kendall's tau as the Prometheus gauge
  ``baton_ranker_kendall_tau`` in the default registry (served on /metrics
  by the controller process).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from prometheus_client import Gauge

from cluster.ranker.evaluate import kendall_tau

STORE_MODES = ("features", "redacted")
RANKER_TAU = Gauge("baton_ranker_kendall_tau",
                   "Kendall's tau between ranker scores and true output lengths of recent completions")

_REDACTIONS = [
    (re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+"), "<email>"),
    (re.compile(r"\b(?:https?|ftp)://\S+|\bwww\.\S+", re.I), "<url>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"), "<ip>"),
    (re.compile(r"\b(?:sk|pk|ghp|gho|xox[abp]|AKIA)[-_A-Za-z0-9]{12,}\b"), "<secret>"),
    (re.compile(r"\b[A-Za-z0-9+/_-]{32,}={0,2}"), "<secret>"),
    (re.compile(r"\+?\d[\d ()-]{6,}\d"), "<number>"),
]


def redact(text: str) -> str:
    """The prompt with personal or secret-looking spans replaced."""
    for pattern, placeholder in _REDACTIONS:
        text = pattern.sub(placeholder, text)
    return text


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pack_features(x: torch.Tensor) -> str:
    return base64.b64encode(x.to(torch.float16).numpy().tobytes()).decode("ascii")


def unpack_features(text: str) -> torch.Tensor:
    arr = np.frombuffer(base64.b64decode(text), dtype=np.float16).astype(np.float32)
    return torch.from_numpy(arr.copy())


@dataclass(frozen=True)
class Completion:
    """One logged request, as read back for retraining."""

    id: str  # sha256 of the prompt
    output_tokens: int  # tokens the request generated
    score: float | None  # the ranker's score on arrival
    features: torch.Tensor | None  # (385,) head input ("features" mode)
    prompt: str | None  # redacted prompt ("redacted" mode)


class CompletionLog:
    def __init__(self, redis, namespace: str, store: str = "features", cap: int = 50_000):
        if store not in STORE_MODES:
            raise ValueError(f"store {store!r} is not allowed; allowed: {', '.join(STORE_MODES)}")
        if cap <= 0:
            raise ValueError(f"cap={cap} must be > 0")
        self.r, self.key, self.store, self.cap = redis, f"{namespace}:ranker:completions", store, cap

    def make_record(self, prompt: str, output_tokens: int, score: float | None,
                    features: torch.Tensor | None) -> str:
        rec = {"id": prompt_hash(prompt), "output_tokens": int(output_tokens), "score": score}
        if self.store == "features":
            if features is None:
                raise ValueError("features mode needs the prompt's features")
            rec["features"] = pack_features(features)
        else:
            rec["prompt"] = redact(prompt)
        return json.dumps(rec)

    async def record(self, prompt: str, output_tokens: int, score: float | None,
                     features: torch.Tensor | None) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.lpush(self.key, self.make_record(prompt, output_tokens, score, features))
            p.ltrim(self.key, 0, self.cap - 1)
            await p.execute()


def parse_completion(line: str) -> Completion:
    rec = json.loads(line)
    feats = unpack_features(rec["features"]) if "features" in rec else None
    return Completion(rec["id"], int(rec["output_tokens"]), rec.get("score"), feats,
                      rec.get("prompt"))


def read_completions(url: str, namespace: str, password: str | None = None,
                     limit: int | None = None) -> list[Completion]:
    """Every logged completion (newest first), read with a blocking client."""
    import redis

    r = redis.from_url(url, password=password, decode_responses=True)
    try:
        lines = r.lrange(f"{namespace}:ranker:completions", 0, -1 if limit is None else limit - 1)
    finally:
        r.close()
    return [parse_completion(x) for x in lines]


class OnlineTau:
    """Kendall's tau of the last ``window`` completions, recomputed every
    ``every`` completions and exported as ``baton_ranker_kendall_tau``."""

    def __init__(self, window: int = 500, every: int = 20, gauge: Gauge = RANKER_TAU):
        if window < 2 or every <= 0:
            raise ValueError(f"window={window} must be >= 2 and every={every} > 0")
        self.pairs: deque[tuple[float, int]] = deque(maxlen=window)
        self.every, self.gauge, self._since = every, gauge, 0
        self.value: float | None = None

    def add(self, score: float, output_tokens: int) -> None:
        self.pairs.append((score, output_tokens))
        self._since += 1
        if self._since >= self.every and len(self.pairs) >= 2:
            self._since = 0
            s, y = zip(*self.pairs, strict=True)
            tau = kendall_tau(list(s), list(y))
            if tau == tau:  # NaN when every length is equal
                self.value = tau
                self.gauge.set(tau)
