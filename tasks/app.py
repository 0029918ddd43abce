"""`celery -A tasks.app worker|flower`: the app from quantgate.broker, with the tasks of tasks/tasks.py."""
from quantgate.broker import app, configure, make_app  # noqa: F401

__all__ = ["app", "configure", "make_app"]
