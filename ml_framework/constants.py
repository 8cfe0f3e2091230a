"""Every number and name that more than one module shares, in one place (as arq keeps its
Redis key prefixes and default timeouts in ``arq/constants.py``).

Each value states its unit in its name (``_S`` seconds, ``_BYTES`` bytes) and, below it,
why it is what it is. A setting's default that is one of these names it here; the setting
itself stays in :mod:`ml_framework.settings`. This module imports nothing, so that every
layer (producer, worker, the shared contract) can use it.
"""

from __future__ import annotations

# --- Task names: what a producer sends and a worker registers (sent by name: the producer
# never imports the worker) ---

SCORE_SHARD_TASK = "mlf.score_shard"
"""Celery task name of the bulk-scoring task (one shard per message)."""
SCORE_ONLINE_TASK = "mlf.score_online"
"""Celery task name of online requests sent together (several shards per message)."""

# --- Worker liveness ---

HEARTBEAT_INTERVAL_S = 5.0
"""How often a worker process writes its heartbeat row to the results store, seconds.
Often enough that the API's ``/ready`` and ``mlf workers`` see a new worker within a few
seconds; rarely enough that a hundred workers write 20 rows a second."""
WORKER_LIVE_S = 30.0
"""A worker process whose heartbeat is younger than this, seconds, is live: six beats of
:data:`HEARTBEAT_INTERVAL_S`, so that a worker busy in a long garbage collection or a slow
database write is not reported gone. The one age behind ``/ready``, ``mlf workers``, the
``mlf_workers_live`` metric, the web UI's worker list, ``Client.live_workers`` and the
warning that a job has no worker."""
WORKER_GONE_S = 300.0
"""A worker process whose heartbeat is older than this, seconds, is of an earlier run:
it is dead, and its broker bindings are pruned; ``mlf workers --self`` ignores it. Ten
times :data:`WORKER_LIVE_S`, so that a worker that was only slow is never pruned."""

# --- Message and request sizes: three limits, each for its own reason ---

MAX_MESSAGE_BYTES = 64 * 2**20
"""Default of the ``max_message_bytes`` setting: the largest task body (JSON, bytes) a
producer sends, 64 MiB; a larger one is refused before anything is recorded
(:class:`~ml_framework.errors.MessageTooLargeError`). Brokers cap a message well above it:
Redis at 512 MB per string value (``proto-max-bulk-len``; kombu stores the message
base64-encoded, 4/3 of the body, with its headers), RabbitMQ at 128 MiB by default
(``max_message_size``, since 3.8). Shards bigger than this are also slow to send, hold
worker memory and make a redelivery expensive; a smaller ``shard_size`` or a dataset under
the data directory (sent by reference) avoids them."""
MAX_REQUEST_BYTES = 16 * 2**20
"""Default of the ``api_max_request_bytes`` setting: the largest HTTP request body the API
reads, bytes (413 above it). Smaller than :data:`MAX_MESSAGE_BYTES` because the API holds
the whole body, and parsing 16 MiB of JSON rows peaks at about 400 MiB in a parsing
process (see ``producer.api.bodies.PARSE_PROCESSES``); its rows then travel as Arrow,
smaller than their JSON."""
ONLINE_GROUP_BYTES = 4 * 2**20
"""Inline rows (base64 characters) one ``mlf.score_online`` message carries, about, when
online requests are sent together; more go in further messages. Not a limit (a larger
single request goes alone, up to :data:`MAX_MESSAGE_BYTES`): a target that keeps one
message quick to send and decode, so that the small requests grouped with a large one
are not delayed by it."""

# --- Value ranges ---

MAX_INT32 = 2**31 - 1
"""Largest model version, batch size, shard size and page offset accepted: the results
store keeps them in SQL ``INTEGER`` columns (32-bit signed on PostgreSQL)."""
PREDICT_TIMEOUT_S = 30.0
"""Default of how long an online request (``Client.predict``, ``POST /v1/models/{name}/predict``,
``/v2/models/{name}/infer``) waits for its answer, seconds: a few dynamic batches even on a
busy CPU worker, and still below the 60 s read timeout of common HTTP proxies."""
MIN_PRIORITY = 0
"""Lowest (and default) bulk-job priority."""
MAX_PRIORITY = 9
"""Highest (most urgent) bulk-job priority: queues are declared with this
``x-max-priority`` on RabbitMQ (which advises few levels: each costs memory and CPU), and
kombu's Redis transport maps 0-9 onto its ``priority_steps``."""

# --- Completion callbacks (see ml_framework.callbacks) ---

CALLBACK_URL_MAX_CHARS = 2048
"""Longest ``callback_url`` accepted at submit, characters: the de facto limit of URLs
that browsers, proxies and servers all take (RFC 9110 section 4.1 asks for at least 8000,
but many servers stop at 2 to 8 KiB)."""
CALLBACK_TIMEOUT_S = 10.0
"""How long one delivery attempt waits for the receiver's answer, seconds (connect and
read): GitHub waits 10 s for a webhook receiver before it counts the delivery failed."""
CALLBACK_POLL_S = 1.0
"""How often an API process looks for due callbacks, seconds: one indexed UPDATE a second
per API process."""
CALLBACK_LEASE_S = 60.0
"""How long a claimed delivery is its claimer's, seconds: six times
:data:`CALLBACK_TIMEOUT_S`, so that a claim outlives its attempt; an API process that dies
mid-attempt leaves the callback to another after this."""
CALLBACK_BATCH = 8
"""Callbacks one API process claims per pass and posts at once (one thread each)."""
CALLBACK_BACKOFF_BASE_S = 1.0
"""Delay before the second attempt, seconds; doubled for each later one (1, 2, 4 ...)."""
CALLBACK_BACKOFF_MAX_S = 300.0
"""Longest delay between two attempts, seconds (5 minutes)."""
CALLBACK_MAX_ATTEMPTS = 8
"""Default of the ``callback_max_attempts`` setting: with :data:`CALLBACK_BACKOFF_BASE_S`
doubling, the eighth attempt comes about two minutes after the first (1 + 2 + ... + 64 s,
jittered down to half), long enough to ride out a receiver's restart."""
CALLBACK_TOLERANCE_S = 300
"""Default age, seconds, past which :func:`ml_framework.callbacks.verify_signature` refuses
an event's timestamp (a replay): Stripe's default tolerance, 5 minutes."""
