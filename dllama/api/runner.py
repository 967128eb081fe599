"""One engine, one thread, a bounded queue: how HTTP requests share a model that is not re-entrant.

The event loop never runs the model. A route builds a `Job` (prompt token ids, limits, sampler) and
`submit`s it; the engine thread takes jobs in arrival order, turning token ids into text (streaming UTF-8
decoding, stop strings held back until they can be ruled out) and posting `Delta` / `Done` / `Failed`
events to the job's asyncio queue. With one conversation slot it runs each job to its end; with
--parallel N it runs up to N at once, every forward pass carrying a token of each (dllama.batcher), and a
queued job takes a slot as soon as one frees. A job whose client went away is cancelled: the thread checks
the flag after every token and frees its slot, so the next job starts at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

from dllama.api import metrics
from dllama.api.errors import ApiError
from dllama.errors import DllamaError
from dllama.net.protocol import ProtocolError
from dllama.net.transport import ConnectionLost

log = logging.getLogger("dllama.api")

RETRY_AFTER_S = 2   # what a 503 suggests; a short reply takes about that long on a small model
_HEAL = object()    # queued by wake(): a worker was lost while the engine was idle


@dataclass
class Delta:
    text: str
    logprobs: list | None = None   # the tokens' records (dllama.api.sampling) when logprobs were asked for


@dataclass
class Done:
    finish_reason: str          # "stop" (end of turn or a stop string) or "length" (max_tokens or context)
    prompt_tokens: int
    completion_tokens: int      # every token the model produced, the end-of-turn token included
    timings: dict | None = None  # this request's queue wait, time to first token, tokens/s (usage.timings)


@dataclass
class Failed:
    message: str
    status: int = 503           # 503: the engine or cluster failed; 500: a bug (logged on the server)


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampler: object
    stop_strings: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def delta(self, text: str) -> None:
        """Post `text` with the log-probabilities of the tokens since the last one (if asked for)."""
        take = getattr(self.sampler, "take", None)
        records = take() if take else None
        if text or records:
            self.post(Delta(text, records))

    def post(self, event) -> None:
        """Called from the engine thread: hand an event to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:      # the loop is closed: the server is shutting down
            self.cancel()


@dataclass
class EmbedJob(Job):
    """/v1/embeddings: the token ids of each input, evaluated in turn (no sampling, no reply)."""

    inputs: list = field(default_factory=list)


@dataclass
class Embedded:
    vectors: list              # one float64 array per input (Engine.embed)


class TextStream:
    """Token ids in, the reply's text out: partial UTF-8 is held until complete, stop strings never leak."""

    def __init__(self, tokenizer, stop_strings: list[str], eos_ids):
        from dllama.chat import StopDetector
        from dllama.tokenizer import StreamDecoder

        self._decoder = StreamDecoder(tokenizer)
        self._stops = StopDetector(stop_strings, eos_ids)

    def feed(self, token_id: int) -> tuple[str, bool]:
        """The text that is now safe to show, and whether the reply has ended."""
        piece = self._stops.feed(self._decoder.feed(token_id), token_id)
        return piece, self._stops.stopped

    def flush(self) -> str:
        """At the end without a stop: whatever was held back (a partial stop string, partial UTF-8)."""
        return self._stops.feed(self._decoder.flush()) + self._stops.flush()


class EngineRunner:
    """Owns the engine thread. `submit` is called on the event loop; everything else runs on the thread."""

    def __init__(self, engine, queue_size: int, cluster=None):
        self.engine = engine
        self.cluster = cluster            # healing.Cluster when the model is split over workers
        self._stopping = threading.Event()
        self.capacity = queue_size
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self._current: Job | None = None
        self._closing = False
        self.served = self.cancelled = 0
        self.slots_total = getattr(engine, "n_slots", 1)
        self._batcher = None
        self.last_batch = 0               # rows of the latest forward pass (batched serving)
        serve = self._serve_batched if self.slots_total > 1 else self._serve
        self._thread = threading.Thread(target=serve, name="dllama-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        return self.slots_in_use > 0

    @property
    def slots_in_use(self) -> int:
        b = self._batcher
        return len(b.running) if b is not None else int(self._current is not None)

    def submit(self, job: Job) -> None:
        """Queue a job; raises ApiError 503 (with Retry-After) when the queue is full or closing."""
        if self._closing:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy: {self.capacity} requests are already waiting; retry later",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def wake(self) -> None:
        """Have the engine thread heal the cluster as soon as it is free (any thread; never blocks)."""
        try:
            self._jobs.put_nowait(_HEAL)
        except queue.Full:   # busy: the next job finds the broken collective and heals after it
            pass

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the running and waiting jobs and end the thread."""
        self.cancel_all()
        self._stopping.set()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def cancel_all(self) -> None:
        """Refuse new jobs and end the current and waiting ones (their clients get an error). Never blocks."""
        self._closing = True
        if self._current is not None:
            self._current.cancel()
        b = self._batcher
        for seq in list(b.running) if b is not None else ():
            seq.tag.cancel()
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None and job is not _HEAL:
                job.cancel()
                job.post(Failed("the server is shutting down"))

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job is _HEAL:
                self._heal()
                continue
            if job.cancelled.is_set():   # its client left while it waited
                self.cancelled += 1
                continue
            self._current = job
            try:
                finished = self._embed(job, 0) if isinstance(job, EmbedJob) else self._run(job)
            except (ConnectionLost, ProtocolError) as exc:
                if self.cluster is None:
                    job.post(Failed(str(exc)))
                    continue
                job.post(Failed(f"the cluster lost a node: {exc}; the server is reconnecting (see /health)"))
                self.cluster.lost(exc)
                self._current = None
                self._heal()
                continue
            except DllamaError as exc:
                job.post(Failed(str(exc)))
                continue
            except Exception:  # noqa: BLE001 - the thread must survive anything one request does
                log.exception("generation failed")
                job.post(Failed("internal error during generation (see the server's log)", 500))
                continue
            finally:
                self._current = None
            if finished:
                self.served += 1
            else:
                self.cancelled += 1
                job.post(Failed("the request was cancelled (client gone or server shutting down)"))

    def _heal(self) -> None:
        if self.cluster is not None and self.cluster.broken:
            self.cluster.heal(self.engine, self._stopping)

    def _run(self, job: Job) -> bool:
        """Generate one reply; False if the job was cancelled midway."""
        tokenizer = self.engine.tokenizer
        text = TextStream(tokenizer, job.stop_strings, tokenizer.eos_ids)
        before = self.engine.stats
        gen = self.engine.generate(job.prompt_ids, job.max_tokens, job.sampler)
        n, finish = 0, "length"   # the generator ends by itself only at max_tokens or a full context
        try:
            for token_id in gen:
                n += 1
                piece, ended = text.feed(token_id)
                if piece:
                    job.delta(piece)
                if ended:
                    finish = "stop"
                    break
                if job.cancelled.is_set():
                    return False
                if n == job.max_tokens:
                    break   # resuming the generator would run a forward pass whose token nobody wants
        finally:
            gen.close()   # frees the engine now, not when the generator is garbage-collected
            if self.engine.stats is not before:   # the same object: generate() refused before it started
                metrics.observe_generation(self.engine.stats)
        if finish == "length":
            job.delta(text.flush())
        st = self.engine.stats
        timings = st.summary() if hasattr(st, "token_ms") else None
        job.post(Done(finish, len(job.prompt_ids), n, timings and {
            "prompt_tokens_evaluated": timings["prompt_tokens"], "reused_tokens": timings["reused_tokens"],
            "time_to_first_token_s": round(timings["time_to_first_token_s"], 6),
            "generation_tokens_per_s": round(timings["generation_tokens_per_s"], 3)}))
        return True

    def _embed(self, job: EmbedJob, slot: int) -> bool:
        vectors = []
        for ids in job.inputs:
            if job.cancelled.is_set():
                return False
            vectors.append(self.engine.embed(ids, slot))
        job.post(Embedded(vectors))
        return True

    # ---- several conversations at once -------------------------------------------------------------

    def _serve_batched(self) -> None:
        from dllama.batcher import Batcher

        self._batcher = b = Batcher(self.engine)
        self._streams: dict = {}
        while True:
            if not self._admit(b):
                for seq in list(b.running):
                    self._drop(b, seq, "the server is shutting down")
                return
            for seq in list(b.running):
                if seq.tag.cancelled.is_set():
                    self._drop(b, seq, "the request was cancelled (client gone or server shutting down)")
            if not b.running:
                continue
            try:
                events = b.step()
            except Exception as exc:  # noqa: BLE001 - the thread must survive anything one pass does
                self._pass_failed(b, exc)
                continue
            self.last_batch = b.last_rows
            for seq, tok in events:
                self._deliver(b, seq, tok)

    def _admit(self, b) -> bool:
        """Queued jobs into free slots (waiting for one only while nothing runs); False when stopping."""
        from dllama.batcher import Sequence

        while b.has_room:
            try:
                job = self._jobs.get(block=not b.running)
            except queue.Empty:
                return True
            if job is None:
                return False
            if job is _HEAL:
                if not b.running:
                    self._heal()
                continue
            if job.cancelled.is_set():   # its client left while it waited
                self.cancelled += 1
                continue
            if isinstance(job, EmbedJob):
                self._embed_between_passes(b, job)
                continue
            tokenizer = self.engine.tokenizer
            seq = Sequence(job.prompt_ids, job.max_tokens, job.sampler, tokenizer.eos_ids, tag=job)
            try:
                b.admit(seq)
            except DllamaError as exc:
                job.post(Failed(str(exc)))
                continue
            self._streams[seq] = TextStream(tokenizer, job.stop_strings, tokenizer.eos_ids)
            log.info("slot %d: %d prompt tokens (%d from its cache), %d slots in use, %d waiting", seq.slot,
                     len(seq.prompt_ids), seq.reused, len(b.running), self.waiting)
        return True

    def _embed_between_passes(self, b, job: EmbedJob) -> None:
        """An embedding runs in a free slot between two passes (the running replies wait for it), the one
        with the shortest cache (the others keep their conversations for returning chats), and gives the
        slot's memory back."""
        slot = min(b.free, key=self.engine.cache_len)
        try:
            done = self._embed(job, slot)
            self.engine.release(slot)
        except DllamaError as exc:
            job.post(Failed(str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - as a failed pass: the running replies get the error too
            job.post(Failed("the embedding failed (see the server's log)"))
            self._pass_failed(b, exc)
            return
        if done:
            self.served += 1
        else:
            self.cancelled += 1

    def _deliver(self, b, seq, tok: int) -> None:
        job, text = seq.tag, self._streams[seq]
        piece, ended = text.feed(tok)
        if piece:
            job.delta(piece)
        if ended and seq.finish is None:   # a stop string: the model itself would go on
            b.end(seq, "stop")
        if seq.finish is None:
            return
        if seq.finish == "length":
            job.delta(text.flush())
        del self._streams[seq]
        self.served += 1
        metrics.observe_sequence(seq)
        t = seq.timings()
        log.info("slot %d done (%s): %d tokens, first after %.2f s, %.1f tok/s; %.1f rows per pass so far, "
                 "%d slots in use, %d waiting", seq.slot, seq.finish, seq.generated, t["time_to_first_token_s"],
                 t["generation_tokens_per_s"], b.rows / max(b.passes, 1), len(b.running), self.waiting)
        job.post(Done(seq.finish, len(seq.prompt_ids), seq.generated, seq.timings()))

    def _drop(self, b, seq, reason: str) -> None:
        b.cancel(seq)
        self._streams.pop(seq, None)
        self.cancelled += 1
        seq.tag.post(Failed(reason))

    def _pass_failed(self, b, exc: Exception) -> None:
        """A forward pass failed: every running job gets the error; a lost worker is reconnected."""
        lost = isinstance(exc, (ConnectionLost, ProtocolError))
        if lost and self.cluster is not None:
            msg = f"the cluster lost a node: {exc}; the server is reconnecting (see /health)"
        elif isinstance(exc, DllamaError) or lost:
            msg = str(exc)
        else:
            log.error("generation failed", exc_info=exc)
            msg = "internal error during generation (see the server's log)"
        for seq in list(b.running):
            b.end(seq, None)
            self._streams.pop(seq, None)
            seq.tag.post(Failed(msg, 503 if isinstance(exc, DllamaError) or lost else 500))
        if lost and self.cluster is not None:
            self.cluster.lost(exc)
            self._heal()
