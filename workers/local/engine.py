"""Continuous batching for a local decoder (design: docs/local-serving.md).

One engine thread per model runs the graph; callers `submit` sequences from any thread and receive their
steps through callbacks. Every iteration the engine

1. drops sequences whose callers went away (their slot and keys/values are freed at once),
2. admits the next waiting sequence when a slot is free: the longest prefix of its prompt that the prefix
   cache holds is copied into its slot, and only the rest is prefilled,
3. prefills at most `prefill_chunk` prompt tokens (the rest of the prompt being admitted, then the next
   waiting ones while the budget lasts), so that a long prompt delays the others' next token by one chunk,
   not by its whole length,
4. runs one decode step for every running sequence together: one batch of the graph, each row at its own
   length (right-padded attention mask; GroupQueryAttention writes each row's keys and values in place).

Sequences leave the batch as soon as they finish; their keys and values go to the prefix cache. When the
queue of waiting sequences is full, `submit` raises `Overloaded` instead of letting latency grow.

Chunks never leave a single token for the last one: onnxruntime computes one-row matmuls with a different
kernel than many-row ones (results differ by ~3e-5), and a prompt is then computed the same way whether or
not part of it came from the cache (reuse gives bit-identical logits; tested).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from workers.local.decoding import SequenceDecoder, Step
from workers.local.kvpool import KVPool
from workers.local.prefix_cache import Block, PrefixCache
from workers.local.runtime import DecoderSession

log = logging.getLogger("frugal.local")


class Overloaded(Exception):
    """The engine's queue is full."""

    def __init__(self, waiting: int, retry_after_s: float) -> None:
        super().__init__(f"the local model is busy: {waiting} requests are waiting")
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class Sequence:
    """One generation as the engine sees it."""

    prompt: list[int]
    decoder: SequenceDecoder
    #: Called from the engine thread with each step, then once with None (finished) or the failure.
    on_step: Callable[[Step], None]
    on_done: Callable[[BaseException | None], None]
    #: Prefix-cache isolation: sequences with different salts never share keys and values.
    salt: str | None = None
    # -- engine state --
    slot: int = -1
    length: int = 0  # positions of `tokens` whose keys and values are in the slot
    tokens: list[int] = field(default_factory=list)
    next_token: int | None = None
    blocks: list[Block] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    submitted_at: float = 0.0


@dataclass
class EngineConfig:
    #: Sequences decoded together (and slots of keys and values).
    max_batch: int = 8
    #: Sequences allowed to wait for a slot before `submit` refuses with `Overloaded`.
    max_queue: int = 64
    #: Tokens prefilled per iteration (between two decode steps of the running sequences).
    prefill_chunk: int = 256
    #: Longest sequence (prompt + answer) a slot holds; at most the model's context.
    max_context: int = 4096
    #: Prefix cache budget; 0 turns the cache off.
    prefix_cache_bytes: int = 256 * 1024 * 1024
    prefix_block_tokens: int = 32
    #: Decode a lone sequence as a batch of two (a padding row), so that every decode step uses the same
    #: many-row kernels: a request's tokens are then bit-identical whatever else runs beside it. Costs
    #: single-stream decode speed (~1.5x slower, measured); off by default, as in vLLM.
    batch_invariant: bool = False
    #: Decode steps of at most this many sequences run the decode graph (two-pass int8 activations, where the
    #: build has one): faster for few rows, slower than float activations for more (docs/local-serving.md).
    decode_graph_max_batch: int = 4


class Engine:
    def __init__(self, session: DecoderSession, config: EngineConfig | None = None, name: str = "local") -> None:
        self.session = session
        self.config = config or EngineConfig()
        self.name = name
        self.capacity = min(self.config.max_context, session.info.context_length)
        self.pool = KVPool(session.info, self.config.max_batch + 1, self.capacity)  # + a padding row
        block_tokens = self.config.prefix_block_tokens
        self.cache = PrefixCache(block_tokens, self.pool.bytes_per_token * block_tokens,
                                 self.config.prefix_cache_bytes) if self.config.prefix_cache_bytes else None
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # running[i].slot == i
        self._prefilling: Sequence | None = None
        self._closing = False
        #: Counters since start (read by metrics from other threads).
        self.stats: Counter[str] = Counter()
        for key in ("prompt_tokens", "prefill_tokens", "cached_tokens", "generated_tokens", "decode_steps",
                    "decode_rows", "rejected", "finished_stop", "finished_length", "finished_cancelled",
                    "finished_error", "prefill_seconds", "decode_seconds"):
            self.stats[key] = 0  # every key exists from the start: readers copy the dict while it changes
        self._mean_seconds = 1.0  # moving average of a sequence's time in the engine, for Retry-After
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- callers' side (any thread) ----------------------------------------------------------------------
    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence; raises ValueError when it cannot fit a slot, `Overloaded` when the queue is full."""
        if not sequence.prompt:
            raise ValueError("the prompt is empty")
        if len(sequence.prompt) >= self.capacity:
            raise ValueError(f"the prompt has {len(sequence.prompt)} tokens; this model serves at most "
                             f"{self.capacity} (prompt and answer)")
        decoder = sequence.decoder
        decoder.max_tokens = min(decoder.max_tokens, self.capacity - len(sequence.prompt))
        decoder.state.prompt_tokens = len(sequence.prompt)
        with self._cond:
            if self._closing:
                raise RuntimeError(f"engine {self.name} is closed")
            free = self.config.max_batch - len(self._running) - (self._prefilling is not None)
            if len(self._waiting) >= max(0, free) + self.config.max_queue:
                self.stats["rejected"] += 1
                depth = len(self._waiting) / max(1, self.config.max_batch)
                raise Overloaded(len(self._waiting), max(1.0, self._mean_seconds * depth))
            sequence.submitted_at = time.perf_counter()
            self._waiting.append(sequence)
            self._cond.notify()

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence (its caller went away): at once if it is waiting, else before the next step."""
        with self._cond:
            sequence.cancelled = True
            if sequence in self._waiting:
                self._waiting.remove(sequence)
                sequence.decoder.cancel()
                self._finish(sequence, None)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is waiting or running (True), or `timeout` passes (False)."""
        with self._cond:
            return self._cond.wait_for(self._idle, timeout)

    def _idle(self) -> bool:
        return not (self._waiting or self._running or self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running) + (self._prefilling is not None)

    # -- the engine thread ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not (self._running or self._prefilling or self._admissible()):
                    self._cond.wait()
                if self._closing:
                    break
            try:
                self._drop_cancelled()
                self._prefill(self.config.prefill_chunk)
                if self._running:
                    self._decode_step()
            except Exception as exc:  # a failure of the runtime: fail what is in flight, keep serving
                log.exception("engine %s failed a step", self.name)
                for sequence in [*self._running, *([self._prefilling] if self._prefilling else [])]:
                    self._finish(sequence, exc)
                self._running, self._prefilling = [], None
            with self._cond:
                if self._idle():
                    self._cond.notify_all()  # wake `wait_idle`
        with self._cond:
            for sequence in [*self._running, *self._waiting, *([self._prefilling] if self._prefilling else [])]:
                sequence.decoder.cancel()
                self._finish(sequence, None)
            self._running, self._prefilling = [], None
            self._waiting.clear()

    def _admissible(self) -> bool:
        return bool(self._waiting) and len(self._running) + (self._prefilling is not None) < self.config.max_batch

    def _admit(self, sequence: Sequence) -> None:
        """Give the sequence a free slot, filled with the longest cached prefix of its prompt."""
        sequence.slot = len(self._running)
        sequence.tokens = list(sequence.prompt)
        if self.cache is not None:
            # Leave at least two tokens to compute, so the last chunk is never a single row (see above).
            usable = max(0, (len(sequence.prompt) - 2) // self.cache.block_tokens)
            blocks = self.cache.lookup(self.cache.keys(sequence.prompt, sequence.salt, usable))
            if blocks:
                self.pool.write(sequence.slot, 0, np.concatenate([b.data for b in blocks], axis=3))
            sequence.blocks = blocks
            sequence.length = len(blocks) * self.cache.block_tokens
            sequence.decoder.state.cached_tokens = sequence.length
            self.stats["cached_tokens"] += sequence.length
        self.stats["prompt_tokens"] += len(sequence.prompt)

    def _prefill(self, budget: int) -> None:
        """Prompt tokens for this iteration, up to `budget`: the rest of the prompt being prefilled, then, while
        the budget lasts, the next waiting prompts (so a burst of short prompts is admitted in few iterations)."""
        while budget > 0:
            if self._prefilling is None:
                with self._cond:
                    if not self._admissible():
                        return
                    self._prefilling = self._waiting.popleft()
                self._admit(self._prefilling)
            computed = self._prefill_chunk(self._prefilling, budget)
            if computed == 0:
                return
            budget -= computed

    def _prefill_chunk(self, sequence: Sequence, budget: int) -> int:
        """Prefill up to `budget` tokens of the sequence; how many were computed (a cancelled sequence leaves:
        1, so the caller moves on)."""
        if sequence.cancelled:
            self._prefilling = None
            self._leave(sequence)
            return 1
        remaining = len(sequence.prompt) - sequence.length
        count = min(budget, remaining)
        if remaining - count == 1:
            count -= 1  # never a last chunk of one row
        if count < 2 and remaining > 1:
            return 0  # nor a middle chunk of one row: wait for the next iteration's budget
        start = sequence.length
        ids = np.asarray(sequence.prompt[start:start + count], dtype=np.int64).reshape(1, -1)
        mask = np.ones((1, start + count), dtype=np.int64)
        started = time.perf_counter()
        logits, hidden = self.session.run(ids, mask, self.pool.single(sequence.slot), 1)
        self.stats["prefill_seconds"] += time.perf_counter() - started
        sequence.length += count
        self.stats["prefill_tokens"] += count
        if sequence.length < len(sequence.prompt):
            return count
        self._prefilling = None
        self._cache_blocks(sequence)
        if self._advance(sequence, self.session.rescore(logits[:, -1], hidden[:, -1])[0]):
            target = len(self._running)
            if sequence.slot != target:
                self.pool.move(sequence.slot, target, sequence.length)
                sequence.slot = target
            self._running.append(sequence)
        else:
            self._leave(sequence)
        return count

    def _decode_step(self) -> None:
        running = self._running
        lengths = [s.length for s in running]
        ids = [s.next_token for s in running]
        if self.config.batch_invariant and len(running) == 1:
            # The padding row runs in slot 1 and writes one garbage position there: the first position not
            # yet valid (a sequence being prefilled in that slot overwrites it with its next chunk).
            prefilling = self._prefilling
            lengths.append(prefilling.length if prefilling is not None and prefilling.slot == 1 else 0)
            ids.append(0)
        batch = np.array(lengths)
        mask = (np.arange(batch.max() + 1)[None, :] <= batch[:, None]).astype(np.int64)
        few = len(ids) <= self.config.decode_graph_max_batch and not self.config.batch_invariant
        started = time.perf_counter()
        logits, hidden = self.session.run(np.array(ids, dtype=np.int64).reshape(-1, 1), mask,
                                          self.pool.batch(len(ids)), 1, "decode" if few else "main")
        self.stats["decode_seconds"] += time.perf_counter() - started
        rows = self.session.rescore(logits[:len(running), -1], hidden[:len(running), -1])
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(running)
        finished = []
        for i, sequence in enumerate(running):
            sequence.tokens.append(sequence.next_token)
            sequence.length += 1
            if not self._advance(sequence, rows[i]):
                finished.append(sequence)
        for sequence in sorted(finished, key=lambda s: s.slot, reverse=True):
            self._remove(sequence)
            self._leave(sequence)

    def _advance(self, sequence: Sequence, logits: np.ndarray) -> bool:
        """Feed one row of logits to the sequence's decoder; False when the sequence is finished."""
        if sequence.cancelled:
            sequence.decoder.cancel()
            return False
        before = sequence.decoder.state.completion_tokens
        steps, token = sequence.decoder.feed(logits)
        self.stats["generated_tokens"] += sequence.decoder.state.completion_tokens - before
        for step in steps:
            sequence.on_step(step)
        sequence.next_token = token
        return token is not None

    def _drop_cancelled(self) -> None:
        gone = [s for s in self._running if s.cancelled]
        for sequence in sorted(gone, key=lambda s: s.slot, reverse=True):
            sequence.decoder.cancel()
            self._remove(sequence)
            self._leave(sequence)

    def _remove(self, sequence: Sequence) -> None:
        """Take a sequence out of the batch; the last one moves into its slot (slots stay 0 .. n-1)."""
        last = self._running.pop()
        if last is not sequence:
            self.pool.move(last.slot, sequence.slot, last.length)
            last.slot = sequence.slot
            self._running[sequence.slot] = last

    def _leave(self, sequence: Sequence) -> None:
        """A finished (or cancelled) sequence: its keys and values to the prefix cache, then done."""
        if sequence.decoder.state.finish_reason != "cancelled":
            self._cache_blocks(sequence)
        self._finish(sequence, None)

    def _cache_blocks(self, sequence: Sequence) -> None:
        """Put the sequence's full blocks that the cache lacks into it (read from the slot, before the slot
        is reused)."""
        cache = self.cache
        if cache is None:
            return
        size = cache.block_tokens
        full = sequence.length // size
        if full <= len(sequence.blocks):
            return
        keys = cache.keys(sequence.tokens, sequence.salt, full)
        for index in range(len(sequence.blocks), full):
            block = cache.insert(keys[index], self.pool.read(sequence.slot, index * size, (index + 1) * size))
            if block is None:
                break  # the budget is full of blocks in use
            sequence.blocks.append(block)

    def _finish(self, sequence: Sequence, error: BaseException | None) -> None:
        if sequence.done:
            return
        sequence.done = True
        if self.cache is not None and sequence.blocks:
            self.cache.release(sequence.blocks)
            sequence.blocks = []
        reason = sequence.decoder.state.finish_reason or ("error" if error else "cancelled")
        self.stats[f"finished_{reason}"] += 1
        if sequence.submitted_at:
            self._mean_seconds = 0.9 * self._mean_seconds + 0.1 * (time.perf_counter() - sequence.submitted_at)
        sequence.on_done(error)
