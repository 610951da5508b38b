"""The Celery application both sides use: JSON only, no result backend (answers go through Redis Streams), one
task reserved per worker thread at a time, and short socket timeouts so that a broker that is down fails a
call at once instead of hanging it."""

from __future__ import annotations

from celery import Celery


def celery_app(broker_url: str, *, timeout_s: float = 1.0) -> Celery:
    app = Celery("frugal", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        # A worker thread takes one task at a time; the rest wait in the queue, where another worker can take
        # them and where the gateways read the queue's depth (backpressure).
        worker_prefetch_multiplier=1,
        task_acks_late=False,
        broker_connection_timeout=timeout_s,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
                                  "visibility_timeout": 600},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app
