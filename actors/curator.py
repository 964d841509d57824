"""The Curator actor of one job: drives shard reads for each epoch and answers batch requests.

Reads run ahead, up to `prefetch` at a time, but their results are handed to the curator in the
epoch's shard order, whichever finishes first: with the seed, that order fixes the batches.
Batches are chosen when a rank's request window wants them; in snapshot mode one chooser task per
epoch asks the scorer for learner losses of each super-batch just before choosing from it.

An async actor: many trainer requests wait on one event loop while reads are in flight, and
nothing here blocks that loop (object refs are awaited, never fetched with ray.get).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import re
import time

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from actors.routing import learner_scorer, shard_reader
from actors.runtime import ProcessInfo
from loader.curator import Curator, CuratorSettings, JobSpec, Lookup, Materialize, Pending, Ready
from loader.job.ledger import NO_SNAPSHOT
from loader.reader import ReadResult
from loader.registry import OK
from loader.shard_cache import ShardCache
from loader.sources.pipe import is_pipe
from loader.sources.remote import is_remote
from loader.sources.schema import mismatch_reason
from loader.state_store import StateStore, job_folder

log = logging.getLogger("loader.curator")

READ_ATTEMPTS = 3
# Reads run `prefetch` ahead; readers are asked whether they cache the next shards unchanged this
# many times as far ahead, in one call each.
CACHED_WINDOW = 4


# Ray restarts a dead curator and retries the calls that were in flight (all of them are safe to
# repeat); the new one rebuilds itself from state_dir.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class CuratorActor(ProcessInfo):
    def __init__(
        self, spec: JobSpec, settings: CuratorSettings, registry, readers: list, scorers: list, prefetch: int,
        state_dir: str, budget=None,
    ) -> None:  # fmt: skip
        self._registry, self._readers, self._scorers, self._prefetch = registry, readers, scorers, prefetch
        self._store, self._folder = StateStore(state_dir), job_folder(spec.job)
        self._core = Curator(spec, settings, journal=self._journal)
        self._restore()
        # What the pool budget pruned before this curator started: fetched (awaited) before the
        # first epoch starts, since nothing is chosen before that.
        self._budget = budget
        self._checkpointed = time.monotonic()
        self._checkpointing: asyncio.Task | None = None
        self._learner_scorer = learner_scorer(scorers, spec.job) if scorers else None
        self._feeders: dict[int, asyncio.Task] = {}
        self._choosers: dict[int, asyncio.Task] = {}
        # Epochs started before any rank asked for them (`_start_next_early`) -> the shards they
        # read, (index, URI) in registry order, or None until known; `_claim` decides on them.
        self._early: dict[int, list[tuple[int, str]] | None] = {}
        self._claims: dict[int, asyncio.Task] = {}
        self._read_early: dict[int, list[tuple[int, str]]] = {}  # (index, URI) of shards they read
        self._changed: asyncio.Condition | None = None
        # Stream jobs: how many times shards were added to the pool (the pass in progress takes
        # them in when this moves).
        self._arrivals = 0
        # Shard index -> URI of the shards read, named in batch plans (the gateway reads by them).
        self._uris: dict[int, str] = {}
        # Shard index -> rows the registry holds for it as read: reading such a shard again (each
        # epoch) needs no registry call, which was an awaited round trip per read and, under
        # `loss` with keep_ratio 0.2, a tenth of the service's CPU per batch.
        self._recorded: dict[int, int] = {}
        # Shard index -> the file's identity when the curator last took its rows (`_read`).
        self._identities: dict[int, tuple | None] = {}

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def _notify(self) -> None:
        async with self._condition():
            self._condition().notify_all()

    async def next_batch(self, rank: int, epoch: int, seq: int, acked: int = -1) -> Lookup:
        """Waits until this rank's batch `seq` of `epoch` exists or the epoch has ended. `acked`
        carries the rank's newest acknowledgement of `epoch`, saving the gateway an `ack` call."""
        if acked >= 0:
            self._core.ack(rank, epoch, acked)
        if epoch in self._early or epoch in self._claims:
            if epoch not in self._claims:  # the first request of an epoch started early
                self._claims[epoch] = asyncio.get_running_loop().create_task(self._claim(epoch))
            await self._claims[epoch]
        feeder = self._feeders.get(epoch)
        if feeder is None:
            feeder = self._start_feeding(epoch)
        if self._core.needs_snapshot and epoch not in self._choosers:
            # Only once the epoch is asked for: its batches are chosen with the losses of then.
            self._choosers[epoch] = asyncio.get_running_loop().create_task(self._choose(epoch))
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: epoch in self._core.epochs or feeder.done())
            while True:
                before = self._core.progress(epoch)
                result = self._core.lookup(rank, epoch, seq)
                if self._core.progress(epoch) != before:
                    # Reading or choosing may wait for this request (waking them on no change
                    # would have waiters wake each other in a loop).
                    cond.notify_all()
                if not isinstance(result, Pending):
                    break
                await cond.wait()
        return await self._handed_out(result, rank, epoch, seq)

    def _start_feeding(self, epoch: int, early: bool = False) -> asyncio.Task:
        if early:
            self._early[epoch] = None  # the shard list it reads, once it has it
        task = self._feeders[epoch] = asyncio.get_running_loop().create_task(self._feed(epoch, early))
        return task

    def _start_next_early(self, epoch: int) -> None:
        """Starts reading the epoch after `epoch` once `epoch`'s reading is done and a rank has
        asked for it: the next epoch's first batch is then ready when it is asked for, where
        filling its shuffle buffer took most of a short curated epoch's first batch (77 of
        165 ms). Reading stops at `ready_batches` super-batches as always; nothing is chosen and
        no older epoch is forgotten until a rank asks (`_claim`)."""
        core, after = self._core, epoch + 1
        if core.spec.stream or epoch in self._early or not core.reading_finished(epoch):
            return
        if (core.spec.total_epochs and after >= core.spec.total_epochs) or after in self._feeders or after in core.epochs:
            return
        self._start_feeding(after, early=True)

    async def _claim(self, epoch: int) -> None:
        """The first request of an epoch started early: keeps what it read if the pool's shards
        are those it started with, else starts it again, as it would have started now."""
        feeder, cond = self._feeders[epoch], self._condition()
        async with cond:
            await cond.wait_for(lambda: self._early[epoch] is not None or feeder.done())
        now = [(s.index, s.uri) for s in await self._registry.readable.remote()]
        run = self._core.epochs.get(epoch)
        read_early = self._read_early.pop(epoch, [])
        kept = self._early.pop(epoch) == now and run is not None and not run.ledger.error and not feeder.cancelled()
        kept = kept and not any(self._rewritten(index, uri) for index, uri in read_early)
        if kept:
            self._core.claim_epoch(epoch)
            self._forget_journals()
            self._start_next_early(epoch)
            return
        feeder.cancel()
        self._core.epochs.pop(epoch, None)
        self._start_feeding(epoch)

    def _rewritten(self, index: int, uri: str) -> bool:
        """Whether a local shard file changed since this curator took its rows. Remote and pipe:
        shards are taken as immutable, as the readers' caches take them."""
        if is_remote(uri) or is_pipe(uri):
            return False
        return ShardCache.identity(uri, index) != self._identities.get(index)

    async def next_batches(self, rank: int, epoch: int, seq: int, count: int, acked: int = -1) -> list[Lookup]:
        """Batch `seq` as `next_batch` gives it, then those after it, up to `count` in all, as far
        as they are ready now (the list ends at the first that is not): one actor call for the
        batches a trainer's credits allow, since a call costs more than choosing a small batch."""
        first = await self.next_batch(rank, epoch, seq, acked)
        out = [first]
        if not isinstance(first, Ready):
            return out
        before = self._core.progress(epoch)
        for later in range(seq + 1, seq + count):
            result = self._core.lookup(rank, epoch, later)
            if not isinstance(result, (Ready, Materialize)):
                break
            out.append(await self._handed_out(result, rank, epoch, later))
        if self._core.progress(epoch) != before:
            await self._notify()  # reading may go on for the batches just asked for
        return out

    async def _handed_out(self, result: Lookup, rank: int, epoch: int, seq: int) -> Lookup:
        """A lookup as the gateway gets it: a batch as a plan that names its shards' URIs."""
        if isinstance(result, Materialize):
            result = Ready(result.seq, len(result.ids), self._core.plan(result))
        if isinstance(result, Ready):
            result = Ready(result.seq, result.rows, result.payload.with_uris(await self._uris_of(result.payload)))
            self._core.served(result.rows, epoch, seq * self._core.spec.world_size + rank)
        return result

    def ack(self, rank: int, epoch: int, seq: int) -> None:
        self._core.ack(rank, epoch, seq)

    def prune(self, ids: np.ndarray) -> None:
        """The pool budget pruned `ids`: never served from now on."""
        self._core.prune(ids)

    def reference_replaced(self) -> None:
        """The service has a new reference: each shard takes its new reference losses when next
        read (until then its old ones serve)."""
        self._core.pool.reference_replaced()

    async def shards_added(self) -> None:
        """The pool has new shards: a stream job's pass in progress reads them next."""
        self._arrivals += 1
        await self._notify()

    async def feedback(self, ids: np.ndarray, losses: np.ndarray) -> str:
        reason = self._core.feedback(ids, losses)
        self._checkpoint_if_due()
        return reason

    def stats(self) -> dict:
        return self._core.stats()

    def snapshot_pushed(self, step: int) -> None:
        """A trainer pushed learner weights of `step`: the clock of snapshot staleness."""
        self._core.snapshot_pushed(step)

    def reference_loss(self, ids: np.ndarray) -> np.ndarray:
        """The reference loss this job's selection uses for each sample id (NaN: not scored yet),
        for analysis tools and tests."""
        return self._core.pool.reference_loss(np.asarray(ids, np.int64))

    def cluster_of(self, ids: np.ndarray) -> np.ndarray:
        self._core.pool.check_ids(ids)  # an unknown id is named, not a KeyError
        return self._core.pool.cluster_of(ids)

    # -- state_dir -------------------------------------------------------------------------------

    def _journal(self, epoch: int, considered: np.ndarray, kept: np.ndarray, weights: np.ndarray) -> None:
        self._store.append_batch(f"{self._folder}/epoch-{epoch}.log", considered, kept, weights)

    def _restore(self) -> None:
        state = self._store.load_arrays(f"{self._folder}/soft.npz")
        if state is not None:
            self._core.restore_state(state)
        for name in self._store.list(self._folder, r"epoch-\d+\.log"):
            epoch = int(re.search(r"(\d+)\.log$", name).group(1))
            self._core.restore_epoch(epoch, self._store.read_batches(name))
        if state is not None or self._core.epochs:
            # Trainers may report losses of batches served before the restart, from shards this
            # curator has not read again yet: the pool must know their sizes (the registry does).
            for record in ray.get(self._registry.records.remote()):
                if record.rows:
                    self._core.pool.ensure_shard(record.index, record.rows)
            log.info("job %s restored: epochs %s", self._core.spec.job, sorted(self._core.epochs))

    def _forget_journals(self) -> None:
        for name in self._store.list(self._folder, r"epoch-\d+\.log"):
            if int(re.search(r"(\d+)\.log$", name).group(1)) not in self._core.epochs:
                self._store.remove(name)

    async def checkpoint(self) -> None:
        """Writes what selection has learned, after any periodic write still in progress."""
        if self._checkpointing is not None and not self._checkpointing.done():
            await self._checkpointing
        await self._write_checkpoint()

    async def _write_checkpoint(self) -> None:
        state = self._core.get_state()
        self._checkpointed = time.monotonic()
        # The file write runs off the event loop; `state` is a copy, so selection may go on.
        await asyncio.to_thread(self._store.save_arrays, f"{self._folder}/soft.npz", state)
        await asyncio.to_thread(self._store.sync)  # journals: what a node crash could still lose

    def _checkpoint_if_due(self) -> None:
        busy = self._checkpointing is not None and not self._checkpointing.done()
        if not busy and time.monotonic() - self._checkpointed >= self._core.settings.checkpoint_s:
            self._checkpointing = asyncio.get_running_loop().create_task(self._write_checkpoint())

    # -- reading ---------------------------------------------------------------------------------

    def _again(self, index: int) -> bool:
        """Whether the curator holds what it needs of the shard if its file is unchanged: the rows'
        ids and, where the policy needs them, the reference scores."""
        core = self._core
        return core.holds_rows(index) and not (core.needs_scores and not core.pool.has_scores(index))

    async def _cached_ahead(self, shards: list) -> tuple[set[int], set[int]]:
        """Which of `shards` (the next ones to read) were asked about, and which of those their
        readers cache unchanged (`ShardReaderActor.cached_unchanged`): those are read without a
        call each. Asked a window at a time, as reads run ahead, so that a shard evicted meanwhile
        is read (and so cached for the gateway) again; `_read` looks at a local file once more
        when its turn comes."""
        asks: dict[int, tuple] = {}  # by reader: the reader and what to ask it
        for shard in shards:
            known = self._identities.get(shard.index)
            if known is not None and self._again(shard.index):
                reader = shard_reader(self._readers, shard.index)
                asks.setdefault(id(reader), (reader, []))[1].append((shard.uri, shard.index, known))
        cached: set[int] = set()
        for answer in await asyncio.gather(
            *(reader.cached_unchanged.remote(items) for reader, items in asks.values()), return_exceptions=True
        ):
            if isinstance(answer, (RayActorError, ObjectLostError)):
                continue  # its shards are read one by one, which retries
            if isinstance(answer, BaseException):
                raise answer
            cached.update(answer)
        return {shard.index for shard in shards}, cached

    async def _read(self, uri: str, index: int, cached: bool = False) -> tuple[ReadResult, tuple | None]:
        """Reads a shard and, when the policy needs them and the pool lacks them, its reference
        scores. The reader hands out a reference to the decoded shard in the object store (put
        there once while the reader caches it); the scorer gets that reference, not a copy.
        A result without table or error: the file is unchanged since the curator last took its
        rows, which it holds (`Curator.add_again`); `cached`: its reader said so already."""
        # Only the reader can tell the file's identity: remote shards are known by their copy in
        # the reader's read cache. Scores still wanted need the table.
        again = self._again(index)
        # Asked a while ago (reads wait for the epoch to want more): a local file is looked at
        # again, as a read would.
        if cached and again and not self._rewritten(index, uri):
            return ReadResult(index, uri), None
        known = self._identities.get(index) if again else None
        # A reader that dies mid-read is restarted by Ray; the shard goes to the next reader. The
        # objects a reader owns die with it: a shard lost so is read again the same way.
        for attempt in range(READ_ATTEMPTS):
            try:
                shard = await shard_reader(self._readers, index, attempt).read.remote(uri, index, known)
                if shard.error:
                    return ReadResult(index, uri, error=shard.error), None
                if shard.unchanged:
                    return ReadResult(index, uri), None
                self._identities[index] = shard.identity
                result = await shard.ref  # zero-copy from the object store on this node
                scores = None
                if self._core.schema is not None:
                    # Before scoring: the reference model would fail on a shard without its columns.
                    problem = mismatch_reason(result.table.schema, self._core.schema)
                    if problem:
                        return ReadResult(index, uri, error=problem), None
                if self._core.needs_scores and not self._core.pool.has_scores(index, result.table.num_rows):
                    try:
                        scores = await self._scorers[index % len(self._scorers)].score.remote(shard.ref)
                    except RayTaskError as exc:
                        if not isinstance(exc.cause, ObjectLostError):  # the rows do not fit the model
                            return ReadResult(index, uri, error=f"reference scoring failed: {exc.cause!r}"), None
                        log.warning("the shard %s was lost before it was scored (%r); retrying", uri, exc.cause)
                        continue
                return result, scores
            except (RayActorError, ObjectLostError) as exc:
                log.warning("an actor died while reading or scoring %s (%s); retrying", uri, exc)
        return ReadResult(index, uri, error=f"actors died {READ_ATTEMPTS} times reading it"), None

    async def _feed(self, epoch: int, early: bool = False) -> None:
        try:
            if self._budget is not None:
                self._core.prune(await self._budget.pruned.remote())
                self._budget = None  # later prunings arrive by `prune`
            arrivals = self._arrivals
            shards = await self._registry.readable.remote()
            self._recorded = {s.index: s.rows for s in shards if s.state == OK}
            queue = collections.deque(self._core.start_epoch(epoch, shards, early=early))
            if early:
                self._early[epoch] = [(s.index, s.uri) for s in shards]
            in_pass = {s.index for s in shards}
            self._forget_journals()
            await self._notify()
            # The pool's schema is its first readable shard's in registration order, whatever order
            # the epoch reads in: were an odd shard read first, every good one would be quarantined.
            while queue and self._core.schema is None:
                first = min(queue, key=lambda s: s.index)
                queue.remove(first)
                await self._accept(epoch, *await self._read(first.uri, first.index))
                await self._notify()  # batches may be ready, and requests wait on the condition
            # Reads in flight, oldest first: each is accepted only after those before it.
            inflight: collections.deque[asyncio.Future] = collections.deque()
            asked: set[int] = set()  # shards whose readers were asked if they cache them unchanged
            cached: set[int] = set()  # ... and those they do
            while True:
                if self._core.spec.stream and arrivals != self._arrivals:
                    arrivals = self._arrivals
                    await self._join_pass(queue, in_pass)
                if not queue and not inflight:
                    if not self._core.spec.stream or not await self._pass_goes_on(epoch, arrivals):
                        break
                    continue
                while queue and len(inflight) < self._prefetch and self._core.wants_more(epoch):
                    if queue[0].index not in asked:
                        window = list(itertools.islice(queue, CACHED_WINDOW * self._prefetch))
                        asked, cached = await self._cached_ahead(window)
                    shard = queue.popleft()
                    inflight.append(asyncio.ensure_future(self._read(shard.uri, shard.index, shard.index in cached)))
                if not inflight:
                    async with self._condition():
                        await self._condition().wait_for(lambda: self._core.wants_more(epoch))
                    continue
                result = await inflight[0]
                inflight.popleft()
                if epoch in self._early:
                    self._read_early.setdefault(epoch, []).append((result[0].index, result[0].uri))
                await self._accept(epoch, *result)
                await self._notify()
                self._checkpoint_if_due()
            self._core.finish_reading(epoch)
            self._start_next_early(epoch)
            await self._notify()
            await self.checkpoint()
        except Exception as exc:  # a waiting trainer must hear about it rather than hang
            log.exception("epoch %d of job %s failed", epoch, self._core.spec.job)
            if epoch in self._core.epochs:
                self._core.fail_epoch(epoch, f"epoch {epoch} failed: {exc!r}")
        await self._notify()

    async def _join_pass(self, queue: collections.deque, in_pass: set[int]) -> None:
        """Puts the shards added to the pool since the pass began at the head of its reading
        queue (oldest first): new data reaches a stream's batches within a few reads."""
        new = sorted((s for s in await self._registry.readable.remote() if s.index not in in_pass), key=lambda s: s.index)
        in_pass.update(s.index for s in new)
        queue.extendleft(reversed(new))

    async def _pass_goes_on(self, epoch: int, arrivals: int) -> bool:
        """A stream pass has read all its shards: waits until shards arrive (True) or a rank
        wants a batch the rows read cannot make (False: the pass ends and its rows are cut)."""
        core = self._core
        async with self._condition():
            await self._condition().wait_for(
                lambda: arrivals != self._arrivals or (core.starving(epoch) and core.choosing_due(epoch))
            )
        return arrivals != self._arrivals

    async def _choose(self, epoch: int) -> None:
        """Snapshot mode: fresh learner losses for each super-batch, just before it is chosen from."""
        core, cond = self._core, self._condition()
        try:
            while True:
                async with cond:
                    while True:
                        run = core.epochs.get(epoch)
                        if run is None and not self._feeders[epoch].done():
                            await cond.wait()  # the feeder has not started the epoch yet
                            continue
                        if run is None or run.ledger.error or run.ledger.closed:
                            return
                        before = core.progress(epoch)
                        if core.choosing_due(epoch) and core.draw(epoch) is not None:
                            break
                        if core.progress(epoch) != before:
                            cond.notify_all()  # a draw took the waiting rows: reading may go on
                            continue  # or it closed the epoch
                        await cond.wait()
                candidates = run.drawn
                # The scorer's forward pass needs every candidate's inputs: the one full copy.
                losses, step = await self._learner_scorer.learner_loss.remote(core.spec.job, candidates.take())
                if core.epochs.get(epoch) is run:
                    core.select(epoch, candidates, losses, NO_SNAPSHOT if losses is None else step)
                await self._notify()
        except Exception as exc:
            log.exception("choosing in epoch %d of job %s failed", epoch, core.spec.job)
            if epoch in core.epochs:
                core.fail_epoch(epoch, f"epoch {epoch} failed: {exc!r}")
            await self._notify()

    async def _accept(self, epoch: int, result: ReadResult, scores: tuple | None) -> None:
        if result.table is None and not result.error:  # unchanged (see `_read`)
            rows = self._core.rows_held(result.index)
            reason = self._core.add_again(epoch, result.index)
        else:
            rows = 0 if result.table is None else result.table.num_rows
            reason = result.error or self._core.add_shard(epoch, result.index, result.table, scores)
        if reason:
            self._core.forget_rows(result.index)
            self._identities.pop(result.index, None)
        else:
            self._uris[result.index] = result.uri
            if self._recorded.get(result.index) == rows:
                return  # the registry has it so already
        # Awaited, so that once a trainer hears the epoch ended, GetStats shows every quarantine;
        # a registry that died meanwhile is restarted by Ray and told again.
        for _ in range(READ_ATTEMPTS):
            try:
                if reason:
                    await self._registry.quarantine.remote(result.index, reason)
                    self._recorded.pop(result.index, None)
                else:
                    await self._registry.mark_read.remote(result.index, rows)
                    self._recorded[result.index] = rows
                return
            except RayActorError as exc:
                log.warning("the registry died recording shard %s (%s); retrying", result.uri, exc)

    async def _uris_of(self, plan) -> dict[int, str]:
        """URIs of the plan's shards, for the gateway to read them by (the registry's, for shards
        this curator has not read since it started)."""
        if any(shard not in self._uris for shard in plan.shards()):
            self._uris.update({r.index: r.uri for r in await self._registry.records.remote()})
        return self._uris
