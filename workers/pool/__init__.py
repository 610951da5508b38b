"""The worker pool: local models served by Celery workers, answers relayed through Redis Streams.

`backend.py` is the gateway's side (a `Backend` that enqueues a task per request and reads the answer back),
`runner.py` and `worker.py` the worker's, `protocol.py` what they agree on (docs/distributed.md).
"""
