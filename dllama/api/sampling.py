"""What a request adds to the sampler: log-probabilities, presence/frequency penalties and logit_bias.

`RequestSampler` wraps a `dllama.sampler.Sampler`. Everything it needs per token is prepared once per
request: one dense offset vector (the bias, minus the penalties earned so far, updated in place for the one
token chosen) and two scratch vectors, so a token costs an add over the vocabulary and no allocation.
Log-probabilities are those of the raw logits (before bias, penalties and temperature), as OpenAI and
llama-server report them. The output layer returns the full logits whenever any of this is asked for.
"""

from __future__ import annotations

import numpy as np

from dllama.model.collective import FULL_LOGITS

MAX_TOP_LOGPROBS = 20   # chat's top_logprobs (OpenAI's limit); completions allow 5


class RequestSampler:
    def __init__(self, base, vocab: int, top_logprobs: int | None = None, presence: float = 0.0,
                 frequency: float = 0.0, bias: dict[int, float] | None = None, unreported=()):
        self.base = base
        self.top_n = top_logprobs          # None: no log-probabilities
        self.presence, self.frequency = float(presence), float(frequency)
        self.unreported = set(unreported)  # end-of-turn tokens: not part of the reply, so not reported
        self._counts = np.zeros(vocab, np.int32) if presence or frequency else None
        self._offset = None
        if bias or self._counts is not None:
            self._offset = np.zeros(vocab, np.float32)
            for tok, b in (bias or {}).items():
                self._offset[tok] = b
            self._x = np.empty(vocab, np.float32)
        self._tmp = np.empty(vocab, np.float32) if top_logprobs is not None else None
        self._mask = np.empty(vocab, bool) if top_logprobs else None
        self.records: list = []            # (token, logprob, [(token, logprob)] best first) not yet taken

    @property
    def active(self) -> bool:
        return self._offset is not None or self.top_n is not None

    def wants(self) -> tuple:
        return FULL_LOGITS if self.active else self.base.wants()

    def __call__(self, logits) -> int:
        if not isinstance(logits, np.ndarray):   # the nodes' top candidates: only without any of this
            return self.base(logits)
        x = logits
        if self._offset is not None:
            x = np.add(logits, self._offset, out=self._x)
        # read before the base sampler: a grammar's mask (dllama.grammar) rules tokens out in place
        summary = self._summary(logits) if self.top_n is not None else None
        tok = int(self.base(x))
        if summary is not None and tok not in self.unreported:
            lse, top = summary
            self.records.append((tok, float(logits[tok]) - lse, top))
        if self._counts is not None:
            c = self._counts[tok] = self._counts[tok] + 1
            # OpenAI: logit -= count * frequency_penalty + (count > 0) * presence_penalty
            self._offset[tok] -= self.frequency + (self.presence if c == 1 else 0.0)
        return tok

    def _summary(self, logits: np.ndarray) -> tuple:
        """The log-sum-exp of the raw logits and the top_n alternatives' (id, logprob)."""
        m = float(logits.max())
        np.subtract(logits, np.float32(m), out=self._tmp)
        np.exp(self._tmp, out=self._tmp)
        lse = m + float(np.log(self._tmp.sum(dtype=np.float64)))
        top = [(int(t), float(logits[t]) - lse) for t in self._best(logits, m)] if self.top_n else []
        return lse, top

    def _best(self, logits: np.ndarray, m: float) -> np.ndarray:
        """The top_n token ids, best first. Only the logits within a widening margin of the maximum are
        sorted: a partition of the whole vocabulary would cost a millisecond a token."""
        n, margin = self.top_n, 1.0
        while True:
            np.greater_equal(logits, np.float32(m - margin), out=self._mask)
            count = int(np.count_nonzero(self._mask))
            if count >= n or not np.isfinite(m - margin):
                break
            margin *= 8
        cand = np.flatnonzero(self._mask)
        if cand.size < n:   # -inf or NaN logits among the best: fall back to the whole vocabulary
            cand = np.arange(logits.size)
        return cand[np.argsort(-logits[cand], kind="stable")[:n]]

    def take(self) -> list | None:
        """The records since the last call (None when log-probabilities were not asked for)."""
        if self.top_n is None:
            return None
        out, self.records = self.records, []
        return out


def parse_logit_bias(bias: dict | None, vocab: int) -> dict[int, float]:
    """logit_bias's {"token id": bias} as ints; ValueError naming the first bad entry."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise ValueError(f"logit_bias: {key!r} is not a token id") from None
        if not 0 <= tok < vocab:
            raise ValueError(f"logit_bias: token id {tok} is not in the vocabulary [0, {vocab})")
        if not -100 <= value <= 100:
            raise ValueError(f"logit_bias: the bias of token {tok} must be in [-100, 100], got {value}")
        out[tok] = float(value)
    return out


def _entry(tokenizer, tok: int, lp: float) -> dict:
    raw = tokenizer.token_bytes(tok)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}


def chat_logprobs(tokenizer, records: list) -> dict:
    """OpenAI's chat `logprobs` object for these records."""
    return {"content": [{**_entry(tokenizer, tok, lp), "top_logprobs": [_entry(tokenizer, t, v) for t, v in top]}
                        for tok, lp, top in records], "refusal": None}


def completion_logprobs(tokenizer, records: list, offset: int = 0) -> dict:
    """The completions API's `logprobs` object; text offsets count characters from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, lp, top in records:
        text = tokenizer.token_bytes(tok).decode("utf-8", errors="replace")
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({_entry(tokenizer, t, v)["token"]: v for t, v in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
