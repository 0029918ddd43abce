"""The Celery app (the only module-level state quantgate keeps): reliability settings from quantgate.config.

The app is configured here, below the tasks that register on it (tasks/tasks.py, named in `include`), so the CLI
can submit jobs and read their state without importing worker code. `celery -A tasks.app worker` and
`celery -A tasks.app flower` use it; with no broker configured (QUANTGATE_BROKER_URL empty or memory://) tasks
run eagerly in the calling process.

Brokers: Redis (the default) or RabbitMQ (amqp://, a quorum queue, publisher confirms; job state and leases then
need a Redis result backend, QUANTGATE_RESULT_BACKEND). Either way the LeaseKeeper bootstep (quantgate.lease) lets
another worker finish the job of a worker that died whole, and never run a task that is still running.
"""
from __future__ import annotations

from celery import Celery

from core.errors import QuantGateError
from quantgate import lease
from quantgate.config import Settings, load_settings

AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://")


def is_amqp(url: str) -> bool:
    return url.strip().lower().startswith(AMQP_SCHEMES)


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured for crash-safe redelivery (acks late, requeue on worker loss, prefetch 1)."""
    app = Celery("quantgate", include=["tasks.tasks"])
    lease.install(app)
    return configure(app, settings or load_settings())


def check_settings(s: Settings) -> None:
    """Raise QuantGateError for a broker setup that cannot work (RabbitMQ without a Redis result backend)."""
    if not s.embedded and is_amqp(s.broker_url) and not lease.is_redis(s.result_backend):
        raise QuantGateError("a RabbitMQ broker needs a Redis result backend for job state and task leases:"
                             " set QUANTGATE_RESULT_BACKEND=redis://HOST:6379/0")


def configure(app: Celery, s: Settings) -> Celery:
    """Apply settings to an app (also to an app already used: its cached result backend and pool are dropped)."""
    import threading

    from kombu import Exchange, Queue

    s.export_env()
    transport = {"visibility_timeout": s.visibility_timeout, "unacked_restore_interval": 2,
                 "unacked_restore_throttle": 1}
    app.conf.update(
        task_acks_late=True,                 # ack after the task ran: a crash mid-task leaves the message in Redis
        task_reject_on_worker_lost=True,     # a killed pool child requeues its task at once
        worker_prefetch_multiplier=1,        # a worker holds one message per process, no hoarding
        task_track_started=True,
        task_soft_time_limit=s.soft_time_limit,
        task_time_limit=s.time_limit,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_extended=True,
        result_expires=s.result_expires,
        worker_concurrency=s.worker_concurrency,
        worker_max_tasks_per_child=50,       # bound slow leaks in long-lived pool children
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_default_queue="quantgate",
    )
    if s.embedded:
        app.conf.update(broker_transport_options={}, result_backend_transport_options={})
        app.conf.update(task_always_eager=True, task_eager_propagates=True, task_store_eager_result=True,
                        broker_url="memory://",
                        result_backend="cache+memory://")
    else:
        app.conf.update(task_always_eager=False, task_store_eager_result=False)
        if is_amqp(s.broker_url):
            check_settings(s)
            # A quorum queue (replicated, durable) and publisher confirms; RabbitMQ requeues a dead consumer's
            # unacked messages as soon as its connection drops, so no visibility timeout applies.
            # A topic exchange: Celery's native delayed delivery (retries with a countdown) needs one.
            queues = [Queue("quantgate", Exchange("quantgate", type="topic"), routing_key="quantgate",
                            queue_arguments={"x-queue-type": "quorum"}, durable=True)]
            # AMQP heartbeats every 30 s: RabbitMQ drops the connection of a machine that vanished without closing
            # its sockets (power loss) after two missed beats, and requeues its messages then.
            app.conf.update(task_queues=queues, task_default_exchange="quantgate",
                            task_default_exchange_type="topic", task_default_routing_key="quantgate",
                            broker_transport_options={"confirm_publish": True}, broker_heartbeat=30)
        else:
            app.conf.update(task_queues=None, task_default_exchange=None, task_default_exchange_type="direct",
                            task_default_routing_key=None, broker_transport_options=transport)
        app.conf.update(broker_url=s.broker_url, result_backend=s.backend_url,
                        result_backend_transport_options=transport,
                        redis_backend_health_check_interval=10, broker_connection_timeout=5,
                        redis_socket_connect_timeout=5, redis_socket_timeout=30)
    app.conf.quantgate_settings = s.model_dump(mode="json")
    app._local = threading.local()   # forget a result backend made from older settings
    app._pool = None
    app.__dict__.pop("amqp", None)   # ... and its queues, routes and producer pool (the broker may have changed)
    return app


app = make_app()
