"""Choosing the next token from logits: greedy at temperature 0, else temperature + top-p (nucleus).

On a cluster the root may hand over the nodes' top candidates instead of the full logits
(dllama/candidates.py); they decide the same token, or the full logits are fetched."""

from __future__ import annotations

import numpy as np

from dllama.errors import DllamaError
from dllama.model.collective import FULL_LOGITS, LOGITS_TOP


class Sampler:
    def __init__(self, temperature: float = 0.8, topp: float = 0.9, seed: int | None = None):
        if temperature < 0:
            raise DllamaError(f"--temperature must be >= 0, got {temperature}")
        if not 0 < topp <= 1:
            raise DllamaError(f"--topp must be in (0, 1], got {topp}")
        self.temperature, self.topp = temperature, topp
        self.rng = np.random.default_rng(seed)
        self._p = np.empty(0, np.float32)   # the vocabulary's weights, reused token after token

    def wants(self) -> tuple:
        """What the output layer must return for this sampler (dllama.model.collective): the top token at
        temperature 0, the top candidates for top-p, the full logits when top_p is 1 (all of them count)."""
        from dllama.candidates import TOP_K

        if self.temperature == 0:
            return (LOGITS_TOP, 0.0, 1)
        if self.topp < 1:
            return (LOGITS_TOP, float(self.temperature), TOP_K)
        return FULL_LOGITS

    def _from_candidates(self, cands) -> int:
        if self.temperature == 0:
            return cands.greedy()
        nucleus = cands.nucleus(self.topp) if self.topp < 1 else None
        if nucleus is None:
            return self(cands.full())
        keep, p = nucleus
        cum = np.cumsum(p)
        i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        return int(keep[min(i, keep.size - 1)])

    def __call__(self, logits) -> int:
        if not isinstance(logits, np.ndarray):   # the nodes' top candidates (dllama.candidates)
            return self._from_candidates(logits)
        if self.temperature == 0:
            return int(np.argmax(logits))
        if self._p.size != logits.size:
            self._p = np.empty(logits.size, np.float32)
        # unnormalised softmax in float32, in place: no float64 copy of the vocabulary per token
        p = np.multiply(logits, np.float32(1 / self.temperature), out=self._p)
        p -= p.max()
        np.exp(p, out=p)
        if self.topp >= 1:
            cum = np.cumsum(p, out=p)
            i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
            return min(i, p.size - 1)
        total = float(p.sum(dtype=np.float64))
        # As llama2.c: tokens below (1 - topp) / (n - 1) can never be in the nucleus, so only the few
        # survivors are sorted (a full argsort of a 128k vocabulary per token would cost milliseconds).
        cand = np.flatnonzero(p >= (1 - self.topp) / (p.size - 1) * total)
        cand = cand[np.argsort(-p[cand], kind="stable")]
        cum = np.cumsum(p[cand], dtype=np.float64)
        last = int(np.searchsorted(cum, self.topp * total)) + 1
        keep = cum[:last]
        i = int(np.searchsorted(keep, self.rng.random() * keep[-1], side="right"))
        return int(cand[min(i, keep.size - 1)])
