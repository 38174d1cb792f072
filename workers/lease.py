"""A running forecast's claim and lease in Redis (TASK_CLAIM_KEY, TASK_LEASE_KEY): how the miner tells a worker
still computing from one that died mid-task (kill -9, the OOM killer, a GPU crash) or froze (SIGSTOP).

The forecast is one blocking call (torch, numpy), so a daemon thread renews the lease beside it. Expiry is Redis's
clock (PX), never the worker's: a worker whose clock is off is judged like any other.
"""

import logging
import math
import threading

import redis

from core.constants import TASK_CLAIM_KEY, TASK_LEASE_KEY, TASK_LEASE_MS, TASK_LEASE_RENEW_S

log = logging.getLogger(__name__)


class TaskLease:
    """This process's claim on one request, kept alive until ``release``. The claim (``claim_s``, longer than the
    miner waits) says the task was taken; the lease (TASK_LEASE_MS) says its worker is still running it."""

    def __init__(self, client: "redis.Redis", request_id: str, worker: str, claim_s: float) -> None:
        self.client = client
        self.worker = worker
        self.claim_key = TASK_CLAIM_KEY.format(request_id=request_id)
        self.lease_key = TASK_LEASE_KEY.format(request_id=request_id)
        self.claim_s = max(1, math.ceil(claim_s))
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0

    def start(self) -> "TaskLease":
        self._renew()
        self._thread = threading.Thread(target=self._keep, name="task-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """No renewal after this returns (a renewal in flight is waited for): the keys can then be removed for good,
        or left to lapse by a task that failed to push its result (the miner then acts on the lapse)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def release(self, pipe: "redis.client.Pipeline") -> None:
        """Stop renewing and add the keys' removal to ``pipe``, the transaction that pushes the result: the miner
        reads both keys at one instant (MGET), so it never sees the claim without lease and without the result."""
        self.stop()
        pipe.delete(self.claim_key, self.lease_key)

    def _keep(self) -> None:
        while not self._stopped.wait(TASK_LEASE_RENEW_S):
            self._renew()

    def _renew(self) -> None:
        # One transaction: after a Redis restart that lost both keys, a claim set alone for a moment would read as
        # a lapsed lease.
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.claim_key, self.worker, ex=self.claim_s)
            pipe.set(self.lease_key, self.worker, px=TASK_LEASE_MS)
            pipe.execute()
        except Exception as exc:  # Redis away: renewed at the next tick; meanwhile the miner cannot read either
            self._failures += 1
            log.log(logging.WARNING if self._failures == 1 else logging.DEBUG,
                    "lease of %s not renewed: %s (tried every %.1f s)", self.lease_key, exc, TASK_LEASE_RENEW_S)
            return
        if self._failures:
            log.warning("lease of %s renewed again after %d failed attempt(s)", self.lease_key, self._failures)
            self._failures = 0
