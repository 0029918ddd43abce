"""Celery transport for the quantgate pipeline: `tasks.app` (the app) and `tasks.tasks` (thin task wrappers)."""
