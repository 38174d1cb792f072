"""A beat scheduler that schedules only while it holds a Redis leader lock, and stamps each slot.

Two beats against one Redis: the one holding ``BEAT_LOCK_KEY`` sends, the other waits and takes
over when the lock expires (TTL ``beat_lock_ttl_s``, renewed every tick). Each sent task carries
``slot`` (its scheduled time floored to the period), which the task claims once in Redis.

The schedule file keeps each job's last run across restarts, so its name is stable; two beats on one
host that share it take turns (a file lock), since two writers would corrupt it. The leader also records
each send in Redis (``BEAT_LAST_RUN_KEY``): a beat that becomes the leader goes on from those times, not from
its own file, which is as old as its last time as the leader (it would send at once every job the old
leader had just sent, in the next slot when a boundary fell between: an hourly calibration or a weekly
retrain run twice within one period).
"""

import contextlib
import fcntl
import logging
import os
import shelve
import socket
import time
from datetime import datetime, timezone
from typing import IO, Any

import redis
from celery.beat import PersistentScheduler, ScheduleEntry, SchedulingError
from celery.schedules import schedstate
from celery.utils.time import maybe_make_aware

from core.constants import (
    BEAT_LAST_RUN_KEY,
    BEAT_LOCK_KEY,
    BEAT_SEND_RETRY_S,
    JOB_ATTEMPTS_KEY,
    JOB_MAX_ATTEMPTS,
    JOB_SLOT_KEY,
    TASK_CALIBRATE,
    TASK_COMPACT_STORE,
    TASK_RETRAIN,
)
from core.settings import get_settings

log = logging.getLogger(__name__)

# Jobs whose run, if its whole worker dies, the leader sends again within the slot (see _resend_orphans).
# The minute's refresh is left to the next minute.
RESENT_WHEN_ORPHANED = frozenset({TASK_CALIBRATE, TASK_RETRAIN, TASK_COMPACT_STORE})

# Renew only if we still own it; release only if we own it (never steal another beat's lock).
RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"


class LeaderScheduler(PersistentScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = get_settings()
        self.lock_ttl_ms = int(settings.beat_lock_ttl_s * 1000)
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self.redis = redis.Redis.from_url(settings.pool_redis_url, socket_timeout=2.0)
        self.leader = False
        self._lock_was_free = False  # the last lock taken was free: a first lead, or the lock lapsed or was lost
        self._adopted: set[str] = set()  # jobs whose last send this beat took from Redis
        filename = kwargs.get("schedule_filename")
        self._in_memory = False  # the schedule file cannot be written: last runs live in memory and Redis
        self._file_lock: IO[bytes] | None = None
        if filename:
            try:
                self._file_lock = hold_file_lock(f"{filename}.lock")
            except OSError as exc:  # a read-only mount, a missing folder: scheduling matters more than the file
                self._in_memory = True
                log.error("beat: cannot write beside the schedule file %s (%s): last runs are kept in memory and "
                          "in Redis only", filename, exc)
        self._send_failures: dict[str, int] = {}  # job name -> sends failed in a row
        self._retry_at: dict[str, float] = {}  # job name -> monotonic time its failed send may be tried again
        self._resent: dict[str, tuple[int, int]] = {}  # job name -> (slot, starts) last sent again for
        # job name -> (slot, starts, monotonic time first seen): the lease's wait in real time, as a wall clock
        # stepping forward meanwhile would cut it short and send a live run's twin
        self._orphaned: dict[str, tuple[int, int, float]] = {}
        self.lease_s = settings.job_lease_s
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        """Celery's, on a file it can use. Celery removes some broken files and starts afresh, but not all: a
        truncated or garbled dumb-dbm file (a crash or a full disk mid-write) raised EOFError or UnpicklingError,
        and beat exited at every restart until someone deleted it. Such a file is replaced by a fresh one, and
        a file that cannot be written (read-only mount, no space) by memory; either way the leader goes on from
        the last sends recorded in Redis (``_adopt_last_runs``)."""
        try:
            super().setup_schedule()
            return
        except Exception as exc:  # noqa: BLE001 - whatever the file holds, beat must start
            failure = exc
        self._drop_store()
        if not self._in_memory and not isinstance(failure, OSError):
            log.error("beat: schedule file %s is unreadable (%r): starting a fresh one", self.schedule_filename,
                      failure)
            try:
                self._remove_db()
                super().setup_schedule()
                return
            except Exception as exc:  # noqa: BLE001
                failure = exc
                self._drop_store()
        if not self._in_memory:
            log.error("beat: schedule file %s cannot be written (%r): last runs are kept in memory and in Redis "
                      "only", self.schedule_filename, failure)
            self._in_memory = True
        super().setup_schedule()

    def _open_schedule(self) -> Any:
        if not self._in_memory:
            return super()._open_schedule()
        store: shelve.Shelf[Any] = shelve.Shelf({}, writeback=True)
        with contextlib.suppress(Exception):  # what a read-only file holds still counts
            with shelve.open(self.schedule_filename, flag="r") as saved:
                store.update(dict(saved))
        return store

    def _drop_store(self) -> None:
        store = self.__dict__.pop("_store", None)  # Celery's class attribute (None) shows again
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def _hold_lock(self) -> bool:
        try:
            self._lock_was_free = bool(self.redis.set(BEAT_LOCK_KEY, self.identity, nx=True, px=self.lock_ttl_ms))
            if self._lock_was_free:
                if not self.leader:
                    log.info("beat %s is now the leader", self.identity)
                return True
            return bool(self.redis.eval(RENEW, 1, BEAT_LOCK_KEY, self.identity, self.lock_ttl_ms))
        except redis.RedisError as exc:
            log.warning("beat lock unavailable (%s): not scheduling", exc)
            return False

    def _adopt_last_runs(self) -> bool:
        """Take each job's last send from Redis where it is later than this beat's own record, or where this
        beat's file never sent the job (a fresh file dates it to the beat's start, not to a send)."""
        try:
            sent = self.redis.hgetall(BEAT_LAST_RUN_KEY)
        except redis.RedisError as exc:
            log.warning("beat last runs unavailable (%s): not scheduling", exc)
            return False
        self._adopt(sent)
        return True

    def _adopt(self, sent: dict[Any, Any]) -> None:
        for name, entry in self.schedule.items():
            at = sent.get(name.encode())
            if at is not None:
                last = datetime.fromtimestamp(float(at), timezone.utc)
                if last > maybe_make_aware(entry.last_run_at) or not entry.total_run_count:
                    entry.last_run_at = last
                    self._adopted.add(name)
        self._heap = None  # rebuilt from the adopted times on the next tick

    def _restore_last_runs(self) -> None:
        """Put back the last sends Redis lost with the lock (restarted empty): otherwise the weekly retrain's
        stayed missing until its next send, and a beat on a fresh file leading meanwhile (a new host, a broken
        file) would put the retrain off by up to a week. Only what is missing: a newer record stays."""
        known = {name: maybe_make_aware(entry.last_run_at).timestamp() for name, entry in self.schedule.items()
                 if entry.total_run_count or name in self._adopted}
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for name, at in known.items():
                    pipe.hsetnx(BEAT_LAST_RUN_KEY, name, at)
                pipe.execute()
        except redis.RedisError as exc:
            log.warning("beat: last runs not restored in Redis (%s)", exc)

    def is_due(self, entry: ScheduleEntry) -> schedstate:
        wait = self._retry_at.get(entry.name, 0.0) - time.monotonic()
        if wait > 0:  # its last send failed: not again before the backoff is over (other jobs still go)
            return schedstate(False, wait)
        return super().is_due(entry)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        was_leader, self.leader = self.leader, self._hold_lock()
        if self.leader and not was_leader:
            self.leader = self._adopt_last_runs()
        if self.leader and self._lock_was_free:
            self._restore_last_runs()
        if not self.leader:
            # Follow the leader's sends: Redis restarted empty loses them with the lock, and a standby taking the
            # free lock then would go on from its own file (as old as its last time as the leader) and send again
            # what the leader had just sent.
            with contextlib.suppress(redis.RedisError):  # Redis away: the lock's warning says so
                self._adopt(self.redis.hgetall(BEAT_LAST_RUN_KEY))
            return min(1.0, self.lock_ttl_ms / 3000)
        self._rewind_future_runs()
        self._resend_orphans()
        interval: float = super().tick(*args, **kwargs)
        return min(interval, self.lock_ttl_ms / 3000)

    def _rewind_future_runs(self) -> None:
        """A last run more than a period ahead of the clock: the clock went back (an NTP step, a VM restored from a
        snapshot), or another host's clock ran ahead. Celery waits until that time: the minute's cache refresh
        stopped for as long as the jump (an hour, a day). It is due a period from now instead. A smaller jump is
        left alone: the job waits for its next slot, as the slots in between ran."""
        now = self.app.now()
        for name, entry in self.schedule.items():
            period = float(entry.kwargs.get("period_s", 0) or 0)
            ahead = (maybe_make_aware(entry.last_run_at) - now).total_seconds()
            if period > 0 and ahead > period:
                log.warning("beat: %s last ran %.0f s ahead of the clock (the clock went back?): due again in %.0f s",
                            name, ahead, period)
                entry.last_run_at = now
                self._heap = None  # its events are as far ahead: rebuilt on this tick

    def _resend_orphans(self) -> None:
        """Send again the current slot's run of a job whose process died with its whole worker (kill -9, an
        OOM kill of the container, a lost host). ``reject_on_worker_lost`` re-queues a task only when the
        worker's main process outlives its child; otherwise the message waits out the broker's visibility
        timeout (hours, as long as the longest job), and that hour's calibration was lost. Such a run left
        a start counted and no claim (its lease lapsed, it never finished). Each (slot, start count) is sent
        once: the copy's own claim counts the next start, and the slot's start limit still holds. Only after
        a whole lease without a claim: a live run whose lease lapsed while Redis was away takes it back at
        its next renewal (a third of a lease), and must not get a twin. The slot follows the wall clock, as the
        schedule does; the lease's wait is timed with the monotonic one."""
        now, elapsed = time.time(), time.monotonic()
        for name, entry in self.schedule.items():
            period = float(entry.kwargs.get("period_s", 0) or 0)
            if entry.task not in RESENT_WHEN_ORPHANED or period <= 0:
                continue
            slot = int(now // period * period)
            try:
                starts = self.redis.get(JOB_ATTEMPTS_KEY.format(name=name, slot=slot))
                held = self.redis.exists(JOB_SLOT_KEY.format(name=name, slot=slot))
            except redis.RedisError as exc:
                log.warning("beat: orphaned runs not checked (%s)", exc)
                return
            count = int(starts) if starts is not None else 0
            if not count or held or count >= JOB_MAX_ATTEMPTS or self._resent.get(name) == (slot, count):
                self._orphaned.pop(name, None)
                continue
            seen = self._orphaned.get(name)
            if seen is None or seen[:2] != (slot, count):
                self._orphaned[name] = (slot, count, elapsed)
                continue
            if elapsed - seen[2] < self.lease_s:
                continue
            try:
                self.app.send_task(entry.task, kwargs={**entry.kwargs, "slot": slot},
                                   queue=entry.options.get("queue"), expires=max(1.0, slot + period - now))
            except Exception as exc:  # noqa: BLE001 - a broker blip: tried again next tick
                log.warning("beat: %s slot %d not sent again (%s)", name, slot, exc)
                continue
            self._resent[name] = (slot, count)
            self._orphaned.pop(name, None)
            log.warning("beat: %s slot %d started %d time(s) and its run is gone (its worker died): sent again",
                        name, slot, count)

    def apply_async(self, entry: ScheduleEntry, producer: Any = None, advance: bool = True,
                    **kwargs: Any) -> Any:
        period = float(entry.kwargs.get("period_s", 0) or 0)
        if period > 0:
            # Slot = scheduled time floored to the period (a beat fires a little after the boundary).
            entry.kwargs = {**entry.kwargs, "slot": int((time.time() + 0.5 * min(period, 2.0)) // period * period)}
        try:
            result = super().apply_async(entry, producer, advance, **kwargs)
        except SchedulingError:  # the send failed (Celery wraps it); a failed save after a send is not one
            # Celery advanced the entry before sending: a broker blip at that moment would skip the run for a
            # whole period (a week for the retrain). Put the unsent entry back: it is due again next tick.
            if not advance and self.schedule.get(entry.name) is not entry:
                self.schedule[entry.name] = entry
                self._heap = None
                # Due again at once, and Celery's beat ticks again at once after a send: without a backoff a
                # send that keeps failing is retried in a busy loop.
                failures = self._send_failures[entry.name] = self._send_failures.get(entry.name, 0) + 1
                delay = send_retry_delay(failures, period)
                self._retry_at[entry.name] = time.monotonic() + delay
                log.warning("beat: sending %s failed (%d in a row): next try in %.0f s", entry.name, failures, delay)
                try:  # Celery may have saved the advanced entry already: a beat killed now would skip the run
                    self.sync()
                except Exception as exc:  # the send's error is the one to raise
                    log.warning("beat: schedule not saved after the failed send of %s (%s)", entry.name, exc)
            raise
        self._send_failures.pop(entry.name, None)
        self._retry_at.pop(entry.name, None)
        sent = self.schedule.get(entry.name)
        if sent is not None:
            try:
                self.redis.hset(BEAT_LAST_RUN_KEY, entry.name, maybe_make_aware(sent.last_run_at).timestamp())
            except redis.RedisError as exc:
                log.warning("beat: last run of %s not recorded (%s)", entry.name, exc)
        return result

    def close(self) -> None:
        try:
            self.redis.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end "
                            "return 0", 1, BEAT_LOCK_KEY, self.identity)
        except redis.RedisError:
            pass
        super().close()
        if self._file_lock is not None:
            self._file_lock.close()  # after the schedule is synced and closed
            self._file_lock = None


def send_retry_delay(failures: int, period_s: float) -> float:
    """How long after its ``failures``-th failed send in a row a job is tried again: doubling from the first
    delay to the last, and no longer than its period (a retry as often as the schedule itself costs nothing)."""
    first, last = BEAT_SEND_RETRY_S
    delay = min(last, first * 2.0 ** min(failures - 1, 32))
    return min(delay, period_s) if period_s > 0 else delay


def hold_file_lock(path: str) -> IO[bytes]:
    """An exclusive lock on ``path``, held until the returned file is closed (or the process dies).
    Blocks while another process on this host holds it: a standby beat waits here."""
    handle = open(path, "ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # A warning: Celery builds the scheduler (its banner) before it sets up logging.
        log.warning("another beat on this host uses %s: waiting for it to stop", path)
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle
