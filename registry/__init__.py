"""Registry and audit: MLflow runs and model versions for GGUF artifacts, alias gating, a hash-chained audit trail.

Importing this package is cheap: MLflow is imported inside the functions that talk to it. Modules: client (MLflow
access, names, references), facts (what is recorded of a GGUF), registration (register, promote), queries (list,
show, download, export), audit (the chain), compliance (per-version report), config (settings), pyfunc_gguf.
"""
