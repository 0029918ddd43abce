"""Registry and audit: MLflow runs and model versions for GGUF artifacts, alias gating, a hash-chained audit trail.

Importing this package is cheap: MLflow is imported inside the functions that talk to it.
"""
from registry.audit import AuditEvent, file_ref, record_event

__all__ = ["AuditEvent", "file_ref", "record_event"]
