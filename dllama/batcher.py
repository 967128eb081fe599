"""Continuous batching: several conversations share every forward pass of one engine.

Each running `Sequence` holds a conversation slot (its own KV cache, see dllama.model.kvcache). One
`step` is one forward pass: the next token of every sequence that is generating, plus chunks of the
prompts still being evaluated, up to `max_rows` rows, so the weights read once serve everyone and a long
prompt never stalls the others for more than a chunk. A sequence that ends frees its slot at once; the next
one takes the free slot whose cached tokens share the longest prefix with its prompt.

Synchronous and single-threaded: the API's engine thread (dllama.api.runner) and the benchmarks drive it.
"""

from __future__ import annotations

import time

from dllama.errors import DllamaError
from dllama.model.collective import wants_of


class Sequence:
    """One request: its prompt, limits and own sampler; after `Batcher.step` its state and timings."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, sampler, stop_ids=(), tag=None):
        if not prompt_ids:
            raise DllamaError("the prompt is empty")
        self.prompt_ids, self.max_tokens, self.sampler = list(prompt_ids), max_tokens, sampler
        self.stop_ids, self.tag = set(stop_ids), tag
        self.slot: int | None = None
        self.todo: list[int] = []         # prompt tokens still to evaluate
        self.pending: int | None = None   # the last token sampled, not yet run through the model
        self.generated = 0
        self.reused = 0                   # prompt tokens whose K/V were already in the slot
        self.finish: str | None = None    # "stop" or "length" once ended
        self.t_submit = time.perf_counter()
        self.t_start = self.t_first = self.t_end = 0.0

    def timings(self) -> dict:
        """Per-request figures (seconds and tokens/s) for the API's usage and the logs."""
        gen_s = self.t_end - self.t_first if self.t_first else 0.0
        return {"queued_s": round(self.t_start - self.t_submit, 6) if self.t_start else 0.0,
                "prompt_tokens_evaluated": len(self.prompt_ids) - self.reused, "reused_tokens": self.reused,
                "time_to_first_token_s": round(self.t_first - self.t_submit, 6) if self.t_first else 0.0,
                "generation_tokens_per_s": round((self.generated - 1) / gen_s, 3) if gen_s > 0 else 0.0}


class Batcher:
    def __init__(self, engine, max_rows: int | None = None):
        from dllama.engine import MAX_BATCH

        self.engine = engine
        self.max_rows = max_rows or MAX_BATCH
        if engine.n_slots > self.max_rows:
            raise DllamaError(f"{engine.n_slots} slots do not fit a pass of {self.max_rows} rows")
        self.free = list(range(engine.n_slots))
        self.running: list[Sequence] = []
        self.passes = self.rows = 0       # forward passes run and rows they carried
        self.last_rows = 0                # rows of the latest pass

    @property
    def has_room(self) -> bool:
        return bool(self.free)

    def admit(self, seq: Sequence) -> None:
        """Give `seq` the free slot whose cache shares the longest prefix with its prompt; DllamaError if
        the prompt does not fit the context or no slot is free."""
        eng = self.engine
        if len(seq.prompt_ids) >= eng.seq_len:
            raise DllamaError(f"the prompt has {len(seq.prompt_ids)} tokens, more than the context allows "
                              f"({eng.seq_len} with the current --max-seq-len)")
        if not self.free:
            raise DllamaError("no free slot")
        slot = eng.best_slot(seq.prompt_ids, self.free)
        self.free.remove(slot)
        seq.reused = eng.claim(slot, seq.prompt_ids)
        seq.slot, seq.todo = slot, seq.prompt_ids[seq.reused:]
        seq.t_start = time.perf_counter()
        self.running.append(seq)

    def cancel(self, seq: Sequence) -> None:
        """End `seq` now; its slot's memory goes back (a cancelled reply is not worth keeping)."""
        if seq in self.running:
            self._end(seq, None)
            self.engine.release(seq.slot)

    def step(self) -> list[tuple[Sequence, int]]:
        """One forward pass over every running sequence; returns the (sequence, token) pairs sampled, in
        order. A sequence whose token ended it has `finish` set and has left `running`."""
        parts, owners = [], []
        room = self.max_rows - sum(1 for s in self.running if not s.todo)
        for seq in self.running:
            if not seq.todo:
                parts.append((seq.slot, [seq.pending], True))
                owners.append(seq)
            elif room > 0:
                chunk, seq.todo = seq.todo[:room], seq.todo[room:]
                room -= len(chunk)
                parts.append((seq.slot, chunk, not seq.todo))
                if not seq.todo:
                    owners.append(seq)
        if not parts:
            return []
        # each row's own sampler says what it needs: over a cluster, the nodes' top candidates where they do
        logits = self.engine.forward_rows(parts, [wants_of(seq.sampler) for seq in owners])
        self.passes += 1
        self.last_rows = sum(len(p[1]) for p in parts)
        self.rows += self.last_rows
        out = []
        for i, seq in enumerate(owners):
            tok = int(seq.sampler(logits[i]))
            seq.generated += 1
            if seq.generated == 1:
                seq.t_first = time.perf_counter()
            out.append((seq, tok))
            # the last token is not run through the model: nobody would read its logits
            if tok in seq.stop_ids:
                self._end(seq, "stop")
            elif seq.generated >= seq.max_tokens or self.engine.cache_len(seq.slot) >= self.engine.seq_len:
                self._end(seq, "length")
            else:
                seq.pending = tok
        return out

    def end(self, seq: Sequence, finish: str | None) -> None:
        """End `seq` (a stop string, an error): its slot frees and keeps its cache for a returning chat."""
        if seq in self.running:
            self._end(seq, finish)

    def _end(self, seq: Sequence, finish: str | None) -> None:
        seq.finish, seq.t_end = finish, time.perf_counter()
        self.running.remove(seq)
        self.free.append(seq.slot)
