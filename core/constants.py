"""Fixed names and numbers shared by every process. Tunables an operator may change live in settings.

Keeping Redis keys and protocol constants here means the miner and the workers, which never import
each other, still agree on where they meet.
"""

from typing import Final

# --- Redis keys (all under one prefix so an operator can find or flush them) -----------------------
KEY_PREFIX: Final = "synth"
RESULT_KEY = KEY_PREFIX + ":result:{request_id}"  # list the worker RPUSHes float32 paths onto
# A forecast task's claim: the name of the worker process running it (as in its heartbeat), from its start until its
# result is pushed (removed in the same transaction). The lease beside it holds the same name for TASK_LEASE_MS only
# and is renewed while the forecast runs: a claim whose lease has lapsed is a worker that stopped mid-task.
TASK_CLAIM_KEY = KEY_PREFIX + ":claim:{request_id}"
TASK_LEASE_KEY = KEY_PREFIX + ":lease:{request_id}"
CACHE_KEY = KEY_PREFIX + ":cache:{asset}:{step}:{day}"  # one string of float64 slots per asset, step and UTC day
CACHE_META_KEY = KEY_PREFIX + ":cache-meta:{asset}:{step}"  # span / freshness of the rolling cache
CACHE_SOURCE_KEY = KEY_PREFIX + ":cache-source:{asset}"  # the provider the asset's cached bars came from
LATEST_PRICE_KEY = KEY_PREFIX + ":latest:{asset}"  # newest anchor price with its publish time
REFRESH_LOCK_KEY = KEY_PREFIX + ":refresh-lock:{asset}"  # one process refreshes an asset's cache at a time
REFRESH_LOCK_POLL_S = 0.25  # a refresh waiting for another's lock tries again this often
BEAT_LOCK_KEY = KEY_PREFIX + ":beat:lock"  # one beat schedules at a time
BEAT_LAST_RUN_KEY = KEY_PREFIX + ":beat:last-run"  # job name -> when the leading beat last sent it (epoch s)
JOB_SLOT_KEY = KEY_PREFIX + ":job:{name}:{slot}"  # a periodic job's claim on its slot: running (leased) or done
JOB_ATTEMPTS_KEY = KEY_PREFIX + ":job-attempts:{name}:{slot}"  # claims taken on a slot (runs that started)
WORKER_HEARTBEAT_KEY = KEY_PREFIX + ":worker:{name}"  # workers announce model version and pid
# A provider host's Retry-After (429, 5xx, Binance's 418 ban), one key per origin (scheme://host:port): its TTL is
# the wait left, by Redis's clock, and its value says who was told what (core.sources.holds). Shared, because every
# process of the fleet calls the same providers from the same IPs.
HOST_HOLD_KEY = KEY_PREFIX + ":host-hold:{origin}"
# Tasks a worker discarded unrun, their ``expires`` passed while they waited (queue -> count, never reset):
# a prefork worker discards them in its parent process, which serves no metrics.
EXPIRED_TASKS_KEY = KEY_PREFIX + ":tasks:expired"

# --- Protocol ----------------------------------------------------------------------------------------
SIGNIFICANT_DIGITS: Final = 8  # validators reject more than 8 digits per price
LF_INCREMENT: Final = 300
LF_LENGTH: Final = 86_400
HF_INCREMENT: Final = 60
HF_LENGTH: Final = 3_600
SECONDS_PER_DAY: Final = 86_400
MINUTE: Final = 60
# A bar's close is only known once it has closed; the batch interface cuts history this long before
# the prompt's start so nothing published after the request could leak in.
LOOKAHEAD_GUARD_S: Final = 60
# A bar is asked for only this long after its close: with our clock a second ahead of the exchange's (or
# an exchange that finalises a moment late) the newest bar would still be open, and its moving close
# would be stored for good, since later refreshes only fetch after the newest stored bar.
BAR_CLOSE_GRACE_S: Final = 3
# A provider bar opening, or a print published, further than this past our clock says the provider's clock runs
# ahead (a correct one's newest bar opens at or before now): its bars are then stamped later than they closed,
# and asked for the bars up to now it answers older ones. Nothing of it is stored until the clocks agree.
PROVIDER_CLOCK_AHEAD_TOLERANCE_S: Final = 60
# The most a provider reply may hold once decompressed. The largest one asked for (5000 Hyperliquid candles)
# is under 1 MB; a reply streamed without end, or a gzip bomb, was read whole into memory (GBs a second).
MAX_REPLY_BYTES: Final = 8 * 1024 * 1024
# The shared Retry-After holds are looked up before every provider request: a Redis slower than this is taken
# for down (the holds are then this process's own), and tried again this long after it failed.
HOST_HOLD_REDIS_TIMEOUT_S: Final = 1.0
HOST_HOLD_REDIS_RETRY_S: Final = 30.0
# The longest hold written to Redis (Binance's bans last up to 3 days): an absurd Retry-After (1e300 s) is an
# expiry Redis refuses, which read as Redis being down.
HOST_HOLD_MAX_S: Final = 7 * SECONDS_PER_DAY

# --- Result transport --------------------------------------------------------------------------------
RESULT_DTYPE: Final = "<f4"  # float32 little-endian paths on the wire between worker and miner
RESULT_HEADER_DTYPE: Final = "<i4"  # [n_paths, n_points] prefix so a reader can check the shape

# --- Celery task names (the miner sends by name; it never imports the workers) -------------------------
TASK_FORECAST: Final = "synth.forecast"
TASK_REFRESH_CACHE: Final = "synth.refresh_cache"
TASK_CALIBRATE: Final = "synth.calibrate"
TASK_RETRAIN: Final = "synth.retrain"
TASK_COMPACT_STORE: Final = "synth.compact_store"
JOB_RUNS_KEY: Final = KEY_PREFIX + ":jobs:runs"  # recent periodic-job runs, newest first (for `status`)
JOB_RUNS_KEPT: Final = 500
# Each job's newest run: a minute's cache refresh pushes a weekly retrain's verdict out of the 500 runs
# above within about 8 hours, and `status` shows it from here instead.
JOB_LAST_RUN_KEY: Final = KEY_PREFIX + ":jobs:last"
# A job whose process keeps dying (a retrain OOM-killed each time) is re-delivered after every death:
# give up on its slot after this many starts instead of looping all week.
JOB_MAX_ATTEMPTS: Final = 3
# How long a job's claim, finish or record waits for an unreachable Redis: a share of its period (a minute's
# refresh waits 15 s, not into the next minute's), at most JOB_REDIS_RETRY_MAX_S (a Redis restart, not a week).
JOB_REDIS_RETRY_SHARE: Final = 0.25
JOB_REDIS_RETRY_MAX_S: Final = 120.0
JOB_REDIS_BACKOFF_S: Final = (0.5, 8.0)  # first and longest wait between two tries, doubling

# --- Artifacts ----------------------------------------------------------------------------------------
# Staged sets (refused calibrations, `retrain --no-publish` sets, the retrain's plain checkpoints) are kept
# this long for inspection or a manual `artifacts publish`, and the newest few whatever their age.
STAGING_KEEP_S: Final = 7 * 86_400
STAGING_KEEP_NEWEST: Final = 5

# --- Retraining ------------------------------------------------------------------------------------------
# An asset short of gate prompts whose newest stored bar closed this long before the gate has a stopped feed:
# it is reported not gated and the others decide (it serves no fresh price either). A fresher one is short
# of prompts through gaps, and the model is then not published (it would serve that asset ungated).
GATE_FEED_STOPPED_S: Final = 6 * 3600

# --- Calibration -----------------------------------------------------------------------------------------
# A market that closes (NYSE hours: of 168 h a week, 26 start a scorable 24 h prompt, 27.5 a 1 h one) fills
# about 1 in 6.5 of calibration's hourly slots: its prompts reach up to this many times the window back for the
# ones its latest slots lack (140 daily ones: ~5.4 weeks). Without it equities never met the minimums.
CALIBRATION_SESSION_REACH: Final = 7

# --- Worker processes ------------------------------------------------------------------------------------
HEARTBEAT_TTL_S: Final = 60  # a worker's heartbeat key outlives it this long
# An idle process re-announces itself this often (a SET per process: cheap). It bounds how long a worker
# killed without a goodbye (kill -9, OOM, a lost host) still looks alive: 30 s between beats kept the miner
# sending its only worker's queue forecasts nobody computed, each waiting out its deadline, for 75 s.
HEARTBEAT_EVERY_S: Final = 10.0
# After a beat that failed (Redis down, restarted empty, hung), the next one comes this soon: a full interval
# left a live, idle worker looking dead for up to 10 s after Redis was back (the miner fell back, labelled
# no_worker, and `status` said it was stopped or stuck).
HEARTBEAT_RETRY_S: Final = 1.0
# A process silent this long (2.5 missed announcements) counts as stopped or stuck: its key may outlive it
# for up to HEARTBEAT_TTL_S, so `status` flags it and the miner stops sending it forecasts.
HEARTBEAT_STALE_AFTER_S: Final = 2.5 * HEARTBEAT_EVERY_S
# A worker's clock this far from the reader's (judged by its heartbeat key's age in Redis) is named by `status`:
# the miner judges heartbeats, deadlines and task expiries by the clocks.
CLOCK_SKEW_WARN_S: Final = 5.0
# A worker's clock ahead of the miner's by A judges every task's ``expires`` (the pool's deadline, see miner/pool.py)
# A sooner: it discards unrun, as expired, a task sent with less than A left. The miner sends a request only where a
# live reader of its queue is ahead by less than this (measurement noise: a beat's "at" is taken before its SET, PTTL
# and the miner's clock a round trip apart, milliseconds), or by less than the time left minus this (the task's way
# to an idle worker); else it falls back at once instead of waiting out a task nobody will run.
CLOCK_AHEAD_MARGIN_S: Final = 0.5
# The miner warns of a worker whose clock is off (over CLOCK_SKEW_WARN_S) at most this often per worker.
CLOCK_SKEW_LOG_EVERY_S: Final = 60.0
# The miner reads the heartbeats (which queues have a live reader) at most this often, not per request.
LIVE_READERS_CHECK_S: Final = 2.0
# A forecast still running when the miner has stopped waiting (Settings.max_wait_s) is useless: its soft
# time limit is that wait, and the hard limit kills a task that ignores the soft one this much later.
FORECAST_KILL_GRACE_S: Final = 5
# A running forecast's lease (TASK_LEASE_KEY) lasts this long and is renewed this often by a thread beside the
# blocking forecast: six renewals may be missed (a busy host, a slow Redis) before a live worker looks stopped.
# Expiry is Redis's clock, so a worker's skewed clock changes nothing.
TASK_LEASE_MS: Final = 3000
TASK_LEASE_RENEW_S: Final = 0.5
# The miner waits for a result in BLPOPs of this length and checks the task's lease between them (one MGET): a
# worker killed mid-task (kill -9, OOM, a GPU crash) or frozen is noticed TASK_LEASE_MS + this after its last
# renewal, where the wait used to run out at the deadline (max_wait_s, 30 s). A result still ends the wait at once.
TASK_LEASE_CHECK_S: Final = 0.5
# A miner waiting for a result whose Redis connection fails (Redis restarting) reconnects until the pool's deadline,
# waiting from the first to the last delay, doubling: a restarted Redis still delivers the result a worker pushes
# after it, where the first failure used to be the fallback's. Back, the task's lease is judged only after one
# TASK_LEASE_MS more (a live worker renews it within TASK_LEASE_RENEW_S of Redis's return).
REDIS_RECONNECT_S: Final = (0.05, 0.5)
# A forecast whose worker stopped is sent again (once, to another live reader) only with this much time left to
# the pool's deadline; with less the fallback answers now (a model forecast rarely comes back in less).
LOST_TASK_RESEND_MIN_S: Final = 1.0
# A result is kept the time left until the deadline plus this (at most Settings.result_ttl_s): a miner
# waiting on BLPOP gets it at once, and one pushed after the miner stopped waiting (1.16 MB for 24 h) is
# gone soon. The grace also covers a worker clock a few seconds ahead of the miner's.
LATE_RESULT_TTL_S: Final = 10
# Hard time limits of the periodic jobs (Celery kills the process at them). Each has a soft limit
# JOB_KILL_GRACE_S earlier: a run past it raises SoftTimeLimitExceeded and is recorded as an error with its
# slot marked done, where the kill alone left no record and `status` kept showing the previous run.
REFRESH_TIME_LIMIT_S: Final = 300
CALIBRATE_TIME_LIMIT_S: Final = 3000
RETRAIN_TIME_LIMIT_S: Final = 4 * 3600
COMPACT_TIME_LIMIT_S: Final = 1800
JOB_KILL_GRACE_S: Final = 60
BEAT_SCHEDULE_FILE: Final = "beat-schedule.db"  # under Settings.data_dir unless beat_schedule_file is set
# A send that failed (the queue's key holds another type, the broker rejects the message) is tried again after
# the first delay, doubling to the last, and never later than one period of its job: Celery's beat re-sent it
# at once, hundreds of times a second, each with a logged traceback.
BEAT_SEND_RETRY_S: Final = (1.0, 300.0)

# --- Miner process ---------------------------------------------------------------------------------------
# A request that joined an identical one's computation, which fell back (the pool late for that caller's
# deadline), asks the pool itself when its own pool deadline is at least this much later.
JOINER_POOL_RETRY_MIN_S: Final = 1.0
# A pool failure this close to its deadline (or later) counts as the pool being late, not down.
POOL_LATE_SLACK_S: Final = 0.1
DRAIN_POLL_S: Final = 0.05  # a stopping miner checks this often whether its requests in flight are answered
AXON_START_S: Final = 10.0  # uvicorn's thread must have bound the axon's socket by then, or serve refuses
# Log lines about refused requests, per kind and minute; the rest are counted into the next one logged.
AXON_REFUSAL_LINES_PER_MINUTE: Final = 20

# --- Chain (production miner) ---------------------------------------------------------------------------
METAGRAPH_REFRESH_S: Final = 600.0  # registrations and stakes change slowly
# Until the first metagraph read succeeds every validator is refused, so that read is retried soon,
# backing off from the first to the last delay, and the axon waits a little for it before serving.
METAGRAPH_RETRY_S: Final = (5.0, 60.0)
METAGRAPH_FIRST_WAIT_S: Final = 30.0
