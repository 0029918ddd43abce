"""The pinned source of a pipeline: one record for the DVC stages (out/pipeline/source.json) and the Celery tasks.

`prepare_source` resolves a model reference once (quantgate.inputs.resolve_model: a path, a Hub id, a
`models:/NAME@ALIAS`, a path in a DVC repository) and records what it named: the reference as asked, the canonical
reference it resolved to, the resolver arguments that name exactly that source again (`pin`: the version rather than
the alias, the commit rather than the branch), its SHA-256 and weights fingerprint, and the lineage every GGUF made
from it carries. `open_source` is what every later step calls: it resolves the pin where it runs (each machine
downloads into its own input cache) and refuses a source whose SHA-256 is not the recorded one. The record holds no
machine path of a download, so the same source gives the same bytes on every machine (dvc.lock stays reproducible).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from core.atomic import atomic_write_text
from core.regular_file import read_regular_bytes
from core.text import one_line
from quantgate.inputs import ModelInput, ModelInputError, check_reference, resolve_model
from quantgate.jobs import source_identity

SCHEMA_VERSION = 1
KINDS = ("path", "hf", "mlflow", "dvc")
MAX_SOURCE_BYTES = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SourceRecord:
    """What a pipeline's source reference named when it was resolved (source.json, the Celery `resolve` result)."""

    ref: str                       # as asked (params model.path, --model)
    kind: str                      # "path" | "hf" | "mlflow" | "dvc" (quantgate.inputs.ModelInput.kind)
    resolved: str                  # canonical reference: models:/NAME/3, org/name@<commit>, REPO@<commit>:PATH, a path
    name: str                      # the source's own name
    pin: Mapping[str, str | None]  # resolve_model(value, repo=, rev=) arguments naming exactly this source
    checkpoint_kind: str           # what quant.loaders opened: hf, gguf, ...
    sha256: str                    # core.hashing.checkpoint_sha256 of its files
    files: tuple[str, ...] = ()
    fingerprint: str | None = None  # quant.fingerprint.weights_fingerprint, None where none is defined
    lineage: Mapping[str, Any] = field(default_factory=dict)  # ModelInput.lineage (version, alias, commit, md5...)
    repo: str | None = None        # --model-repo / params model.repo, as asked
    rev: str | None = None         # --model-rev / params model.rev, as asked
    schema_version: int = SCHEMA_VERSION

    def model_input(self, path: Path) -> ModelInput:
        """The resolver's view of this source at a local `path` (its lineage is the recorded one, alias included)."""
        return ModelInput(path, self.resolved, self.kind, self.name, dict(self.lineage))

    def lineage_json(self) -> str | None:
        """What each GGUF made from this source carries as quantgate.source_lineage (None for a plain path)."""
        return self.model_input(Path(self.ref)).lineage_json()

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "ref": self.ref, "repo": self.repo, "rev": self.rev,
                "kind": self.kind, "resolved": self.resolved, "name": self.name, "pin": dict(self.pin),
                "checkpoint_kind": self.checkpoint_kind, "sha256": self.sha256, "files": list(self.files),
                "fingerprint": self.fingerprint, "lineage": dict(self.lineage)}

    @classmethod
    def from_dict(cls, d: Any) -> "SourceRecord":
        """Check and build a record from hostile JSON (a Celery message, a file someone edited): ModelInputError."""
        if not isinstance(d, Mapping):
            raise ModelInputError("source record: expected a JSON object")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ModelInputError(f"source record: schema_version {one_line(d.get('schema_version'), 20)}, "
                                  f"expected {SCHEMA_VERSION} (re-run the prepare stage)")
        text = {k: d.get(k) for k in ("ref", "kind", "resolved", "name", "checkpoint_kind", "sha256")}
        bad = [k for k, v in text.items() if not isinstance(v, str) or not v or len(v) > 4096]
        pin = d.get("pin")
        lineage = d.get("lineage")
        files = d.get("files", [])
        if bad or not isinstance(pin, Mapping) or not isinstance(lineage, Mapping) or not isinstance(files, list):
            raise ModelInputError("source record: missing or malformed field(s) "
                                  f"{', '.join(bad) or 'pin/lineage/files'}")
        if text["kind"] not in KINDS:
            raise ModelInputError(f"source record: unknown kind {one_line(text['kind'], 40)!r}")
        if not _SHA256.match(text["sha256"]):
            raise ModelInputError("source record: sha256 is not 64 hex digits")
        fp = d.get("fingerprint")
        if fp is not None and (not isinstance(fp, str) or not _SHA256.match(fp)):
            raise ModelInputError("source record: fingerprint is not 64 hex digits")
        if not all(isinstance(f, str) and len(f) <= 4096 for f in files) or len(files) > 100_000:
            raise ModelInputError("source record: files must be a list of names")
        if len(json.dumps(dict(lineage), default=str)) > 64 * 1024:
            raise ModelInputError("source record: lineage larger than 64 KiB")
        pinned = {k: pin.get(k) for k in ("value", "repo", "rev")}
        check_reference(pinned["value"], pinned["repo"], pinned["rev"])  # what the resolver will be given
        check_reference(text["ref"], d.get("repo"), d.get("rev"))
        return cls(**text, pin=pinned, files=tuple(files), fingerprint=fp, lineage=dict(lineage),
                   repo=d.get("repo"), rev=d.get("rev"))


def prepare_source(value: "str | os.PathLike[str]", *, repo: str | None = None, rev: str | None = None,
                   settings: Any = None) -> tuple[SourceRecord, ModelInput]:
    """Resolve a model reference once and record what it names (checks that the checkpoint opens)."""
    from quant.fingerprint import weights_fingerprint  # lazy: numba kernels load at first use

    src = resolve_model(value, repo=repo, rev=rev, settings=settings)
    ident = source_identity(src.path)
    rec = SourceRecord(ref=os.fspath(value), kind=src.kind, resolved=src.ref, name=src.name, pin=src.pin(),
                       checkpoint_kind=ident["kind"], sha256=ident["sha256"], files=tuple(ident["files"]),
                       fingerprint=weights_fingerprint(src.path), lineage=dict(src.lineage), repo=repo, rev=rev)
    return rec, src


def open_source(record: SourceRecord, *, settings: Any = None) -> ModelInput:
    """The recorded source, resolved here by its pin, refused unless its SHA-256 is the recorded one."""
    pin = record.pin
    got = resolve_model(str(pin["value"]), repo=pin.get("repo"), rev=pin.get("rev"), settings=settings)
    if got.kind != record.kind:
        raise ModelInputError(f"{one_line(record.resolved, 200)}: resolves to a {got.kind} source here, recorded "
                              f"as {record.kind}")
    sha = source_identity(got.path)["sha256"]
    if sha != record.sha256:
        raise ModelInputError(f"{one_line(record.resolved, 200)} changed since it was resolved (sha256 {sha[:16]}, "
                              f"recorded {record.sha256[:16]}): resolve it again (`dvc repro` re-runs prepare)")
    return record.model_input(got.path)


def model_or_source(model: "str | os.PathLike[str] | None", source: "str | os.PathLike[str] | None",
                    what: str = "--model") -> ModelInput:
    """What a DVC stage reads: a plain path, or the source of a source.json (resolved here, SHA-256 checked)."""
    if (model is None) == (source is None):
        raise ModelInputError(f"pass exactly one of {what} and --source (the prepare stage's source.json)")
    if source is None:
        p = Path(model)  # type: ignore[arg-type]
        return ModelInput(p, os.fspath(p), "path", p.name)
    return open_source(read_source(source))


def write_source(record: SourceRecord, path: "str | os.PathLike[str]") -> None:
    """source.json: the record as sorted, indented JSON (same source -> same bytes), written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n")


def read_source(path: "str | os.PathLike[str]") -> SourceRecord:
    """A source.json written by the prepare stage (at most 1 MiB, a regular file); ModelInputError otherwise."""
    try:
        data = json.loads(read_regular_bytes(path, MAX_SOURCE_BYTES).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelInputError(f"source record {one_line(path, 200)}: {one_line(e, 200)} (the prepare stage writes "
                              "it)") from None
    return SourceRecord.from_dict(data)


__all__ = ["SourceRecord", "prepare_source", "open_source", "model_or_source", "write_source", "read_source"]
