"""Continuous batching: one thread steps every active request of an engine together.

The scheduler knows nothing of CosyVoice 2: it drives :class:`Job` objects, each of which says
what rows its LM must take next, turns log-probabilities into its next token (with its own
sampler and random generator), and has output work (flow + vocoder chunks) that becomes due as
tokens accumulate. One loop iteration is:

1. drop jobs that were cancelled or abandoned (so a cancelled request leaves within one step);
2. run due output work, most urgent first: first chunks before all others, then the streams
   whose audio lead over real time is smallest. While some request still waits for its first
   audio, only urgent work runs (a stream with enough audio buffered can wait a step), so a
   newcomer's first chunk is not held behind long streams. The chosen jobs' output steps run
   as one batch when the engine gives a batch function (CosyVoice 2: one flow estimator call
   per Euler step for all of them). Due work waits up to ``GATHER_STEPS`` decode steps while
   another job's output falls due by then, so streams that started a few steps apart still
   share their flow runs;
3. feed prompt rows, oldest request first, in one packed call (:func:`.lm_batch.packed_forward`):
   at most ``prefill_chunk`` rows while a stream is playing, so that a long prompt delays it by
   one chunk per step rather than by the whole prompt; prompts that arrive together go in
   together;
4. one batched decode step (:mod:`.lm_batch`) for every request that takes a single row.

Every call into a job is guarded: an exception fails that job alone (its consumer gets the
error) and the others go on. What could make a batched decode step fail for one request (a
row of the wrong width, a sequence past the LM's positions) is checked per request before the
step, so the batch itself only fails on a bug, and then every job in it fails cleanly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tts_core.cosyvoice2.qwen2 import KVCache

from .lm_batch import BackboneLM

log = logging.getLogger(__name__)

# Prompt rows fed per step, all requests together. A prefill call reads every weight of the LM
# (about 0.7 GB for the full-size model's prefill copies), usually from memory, since the flow
# and the vocoder run in between: a 107-row prompt took 0.40 s as 64 + 43 rows, 0.16 s in one
# call. 256 rows (~0.35 s on 2 cores) is what a decoding stream waits at most per step.
DEFAULT_PREFILL_CHUNK = 256
# A stream with less audio than this ahead of real time gets its next chunk even while a
# newcomer waits for its first audio.
URGENT_LEAD_SECONDS = 0.6
# Due output work waits up to this many decode steps for other streams whose output falls due
# by then, so their flow chunks are solved together (streams that started a few steps apart
# would otherwise never be due in the same step): at most ~0.25 s of audio worth of tokens.
GATHER_STEPS = 6
# At most this many jobs' output steps in one round on a CPU: packing more wins little there
# (the flow's packed run is 1.37x faster than one stream at a time at 4 streams, 1.53x at 8,
# float32) while a round holds every stream's decoding and grows that many flow caches at once.
# On a GPU a round costs about its calls' launches whatever its width: there the engine lets
# every due stream in (``max_output_batch``).
MAX_OUTPUT_BATCH = 4


class Job(Protocol):
    """One request as the scheduler drives it. Methods are called from the scheduler thread."""

    def lm_inputs(self) -> torch.Tensor | None:
        """Rows [L, D] the LM must take next, or None when the job needs no LM step now."""
        ...

    def lm_cache(self) -> KVCache:
        """The KV cache the rows of :meth:`lm_inputs` extend."""
        ...

    def lm_accept(self, logp: torch.Tensor) -> None:
        """Log-probabilities [V] (float32) after the last row fed: sample, keep the token."""
        ...

    def output_due(self) -> bool:
        """Whether output work (a flow + vocoder chunk) can run now."""
        ...

    def tokens_to_output(self) -> int | None:
        """LM tokens still to decode before the next output is due (0: due now), or None when
        that does not depend on decode steps (prefill, no LM, finished)."""
        ...

    def output_rank(self, now: float) -> tuple[int, float]:
        """Smaller runs first: (0 for a first chunk else 1, audio lead over real time in s)."""
        ...

    def run_output(self) -> None:
        """Compute one chunk of output and hand it to the consumer."""
        ...

    def done(self) -> bool:
        """True once everything was delivered (the scheduler then drops the job)."""
        ...

    def stopped(self) -> bool:
        """True when the request was cancelled or its consumer went away."""
        ...

    def fail(self, error: BaseException) -> None:
        """Deliver ``error`` to the consumer; the job is dropped after this."""
        ...


OutputBatch = Callable[[list[Any]], list[BaseException | None]]


@dataclass
class _Entry:
    job: Job
    pending: torch.Tensor | None = None  # prefill rows not yet fed
    seq: int = 0


@dataclass
class SchedulerStats:
    """Counters for status pages and benchmarks (read without a lock: approximate)."""

    active: int = 0
    max_batch: int = 0
    steps: int = 0
    decoded_rows: int = 0  # sum of batch sizes over decode steps
    prefill_rows: int = 0
    prefill_calls: int = 0  # packed prefill calls; prefill_rows / prefill_calls: rows per call
    outputs: int = 0
    output_batches: int = 0  # output rounds; outputs / output_batches: jobs per round
    peak_output_batch: int = 0
    failed: int = 0
    peak_batch: int = 0
    lm_seconds: float = 0.0  # wall time in prefill and decode steps
    output_seconds: float = 0.0  # wall time in output work (flow + vocoder)

    @property
    def mean_batch(self) -> float:
        return self.decoded_rows / self.steps if self.steps else 0.0


class BatchScheduler:
    """Owns one compute thread that steps all submitted jobs together.

    ``max_batch`` bounds the jobs running at once; :meth:`submit` beyond it waits for a free
    place (the service's admission keeps callers below it, so that wait is short).
    """

    def __init__(self, lm: BackboneLM, max_batch: int,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, name: str = "batch-scheduler",
                 run_outputs: OutputBatch | None = None,
                 max_output_batch: int = MAX_OUTPUT_BATCH):
        """``run_outputs``: runs one output step of each of several jobs together, returning
        each job's error or None (CosyVoice 2 solves their flow chunks in one estimator call
        per step); without it each job's ``run_output`` runs in turn. ``max_output_batch``:
        the most jobs in one output round (see MAX_OUTPUT_BATCH)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if max_output_batch < 1:
            raise ValueError(f"max_output_batch must be >= 1, got {max_output_batch}")
        self.max_output_batch = max_output_batch
        self.lm = lm
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.run_outputs = run_outputs  # None: each job's output step alone (benchmarks)
        self.stats = SchedulerStats(max_batch=max_batch)
        self._lock = threading.Condition()
        self._inbox: list[Job] = []
        self._entries: list[_Entry] = []
        self._seq = 0
        self._held = 0  # steps the due output work has waited for others (GATHER_STEPS)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the batch scheduler is closed")
            while len(self._inbox) + self.stats.active >= self.max_batch and not self._closed:
                self._lock.wait(0.05)
                if job.stopped():
                    return
            self._inbox.append(job)
            self._lock.notify_all()

    def occupancy(self) -> int:
        """Jobs running or about to run."""
        with self._lock:
            return self.stats.active + len(self._inbox)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=5.0)

    # ------------------------------------------------------------------ loop

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._inbox and not self._has_work():
                    self._lock.wait(0.05)
                    self._drop_stopped()
                if self._closed:
                    for entry in self._entries:
                        self._fail(entry, RuntimeError("the engine is shutting down"))
                    return
                for job in self._inbox:
                    self._seq += 1
                    self._entries.append(_Entry(job, seq=self._seq))
                self._inbox.clear()
                self._drop_stopped()
                self.stats.active = len(self._entries)
                self._lock.notify_all()
            try:
                self._step()
            except Exception:  # a bug in the loop itself: log, never kill the thread
                log.exception("batch scheduler step failed")
                time.sleep(0.01)

    def _has_work(self) -> bool:
        return bool(self._entries)

    def _drop_stopped(self) -> None:
        keep = []
        for entry in self._entries:
            try:
                gone = entry.job.stopped() or entry.job.done()
            except Exception as error:
                self._fail(entry, error)
                continue
            if not gone:
                keep.append(entry)
        self._entries = keep
        self.stats.active = len(keep)

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        self.stats.failed += 1
        log.debug("job failed: %r", error)
        try:
            entry.job.fail(error)
        except Exception:
            log.exception("job.fail raised")
        if entry in self._entries:
            self._entries.remove(entry)

    def _guard(self, entry: _Entry, fn, *args) -> bool:  # noqa: ANN001 - any job method
        try:
            fn(*args)
            return True
        except Exception as error:
            self._fail(entry, error)
            return False

    def _step(self) -> None:
        entries = list(self._entries)
        if not entries:
            return
        self.stats.steps += 1
        started = time.perf_counter()
        self._outputs(entries)
        outputs_done = time.perf_counter()
        live = [e for e in entries if e in self._entries]
        self._prefill(live)
        self._decode([e for e in live if e in self._entries])
        self.stats.output_seconds += outputs_done - started
        self.stats.lm_seconds += time.perf_counter() - outputs_done
        with self._lock:
            self._drop_stopped()

    def _outputs(self, entries: Iterable[_Entry]) -> None:
        now = time.monotonic()
        due: list[tuple[tuple[int, float], int, _Entry]] = []
        waiting_first = False
        for entry in entries:
            try:
                if entry.job.stopped():
                    continue
                rank = entry.job.output_rank(now)
                waiting_first |= rank[0] == 0
                if entry.job.output_due():
                    due.append((rank, entry.seq, entry))
            except Exception as error:
                self._fail(entry, error)
        due.sort(key=lambda item: (item[0], item[1]))
        # While a newcomer waits for its first audio, streams with audio buffered wait a step.
        chosen = [entry for rank, _, entry in due
                  if not waiting_first or rank[0] == 0 or rank[1] < URGENT_LEAD_SECONDS]
        chosen = chosen[:self.max_output_batch]  # the most urgent; the rest go next step
        if not chosen:
            return
        if self.run_outputs is not None and self._held < GATHER_STEPS \
                and self._due_soon(entries, chosen, GATHER_STEPS - self._held):
            self._held += 1
            return
        self._held = 0
        self.stats.output_batches += 1
        self.stats.peak_output_batch = max(self.stats.peak_output_batch, len(chosen))
        if self.run_outputs is None:
            for entry in chosen:
                if self._guard(entry, entry.job.run_output):
                    self.stats.outputs += 1
            return
        try:
            errors = self.run_outputs([entry.job for entry in chosen])
        except Exception as error:  # a bug in the batch function: the jobs' states are unknown
            log.exception("output batch failed")
            errors = [error] * len(chosen)
        for entry, error in zip(chosen, errors, strict=True):
            if error is None:
                self.stats.outputs += 1
            else:
                self._fail(entry, error)

    def _due_soon(self, entries: Iterable[_Entry], chosen: list[_Entry], steps: int) -> bool:
        """Whether a job other than ``chosen`` will have output due within ``steps`` decode
        steps (so waiting lets its flow chunk join theirs)."""
        for entry in entries:
            if entry in chosen or entry not in self._entries:
                continue
            try:
                left = entry.job.tokens_to_output()
            except Exception as error:
                self._fail(entry, error)
                continue
            if left is not None and 0 < left <= steps:
                return True
        return False

    def _rows(self, entry: _Entry) -> torch.Tensor | None:
        if entry.pending is not None:
            return entry.pending
        rows = entry.job.lm_inputs()
        if rows is None:
            return None
        if rows.dim() != 2 or rows.shape[0] < 1:
            raise ValueError(f"lm_inputs must be rows [L, D], got {list(rows.shape)}")
        width = self.lm.backbone.config.hidden_size
        if rows.shape[1] != width:
            raise ValueError(f"lm_inputs rows are {rows.shape[1]} wide, the LM takes {width}")
        cache = entry.job.lm_cache()
        if len(cache) + rows.shape[0] > self.lm.max_positions:
            raise ValueError(f"the request needs more than the LM's {self.lm.max_positions} "
                             "positions")
        return rows

    def _prefill(self, entries: list[_Entry]) -> None:
        """Feed prompt rows, oldest request first, in one packed call: a prompt being fed in
        pieces finishes before the next one starts, and several prompts that arrived together
        go in at once (one read of the LM's weights). At most ``prefill_chunk`` rows while some
        stream is playing audio (a longer step could stall it); while none is, every waiting
        row at once, as splitting them would only delay everyone's first audio."""
        # (request, its rows not yet fed, the first of them fed now)
        pieces: list[tuple[_Entry, torch.Tensor, torch.Tensor]] = []
        budget = self.prefill_chunk if self._someone_listening(entries) else None
        for entry in sorted(entries, key=lambda e: e.seq):
            if budget == 0:
                break
            try:
                rows = self._rows(entry)
            except Exception as error:
                self._fail(entry, error)
                continue
            if rows is None or (rows.shape[0] == 1 and entry.pending is None):
                continue
            pieces.append((entry, rows, rows if budget is None else rows[:budget]))
            if budget is not None:
                budget -= pieces[-1][2].shape[0]
        if not pieces:
            return
        try:
            logps = self.lm.prefill([head for _, _, head in pieces],
                                    [entry.job.lm_cache() for entry, _, _ in pieces])
        except Exception as error:
            # Rows and lengths were checked per request, so this is a bug; the caches may hold
            # part of the call, so none of these requests can go on.
            log.exception("prefill failed")
            for entry, _, _ in pieces:
                self._fail(entry, error)
            return
        self.stats.prefill_calls += 1
        for (entry, rows, head), logp in zip(pieces, logps, strict=True):
            rest = rows[head.shape[0]:]
            entry.pending = rest if rest.shape[0] else None
            self.stats.prefill_rows += head.shape[0]
            if entry.pending is None:
                self._guard(entry, entry.job.lm_accept, logp)

    def _someone_listening(self, entries: list[_Entry]) -> bool:
        """Whether a stream has audio out (its listener would hear a long step as a stall)."""
        now = time.monotonic()
        for entry in entries:
            try:
                if entry.job.output_rank(now)[0] != 0:
                    return True
            except Exception as error:
                self._fail(entry, error)
        return False

    def _decode(self, entries: list[_Entry]) -> None:
        batch: list[tuple[_Entry, torch.Tensor]] = []
        for entry in entries:
            if entry.pending is not None:
                continue
            try:
                rows = self._rows(entry)
            except Exception as error:
                self._fail(entry, error)
                continue
            if rows is not None and rows.shape[0] == 1:
                batch.append((entry, rows[0]))
        if not batch:
            return
        self.stats.decoded_rows += len(batch)
        self.stats.peak_batch = max(self.stats.peak_batch, len(batch))
        try:
            logps = self.lm.decode(torch.stack([r for _, r in batch]),
                                   [e.job.lm_cache() for e, _ in batch])
        except Exception:
            # Rows and lengths were checked per request above, so this is a bug; the caches may
            # hold part of this step, so no job of the batch can go on.
            log.exception("batched decode failed")
            for entry, _ in batch:
                self._fail(entry, RuntimeError("the batched LM step failed"))
            return
        for (entry, _), logp in zip(batch, logps, strict=True):
            self._guard(entry, entry.job.lm_accept, logp)
