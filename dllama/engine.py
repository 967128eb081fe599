"""Generation: load a model (split over the workers, if any), evaluate prompts in batches, decode token by
token, reuse the KV cache across calls, and time it all."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from dllama.errors import DllamaError
from dllama.model.collective import FULL_LOGITS, LOGITS_NONE, NO_LOGITS, per_row, wants_of
from dllama.net.memory import freeze_survivors, thaw

MAX_BATCH = 32  # prompt positions per forward pass, as the reference


@dataclass
class Stats:
    prompt_tokens: int = 0          # tokens evaluated for the prompt (after KV-cache reuse)
    reused_tokens: int = 0          # prompt tokens whose K/V were already in the cache
    prompt_s: float = 0.0
    generated: int = 0
    gen_s: float = 0.0
    transfer_s: float = 0.0         # of gen_s: time spent waiting on the network
    sent_bytes: int = 0             # during generation
    recv_bytes: int = 0
    first_token_s: float = 0.0      # from generate() to the first generated token
    token_ms: list = field(default_factory=list)
    worker_ns: list = field(default_factory=list)   # per worker: its own (compute, network) ns in the decode passes

    def nodes(self) -> list[dict]:
        """Per node, ms per decode pass: the root's own split (as avg_inference_ms/avg_transfer_ms), then each
        worker's as it measured it (protocol TIMES): its compute, and its time in the exchanges."""
        n = max(len(self.token_ms), 1)
        avg_ms = sum(self.token_ms) / n
        root = {"inference_ms": avg_ms - 1000 * self.transfer_s / n, "transfer_ms": 1000 * self.transfer_s / n}
        return [root] + [{"inference_ms": c / 1e6 / n, "transfer_ms": t / 1e6 / n} for c, t in self.worker_ns]

    def summary(self) -> dict:
        # per-token figures are over the decode forward passes (the first token comes from the prompt's
        # pass, the last is not run), so they are what one more token costs
        n = max(len(self.token_ms), 1)
        avg_ms = sum(self.token_ms) / n
        nodes = self.nodes()
        return {
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "generated_tokens": self.generated,
            "prompt_tokens_per_s": self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0,
            "generation_tokens_per_s": 1000 / avg_ms if avg_ms else 0.0,
            "avg_token_ms": avg_ms,
            "avg_inference_ms": nodes[0]["inference_ms"],
            "avg_transfer_ms": nodes[0]["transfer_ms"],
            "sent_bytes_per_token": self.sent_bytes / n,
            "recv_bytes_per_token": self.recv_bytes / n,
            "time_to_first_token_s": self.first_token_s,
            "nodes": nodes,
        }


class Engine:
    """A loaded model ready to generate. Not re-entrant: one generate() at a time."""

    def __init__(self, loaded, tokenizer, model, coll, seq_len: int, cluster=None):
        self.loaded, self.tokenizer = loaded, tokenizer
        self._cluster = cluster   # how the workers were joined (connect_workers' arguments), to join again
        self._chat = None
        self.spec = loaded.spec
        self.model, self.coll, self.seq_len = model, coll, seq_len
        self.name = self.spec.name or os.path.basename(loaded.path)
        # per conversation slot: the tokens whose K/V are in its cache, in position order; prefill and
        # generate use slot 0, a scheduler (dllama.api.batcher) all of them through forward_rows
        self.slot_ids: list[list[int]] = [[] for _ in range(model.kv.n_slots)]
        self._rows = np.zeros((3, model.max_batch), np.int64)   # a batched pass's slots, positions, tokens
        self._steps = np.arange(model.max_batch, dtype=np.int64)
        self.stats = Stats()

    @property
    def n_slots(self) -> int:
        return len(self.slot_ids)

    @property
    def cache_ids(self) -> list[int]:
        return self.slot_ids[0]

    @cache_ids.setter
    def cache_ids(self, ids: list[int]) -> None:
        self.slot_ids[0] = ids

    @property
    def chat(self):
        """The model's chat template (or the built-in its vocabulary points to). Built on first use, so a
        base model without any template still runs `inference`; raises DllamaError for chat without one."""
        if self._chat is None:
            from dllama.chat import ChatTemplate

            self._chat = ChatTemplate.for_tokenizer(self.tokenizer)
        return self._chat

    @classmethod
    def open(cls, model_path: str, tokenizer_path: str | None = None, nthreads: int = 1,
             max_seq_len: int | None = None, buffer_float_type: str = "q80", workers=(),
             log=None, cluster_key: bytes | None = None, on_lost=None, parallel: int = 1,
             split=None, m_keys: str = "auto", progress=None) -> "Engine":
        """Load a model file (and tokenizer), connecting to and loading the workers if any. `m_keys`: the
        key set of a `.m` file (see `dlm.key_set`), "auto" to detect it.

        `progress(label, total_bytes)`, e.g. `dllama.progress.Board().add`, gives a bar for the root's own
        slice and one per worker streamed its weights. Raises DllamaError for bad files, bad flags, and
        workers that cannot be reached.
        """
        from dllama.formats.loader import load_model

        _check_flags(nthreads, buffer_float_type, max_seq_len, parallel)
        loaded = load_model(model_path, m_keys)
        tokenizer = _open_tokenizer(loaded, tokenizer_path)
        if tokenizer.vocab_size != loaded.spec.vocab_size:
            # the model would pick ids the tokenizer cannot print, or the tokenizer give ids past the
            # embedding's rows: not the model's tokenizer (llama.cpp refuses this too)
            loaded.close()
            raise DllamaError(f"the tokenizer {tokenizer_path or loaded.path} has {tokenizer.vocab_size} tokens, "
                              f"the model {loaded.path} {loaded.spec.vocab_size}: not this model's tokenizer")
        return cls.from_loaded(loaded, tokenizer, nthreads, max_seq_len, buffer_float_type, workers, log,
                               cluster_key, on_lost, parallel, split, progress)

    @classmethod
    def from_loaded(cls, loaded, tokenizer, nthreads: int = 1, max_seq_len: int | None = None,
                    buffer_float_type: str = "q80", workers=(), log=None, cluster_key: bytes | None = None,
                    on_lost=None, parallel: int = 1, split=None, progress=None) -> "Engine":
        """An engine over an already loaded model (a file's, or tensors built in memory). `cluster_key`
        authenticates the workers; `on_lost(exc)` hears of a worker lost while idle (see `reconnect`);
        `parallel` conversation slots get a KV cache of the context each. `split`: None (even shares), a
        weight per node, or "auto" (by measured speed, dllama.model.split)."""
        from dllama import kernels as K
        from dllama.model.collective import LocalCollective
        from dllama.model.llama import NodeModel
        from dllama.model import split as S
        from dllama.model.partition import check_blocks, partition

        _check_flags(nthreads, buffer_float_type, max_seq_len, parallel)
        spec = loaded.spec
        auto = split == S.AUTO and bool(workers)
        # refuses bad node counts and weights before connecting; with auto, the even plan stands in (for the
        # memory check below) until the workers' speeds are in
        plan = partition(spec, 1 + len(workers), None if split == S.AUTO else split)
        check_blocks(loaded.tensors, spec, plan)
        seq_len = min(spec.seq_len, max_seq_len) if max_seq_len else spec.seq_len
        _check_memory(spec, plan[0], seq_len, parallel)
        K.set_threads(nthreads)
        # load every kernel the model needs from numba's cache now, not inside the first prompt's timing
        K.warmup(sorted({t.qtype for t in loaded.tensors.values() if len(t.shape) == 2} - {"f32"}))
        cluster = None
        if workers:
            from dllama.net.root import connect_workers
            from dllama.net.transport import spin_seconds

            spin_seconds()   # a bad $DLLAMA_SPIN_US fails before any worker is connected and loaded
            names = ["root"] + [w if isinstance(w, str) else f"{w[0]}:{w[1]}" for w in workers]
            planner = S.AutoPlanner(spec, seq_len, MAX_BATCH, names, log or (lambda msg: None),
                                    lambda chosen: check_blocks(loaded.tensors, spec, chosen), parallel) if auto else None
            cluster = dict(addresses=list(workers), loaded=loaded, plan=planner or plan, seq_len=seq_len,
                           buffer_type=buffer_float_type, nthreads=nthreads, log=log, max_batch=MAX_BATCH,
                           key=cluster_key, on_lost=on_lost, n_slots=parallel)
            coll = connect_workers(**cluster, progress=progress)
            plan = coll.plan
            if planner:   # a reconnect measures again, and keeps this plan unless a new one is clearly better
                planner.current = plan
            if split is not None and not auto and log:
                for line in S.describe(spec, plan, names, None):
                    log("  " + line)
        else:
            coll = LocalCollective()
        model = NodeModel(spec, plan[0], seq_len, MAX_BATCH, coll, parallel)
        _load_slice(model, loaded, spec, plan[0], progress)
        _release_pages(loaded)
        freeze_survivors()
        return cls(loaded, tokenizer, model, coll, seq_len, cluster)

    def reconnect(self) -> None:
        """Join the workers again after one was lost: say goodbye to the old session, connect, authenticate
        and stream every worker its slice anew. The KV cache is forgotten (the workers' went with them).
        With `--split auto` every node is measured again (shares are relative: all of them), and where that
        changes the plan the root loads its own new slice too. Raises DllamaError (naming the worker) if the
        cluster cannot be formed yet."""
        from dllama.net.root import connect_workers

        if self._cluster is None:
            return
        self.coll.close()
        self.slot_ids = [[] for _ in self.slot_ids]
        coll = connect_workers(**self._cluster)
        planner = self._cluster["plan"]
        if callable(planner):
            planner.current = coll.plan
        if self.model is None or coll.plan[0] != self.model.node:   # None: an earlier reload failed
            self._load_own(coll)
        self.coll = self.model.coll = coll

    def _load_own(self, coll) -> None:
        from dllama.model.llama import NodeModel

        node = coll.plan[0]
        self.model = None   # its buffers go before the new slice's are made
        model = NodeModel(self.spec, node, self.seq_len, MAX_BATCH, coll, len(self.slot_ids))
        _load_slice(model, self.loaded, self.spec, node)
        _release_pages(self.loaded)
        self.model = model

    # ---- generation ------------------------------------------------------------------------------

    def _forward(self, tokens: list[int], start: int, logits: tuple = FULL_LOGITS):
        # one sequence (slot 0) in the batched pass's buffers: a decode step allocates no arrays
        n = len(tokens)
        positions, ids = self._rows[1, :n], self._rows[2, :n]
        np.add(self._steps[:n], start, out=positions)
        ids[:] = tokens
        self.coll.step(n, positions, logits)
        return self.model.forward(ids, positions, logits=logits[0] != LOGITS_NONE)

    def best_slot(self, prompt_ids: list[int], free) -> int:
        """Of the slots `free`, the one whose cached tokens share the longest prefix with `prompt_ids`
        (a returning conversation finds its own cache again); ties go to the emptiest cache."""
        return max(free, key=lambda s: (_common_prefix(self.slot_ids[s], prompt_ids), -len(self.slot_ids[s])))

    def claim(self, slot: int, prompt_ids: list[int]) -> int:
        """Start `prompt_ids` in `slot`: keep the K/V of the prefix it shares with the slot's cache (not its
        last token, whose logits must be computed), give back the rest's memory on every node. Returns how
        many tokens are kept."""
        keep = min(_common_prefix(self.slot_ids[slot], prompt_ids), len(prompt_ids) - 1)
        self.release(slot, keep)
        return keep

    def release(self, slot: int, keep: int = 0) -> None:
        """Forget `slot`'s positions from `keep` on, and give back their memory on every node."""
        del self.slot_ids[slot][keep:]
        self.model.kv.release(slot, keep)
        self.coll.release(slot, keep)

    def forward_rows(self, parts, logits: tuple = FULL_LOGITS):
        """One forward pass over several slots' tokens: `parts` is [(slot, tokens, wants_logits)], each
        slot's tokens following its cache. Returns the logits (m, vocab) of the last token of each part
        that wants them, in order (m <= number of parts), or None when none does. `logits` is what every
        such row needs (dllama.model.collective), or a list of one a row; over a cluster the answer may then
        hold a row's top candidates in place of its logits (dllama.candidates)."""
        # rows needing logits go last: the pass computes the output layer for its last m rows only (the
        # order of rows inside a pass is free: every row's K/V is written before any attention reads)
        n, m = sum(len(p[1]) for p in parts), sum(1 for p in parts if p[2])
        if n > len(self._rows[0]):
            raise ValueError(f"a pass of {n} rows; at most {len(self._rows[0])}")
        slots, positions, tokens = (a[:n] for a in self._rows)
        head, tail = 0, n - m
        for s, toks, want in parts:
            start = len(self.slot_ids[s])
            for i, t in enumerate(toks):
                r = tail if want and i == len(toks) - 1 else head
                slots[r], positions[r], tokens[r] = s, start + i, t
                if r == tail:
                    tail += 1
                else:
                    head += 1
        what = (per_row(logits) if isinstance(logits, list) else logits) if m else NO_LOGITS
        self.coll.step(n, positions, what, slots, max(m, 1))
        out = self.model.forward(tokens, positions, logits=m > 0, slots=slots, out_rows=max(m, 1))
        if m == 0 and hasattr(self.coll, "end_pass"):
            self.coll.end_pass()
        for s, toks, _ in parts:
            self.slot_ids[s].extend(toks)
        if out is not None and m == 1 and getattr(out, "ndim", 2) == 1:
            out = out[None]
        elif out is not None and m == 1 and not isinstance(out, (list, np.ndarray)):
            out = [out]   # the one row's top candidates
        return out

    def embed(self, ids: list[int], slot: int = 0) -> np.ndarray:
        """The mean over `ids` of the final hidden state after the final norm (float64, the model's width),
        evaluated in `slot` from position 0, so that slot's cache then holds `ids`. On a cluster the root
        holds that state: nothing more crosses the network than for a prompt."""
        from dllama import kernels as K

        if not ids or len(ids) > self.seq_len:
            raise DllamaError(f"an input of {len(ids)} tokens; this context holds 1 to {self.seq_len}")
        m, total = self.model, np.zeros(self.spec.dim, np.float64)
        self.release(slot, 0)
        for i in range(0, len(ids), MAX_BATCH):
            chunk = ids[i:i + MAX_BATCH]
            self.forward_rows([(slot, chunk, False)], NO_LOGITS)
            n = len(chunk)
            K.rmsnorm(m.x[:n], m.norm, self.spec.norm_eps, m.xb[:n])
            total += m.xb[:n].sum(axis=0, dtype=np.float64)
        return total / len(ids)

    def cache_len(self, slot: int) -> int:
        return len(self.slot_ids[slot])

    def prefill(self, prompt_ids: list[int], logits: tuple = FULL_LOGITS):
        """Evaluate the prompt's tokens not already in the cache; return the logits of its last one (or what
        `logits` asks for: see dllama.model.collective)."""
        keep = _common_prefix(self.cache_ids, prompt_ids)
        keep = min(keep, len(prompt_ids) - 1)   # the last prompt token must run to give logits
        self.cache_ids = self.cache_ids[:keep]
        st = self.stats
        st.reused_tokens = keep
        todo = prompt_ids[keep:]
        st.prompt_tokens = len(todo)
        t0 = time.perf_counter()
        out = None
        for i in range(0, len(todo), MAX_BATCH):
            chunk = todo[i:i + MAX_BATCH]
            # only the last batch's output layer is read
            out = self._forward(chunk, keep + i, logits if i + MAX_BATCH >= len(todo) else NO_LOGITS)
            self.cache_ids.extend(chunk)
        st.prompt_s = time.perf_counter() - t0
        return out

    def generate(self, prompt_ids: list[int], max_tokens: int, sampler, stop_ids=None):
        """Yield up to `max_tokens` generated token ids after `prompt_ids`.

        Stops early at a token of `stop_ids` (default: the tokenizer's end tokens), which is yielded too,
        or when the context is full. Raises DllamaError if the prompt does not fit the context.
        """
        if not prompt_ids:
            raise DllamaError("the prompt is empty")
        if len(prompt_ids) >= self.seq_len:
            raise DllamaError(f"the prompt has {len(prompt_ids)} tokens, more than the context allows "
                              f"({self.seq_len} with the current --max-seq-len)")
        stops = set(self.tokenizer.eos_ids if stop_ids is None else stop_ids)
        self.stats = st = Stats()
        t_start = time.perf_counter()
        wants = wants_of(sampler)
        logits = self.prefill(prompt_ids, wants)
        c0 = (self.coll.transfer_s, self.coll.sent_bytes, self.coll.recv_bytes)
        # the workers' counters as of the prompt's last pass (which ends in logits, so with their TIMES)
        w0 = getattr(self.coll, "worker_ns", None)
        w0 = None if w0 is None else w0.astype(np.int64)
        t0 = time.perf_counter()
        try:
            for _ in range(max_tokens):
                tok = sampler(logits)
                st.generated += 1
                if st.generated == 1:
                    st.first_token_s = time.perf_counter() - t_start
                yield tok
                # the last token is not run through the model: nobody would read its logits (its K/V
                # join the cache when the next prompt, which starts with it, is evaluated)
                if tok in stops or st.generated == max_tokens or len(self.cache_ids) >= self.seq_len:
                    break
                t1 = time.perf_counter()
                logits = self._forward([tok], len(self.cache_ids), wants)
                self.cache_ids.append(tok)
                st.token_ms.append(1000 * (time.perf_counter() - t1))
        finally:
            st.gen_s = time.perf_counter() - t0
            st.transfer_s = self.coll.transfer_s - c0[0]
            st.sent_bytes = self.coll.sent_bytes - c0[1]
            st.recv_bytes = self.coll.recv_bytes - c0[2]
            if w0 is not None:   # every decode pass ends in logits: the last one's TIMES cover them all
                st.worker_ns = (self.coll.worker_ns.astype(np.int64) - w0).tolist()

    @property
    def context_left(self) -> int:
        return self.seq_len - len(self.cache_ids)

    def close(self) -> None:
        self.coll.close()
        self.loaded.close()
        thaw()


def _check_flags(nthreads, buffer_float_type, max_seq_len, parallel=1) -> None:
    if not 1 <= parallel <= MAX_BATCH:
        raise DllamaError(f"--parallel must be from 1 to {MAX_BATCH} (a forward pass carries a token of each "
                          f"slot), got {parallel}")
    if nthreads < 1:
        raise DllamaError(f"--nthreads must be at least 1, got {nthreads}")
    if buffer_float_type not in ("f32", "q80"):
        raise DllamaError(f"--buffer-float-type must be f32 or q80, got {buffer_float_type!r}")
    if max_seq_len is not None and max_seq_len < 1:
        raise DllamaError(f"--max-seq-len must be at least 1, got {max_seq_len}")


def _context_bytes(spec, node, seq_len: int, n_slots: int = 1) -> int:
    """Memory the context takes on `node` (see NodeModel): a K and V cache per layer for each of `n_slots`
    slots, and once for all of them the rope tables (float64 while they are computed) and one row of
    attention scores per head."""
    kv_dim, half = len(node.kv_heads) * spec.head_dim, spec.head_dim // 2
    per_slot = spec.n_layers * 2 * kv_dim * 4
    shared = half * (2 * 4 + 3 * 8) + len(node.heads) * 4
    return seq_len * (n_slots * per_slot + shared)


def _check_memory(spec, node, seq_len: int, n_slots: int = 1) -> None:
    """Refuse, before allocating anything, a context this machine cannot hold (a header's seq_len of
    2^31, or a long-context model run without --max-seq-len), for each of `n_slots` conversation slots.
    Raises DllamaError suggesting a limit."""
    from dllama.net.memory import available_bytes

    need, have = _context_bytes(spec, node, seq_len, n_slots), available_bytes()
    if have is None or need <= have:
        return
    # leave half for the weights
    fits = max(1, have // max(1, _context_bytes(spec, node, 1, n_slots))) // 2
    fits = fits // 1024 * 1024 or fits
    slots = f" in each of {n_slots} slots (--parallel)" if n_slots > 1 else ""
    raise DllamaError(f"a context of {seq_len} tokens{slots} needs {need / 2**30:.1f} GiB for its KV cache and "
                      f"scratch, this machine has {have / 2**30:.1f} GiB available: pass --max-seq-len {fits} "
                      f"or less")


def _release_pages(loaded) -> None:
    """Drop the file pages that packing touched from this process's resident set.

    The packed copies are what the kernels read; the map stays (the root reads embedding rows from it),
    and a page touched again is faulted back in from the page cache. Without this a 1 GB model costs
    2 GB of resident memory, as in the C++ reference.
    """
    import mmap

    owner = loaded._owner
    for attr in ("_mm", "_mmap", "data"):
        owner = getattr(owner, attr, owner) if not isinstance(owner, mmap.mmap) else owner
    if isinstance(owner, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        owner.madvise(mmap.MADV_DONTNEED)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _open_tokenizer(loaded, tokenizer_path: str | None):
    from dllama.tokenizer import Tokenizer

    if tokenizer_path:
        if not os.path.exists(tokenizer_path):
            raise DllamaError(f"tokenizer file not found: {tokenizer_path}")
        with open(tokenizer_path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        return Tokenizer.from_gguf(tokenizer_path) if is_gguf else Tokenizer.from_t(tokenizer_path)
    if loaded.kind == "gguf":
        return Tokenizer.from_gguf(loaded.gguf_reader)   # the header is parsed once
    raise DllamaError(f"{loaded.path} is a Distributed Llama .m file: pass its tokenizer with --tokenizer")


def _load_slice(model, loaded, spec, node, progress=None) -> None:
    from dllama.model.partition import layer_of, node_tensor_names, slice_nbytes, slice_tensor

    # reading the memory map happens here, as the pages are packed: one bar covers both
    bar = progress("root: reading and packing weights", slice_nbytes(loaded.tensors, spec, node)) if progress else None
    done_layer = None
    for name in node_tensor_names(spec, node):
        layer = layer_of(name)
        if layer != done_layer:
            # a layer is packed: let its file pages go, so the peak stays near one copy of the weights
            _release_pages(loaded)
            done_layer = layer
        part = slice_tensor(loaded.tensors[name], name, spec, node)
        if part is not None:
            model.load(name, *part)
            if bar:
                bar.update(part[2].nbytes)
    model.finish_loading()
    if bar:
        bar.finish()
