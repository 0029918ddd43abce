"""Load calibration / evaluation text (JSONL or plain text) and report what is wrong with it.

Formats:
  .jsonl / .ndjson  one JSON object a line. Only `text` (a string) is required; `id` defaults to "<stem>-<line>",
                    `category` to "default", `source` to "<file name>:<line>". With strict_schema=True the shipped
                    schema is enforced: id, category, text and source must all be present.
  .txt              samples separated by blank lines (a paragraph = a sample); one_per_line=True makes every
                    non-empty line its own sample.
A file that cannot be used at all (missing, wrong extension, not UTF-8, no usable sample) raises DatasetError.
Anything else (bad JSON lines, empty or duplicate texts, over-long samples, missing fields) is listed in
Dataset.problems and Dataset.report(), so a caller decides whether to go on.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import QuantGateError
from core.regular_file import FileTooLargeError, NotRegularFileError, read_regular_bytes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIBRATION = REPO / "data" / "calibration.jsonl"
DEFAULT_EVAL = REPO / "data" / "eval.jsonl"
DEFAULT_CATEGORY = "default"
DEFAULT_MAX_CHARS = 8000
DEFAULT_MAX_TOKENS = 512
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt",)
SCHEMA_FIELDS = ("id", "category", "text", "source")
#: Hard limits (DatasetError, checked before the text is split or tokenized): calibration and evaluation sets are
#: a few MB of samples of a few thousand characters. A 40 MB one-line file used to take 5.7 GB.
MAX_DATASET_BYTES = 64 * 1024 * 1024
MAX_SAMPLE_CHARS = 200_000      # one sample (one JSONL line, or one paragraph); DEFAULT_MAX_CHARS is the soft check
MAX_SAMPLES = 200_000


class DatasetError(QuantGateError, ValueError):
    """A dataset file that cannot be used at all (missing, unreadable, wrong format, nothing usable in it)."""


@dataclass(frozen=True)
class Sample:
    """One text sample: a stable id, a category for per-category metrics, the text, and where it came from."""

    id: str
    category: str
    text: str
    source: str


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset; kind: empty|duplicate|too_long|missing_field|bad_json|bad_field|duplicate_id."""

    kind: str
    message: str
    line: int | None = None
    sample_id: str | None = None


@dataclass
class Dataset:
    """Samples read from one file, the sha256 of their canonical content, and the problems found."""

    samples: list[Sample]
    sha256: str
    path: Path | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def categories(self) -> dict[str, int]:
        """Sample count per category, in first-seen order."""
        out: dict[str, int] = {}
        for s in self.samples:
            out[s.category] = out.get(s.category, 0) + 1
        return out

    def usable(self) -> list[Sample]:
        """Samples worth feeding a model: non-empty, and only the first of each duplicate text."""
        seen: set[str] = set()
        out = []
        for s in self.samples:
            key = normalize_text(s.text)
            if key and key not in seen:
                seen.add(key)
                out.append(s)
        return out

    def report(self) -> str:
        """A human-readable summary: counts, categories, hash, then one line per problem."""
        cats = ", ".join(f"{c}={n}" for c, n in self.categories().items())
        lines = [f"{self.path or '<memory>'}: {len(self.samples)} samples ({cats}), sha256 {self.sha256[:16]}",
                 "no problems found" if self.ok else f"{len(self.problems)} problem(s):"]
        for p in self.problems:
            where = f"line {p.line}: " if p.line is not None else ""
            lines.append(f"  [{p.kind}] {where}{p.message}")
        return "\n".join(lines)


def normalize_text(text: str) -> str:
    """Whitespace-normalized text (runs of whitespace -> one space, stripped): the key for duplicate checks."""
    return " ".join(text.split())


def canonical_sha256(samples: Sequence[Sample]) -> str:
    """sha256 of the samples as sorted-key compact JSON lines: independent of file format and formatting."""
    h = hashlib.sha256()
    for s in samples:
        rec = {"id": s.id, "category": s.category, "text": s.text, "source": s.source}
        h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
    return h.hexdigest()


def _read_text(path: Path, max_bytes: int) -> str:
    """The file's text as UTF-8 (a BOM is allowed), or DatasetError: only regular files (a FIFO or device is refused
    before any blocking read: core.regular_file), at most max_bytes bytes."""
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    try:
        data = read_regular_bytes(path, max_bytes)
    except NotRegularFileError:
        raise DatasetError(f"dataset is not a file: {path} (only regular files are read: no folder, FIFO or device)") \
            from None
    except FileTooLargeError as e:
        if e.size < 0:
            raise DatasetError(f"dataset {path} grew past the {max_bytes} bytes allowed while being read") from None
        raise DatasetError(f"dataset {path} has {e.size} bytes, more than the {max_bytes} allowed") from None
    except OSError as e:
        raise DatasetError(f"cannot open dataset {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"dataset is not UTF-8 text: {path} (byte {e.start})") from None


def _check_lines(path: Path, raw: str, max_sample_chars: int) -> None:
    """Refuse a line longer than a sample may be, before it is parsed or split into words (JSON escapes and the
    other fields get 2x + 4096 characters of room)."""
    limit = 2 * max_sample_chars + 4096
    start = 0
    n = len(raw)
    lineno = 1
    while start < n:
        end = raw.find("\n", start)
        if end == -1:
            end = n
        if end - start > limit:
            raise DatasetError(f"dataset {path}: line {lineno} has {end - start} characters, more than a sample "
                               f"may have ({max_sample_chars} characters)")
        start = end + 1
        lineno += 1


def _check_rows(path: Path, rows: list[tuple[int, "Sample"]], max_sample_chars: int, max_samples: int) -> None:
    if len(rows) > max_samples:
        raise DatasetError(f"dataset {path} has {len(rows)} samples, more than the {max_samples} allowed")
    for lineno, s in rows:
        if len(s.text) > max_sample_chars:
            raise DatasetError(f"dataset {path}: sample {s.id[:80]!r} (line {lineno}) has {len(s.text)} characters, "
                               f"more than the {max_sample_chars} allowed")


def _parse_jsonl(path: Path, raw: str, strict_schema: bool) -> tuple[list[tuple[int, Sample]], list[Problem]]:
    """Parse JSONL lines into (line number, Sample); bad lines become problems."""
    out, problems = [], []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem("bad_json", f"invalid JSON ({e.msg} at column {e.colno})", lineno))
            continue
        if not isinstance(rec, dict):
            problems.append(Problem("bad_json", f"expected a JSON object, got {type(rec).__name__}", lineno))
            continue
        missing = [f for f in (SCHEMA_FIELDS if strict_schema else ("text",)) if f not in rec]
        if missing:
            problems.append(Problem("missing_field", f"missing field(s): {', '.join(missing)}", lineno,
                                    str(rec.get("id")) if "id" in rec else None))
            if "text" in missing:
                continue
        bad = [f for f in SCHEMA_FIELDS if f in rec and not isinstance(rec[f], str)]
        if bad:
            problems.append(Problem("bad_field", f"field(s) must be strings: {', '.join(bad)}", lineno))
            if "text" in bad:
                continue
        sid = rec.get("id") if isinstance(rec.get("id"), str) else f"{path.stem}-{lineno}"
        cat = rec.get("category") if isinstance(rec.get("category"), str) else DEFAULT_CATEGORY
        src = rec.get("source") if isinstance(rec.get("source"), str) else f"{path.name}:{lineno}"
        out.append((lineno, Sample(sid, cat, rec["text"], src)))
    return out, problems


def _parse_txt(path: Path, raw: str, one_per_line: bool) -> list[tuple[int, Sample]]:
    """Split plain text into samples: paragraphs (blank-line separated) or, with one_per_line, non-empty lines."""
    out: list[tuple[int, Sample]] = []
    block: list[str] = []
    start = 0

    def emit() -> None:
        n = len(out) + 1
        out.append((start, Sample(f"{path.stem}-{n:04d}", DEFAULT_CATEGORY, "\n".join(block), f"{path.name}:{start}")))

    for lineno, line in enumerate(raw.splitlines(), start=1):
        if one_per_line:
            if line.strip():
                block, start = [line], lineno
                emit()
            continue
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            emit()
            block = []
    if block and not one_per_line:
        emit()
    return out


def _content_problems(rows: list[tuple[int, Sample]], max_chars: int,
                      tokenizer: Callable[[str], Sequence[int]] | None, max_tokens: int) -> list[Problem]:
    """Empty, duplicate (text or id) and over-long samples."""
    problems: list[Problem] = []
    first_text: dict[str, str] = {}
    first_id: dict[str, int] = {}
    for lineno, s in rows:
        key = normalize_text(s.text)
        if not key:
            problems.append(Problem("empty", f"sample {s.id!r} has no text", lineno, s.id))
            continue
        if key in first_text:
            problems.append(Problem("duplicate", f"sample {s.id!r} repeats the text of {first_text[key]!r} "
                                                 "(after whitespace normalization)", lineno, s.id))
        else:
            first_text[key] = s.id
        if s.id in first_id:
            problems.append(Problem("duplicate_id", f"id {s.id!r} already used on line {first_id[s.id]}", lineno, s.id))
        else:
            first_id[s.id] = lineno
        if tokenizer is not None:
            n = len(tokenizer(s.text))
            if n > max_tokens:
                problems.append(Problem("too_long", f"sample {s.id!r} has {n} tokens (max {max_tokens})", lineno, s.id))
        elif len(s.text) > max_chars:
            problems.append(Problem("too_long", f"sample {s.id!r} has {len(s.text)} characters (max {max_chars})",
                                    lineno, s.id))
    return problems


def load_dataset(path: str | Path, *, max_chars: int = DEFAULT_MAX_CHARS,
                 tokenizer: Callable[[str], Sequence[int]] | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                 one_per_line: bool = False, strict_schema: bool = False,
                 max_bytes: int | None = None, max_sample_chars: int | None = None,
                 max_samples: int | None = None) -> Dataset:
    """Read a .jsonl/.ndjson or .txt dataset; raise DatasetError when unusable, list every other problem.

    Over-long means more than max_chars characters, or more than max_tokens tokens when `tokenizer`
    (a callable text -> token ids, e.g. a SentencePiece processor's encode) is given: a problem, not an error.
    Hard limits raise DatasetError before the text is split or tokenized: file bytes (max_bytes, default
    MAX_DATASET_BYTES), characters of one sample (max_sample_chars, MAX_SAMPLE_CHARS) and samples (max_samples,
    MAX_SAMPLES).
    """
    max_bytes = MAX_DATASET_BYTES if max_bytes is None else max_bytes
    max_sample_chars = MAX_SAMPLE_CHARS if max_sample_chars is None else max_sample_chars
    max_samples = MAX_SAMPLES if max_samples is None else max_samples
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in JSONL_SUFFIXES + TEXT_SUFFIXES:
        raise DatasetError(f"unsupported dataset format {suffix or '(no extension)'!r}: {p} "
                           f"(use {', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES)})")
    raw = _read_text(p, max_bytes)
    _check_lines(p, raw, max_sample_chars)
    if suffix in JSONL_SUFFIXES:
        rows, problems = _parse_jsonl(p, raw, strict_schema)
    else:
        rows, problems = _parse_txt(p, raw, one_per_line), []
    _check_rows(p, rows, max_sample_chars, max_samples)
    problems += _content_problems(rows, max_chars, tokenizer, max_tokens)
    problems.sort(key=lambda q: (q.line if q.line is not None else 0))
    samples = [s for _, s in rows]
    if not any(normalize_text(s.text) for s in samples):
        first = f"; first problem: line {problems[0].line}: {problems[0].message}" if problems else ""
        raise DatasetError(f"no usable samples in {p}{first}")
    return Dataset(samples=samples, sha256=canonical_sha256(samples), path=p, problems=problems)
