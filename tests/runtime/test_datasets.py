"""runtime.datasets: loading JSONL/.txt, the problems report, and the shipped calibration/eval files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import QuantGateError
from runtime.datasets import (
    DEFAULT_CALIBRATION,
    DEFAULT_EVAL,
    REPO,
    Dataset,
    DatasetError,
    Sample,
    canonical_sha256,
    load_dataset,
    normalize_text,
)

MANIFEST = REPO / "models" / "reference" / "train_manifest.json"


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def kinds(ds: Dataset) -> list[str]:
    return [p.kind for p in ds.problems]


# ------------------------------------------------------------------------------------------------- JSONL loading
def test_full_schema_roundtrip(tmp_path):
    recs = [{"id": "a", "category": "code", "text": "x = 1", "source": "s1"},
            {"id": "b", "category": "chat", "text": "User: hi\nAssistant: hello", "source": "s2"}]
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", recs), strict_schema=True)
    assert ds.ok, ds.report()
    assert ds.samples == [Sample("a", "code", "x = 1", "s1"), Sample("b", "chat", "User: hi\nAssistant: hello", "s2")]
    assert ds.categories() == {"code": 1, "chat": 1}
    assert ds.path == tmp_path / "d.jsonl"
    assert "no problems found" in ds.report()


def test_text_only_jsonl_gets_defaults(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "user.jsonl", [{"text": "first"}, {"text": "second", "extra": 3}]))
    assert ds.ok
    assert [s.category for s in ds.samples] == ["default", "default"]
    assert [s.id for s in ds.samples] == ["user-1", "user-2"]
    assert ds.samples[1].source == "user.jsonl:2"


def test_strict_schema_reports_missing_fields(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"text": "hello there"}]), strict_schema=True)
    assert kinds(ds) == ["missing_field"]
    assert "id, category, source" in ds.problems[0].message and ds.problems[0].line == 1


def test_bad_json_lines_reported_with_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "good one"}\n{"text": broken\n\n[1, 2]\n{"text": "good two"}\n', encoding="utf-8")
    ds = load_dataset(p)
    assert [(q.kind, q.line) for q in ds.problems] == [("bad_json", 2), ("bad_json", 4)]
    assert [s.text for s in ds.samples] == ["good one", "good two"]
    assert "line 2" in ds.report() and "[bad_json]" in ds.report()


def test_missing_text_and_wrong_types(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", [{"id": "x"}, {"text": 5}, {"text": "ok", "category": 7}]))
    assert [(q.kind, q.line) for q in ds.problems] == [("missing_field", 1), ("bad_field", 2), ("bad_field", 3)]
    assert [s.text for s in ds.samples] == ["ok"] and ds.samples[0].category == "default"


def test_empty_duplicate_and_duplicate_id(tmp_path):
    recs = [{"id": "a", "text": "same  text\n"}, {"id": "b", "text": "   "}, {"id": "c", "text": " same text"},
            {"id": "a", "text": "other"}]
    ds = load_dataset(write_jsonl(tmp_path / "d.jsonl", recs))
    assert [(q.kind, q.line) for q in ds.problems] == [("empty", 2), ("duplicate", 3), ("duplicate_id", 4)]
    assert "'a'" in ds.problems[1].message  # names the first occurrence
    assert [s.id for s in ds.usable()] == ["a", "a"] and [s.text for s in ds.usable()][1] == "other"


def test_over_long_by_chars_and_by_tokens(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a" * 50}, {"text": "word " * 5}])
    assert kinds(load_dataset(p, max_chars=40)) == ["too_long"]
    assert load_dataset(p).ok
    by_tokens = load_dataset(p, tokenizer=str.split, max_tokens=3)
    assert [(q.kind, q.line) for q in by_tokens.problems] == [("too_long", 2)]
    assert "5 tokens (max 3)" in by_tokens.problems[0].message


# ------------------------------------------------------------------------------------------------- plain text
def test_txt_paragraphs_and_lines(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("first para\nstill first\n\n\nsecond\n  \nthird\n", encoding="utf-8")
    ds = load_dataset(p)
    assert [s.text for s in ds.samples] == ["first para\nstill first", "second", "third"]
    assert [s.source for s in ds.samples] == ["notes.txt:1", "notes.txt:5", "notes.txt:7"]
    assert {s.category for s in ds.samples} == {"default"}
    lines = load_dataset(p, one_per_line=True)
    assert [s.text for s in lines.samples] == ["first para", "still first", "second", "third"]
    assert len({s.id for s in lines.samples}) == 4


def test_txt_duplicates_reported(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("alpha beta\n\nalpha   beta\n", encoding="utf-8")
    ds = load_dataset(p)
    assert [(q.kind, q.line) for q in ds.problems] == [("duplicate", 3)]


# ------------------------------------------------------------------------------------------------- unusable files
@pytest.mark.parametrize("name,content,needle", [
    ("missing.jsonl", None, "not found"),
    ("data.csv", "text\nhello\n", "unsupported dataset format"),
    ("bad.jsonl", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("empty.jsonl", "", "no usable samples"),
    ("allbad.jsonl", "{oops\n", "no usable samples"),
    ("blank.txt", "\n   \n", "no usable samples"),
])
def test_unusable_files_raise_one_line_error(tmp_path, name, content, needle):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError) as ei:
        load_dataset(p)
    assert isinstance(ei.value, QuantGateError)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_directory_is_not_a_dataset(tmp_path):
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    with pytest.raises(DatasetError, match="not a file"):
        load_dataset(d)


# ------------------------------------------------------------------------------------------------- hashing
def test_sha256_is_canonical_not_formatting(tmp_path):
    recs = [{"id": "a", "category": "c", "text": "t1", "source": "s"}]
    a = write_jsonl(tmp_path / "a.jsonl", recs)
    b = tmp_path / "b.jsonl"
    b.write_text("\n" + json.dumps(recs[0], indent=None, separators=(", ", " : "), sort_keys=True) + "\n\n")
    assert load_dataset(a).sha256 == load_dataset(b).sha256
    changed = write_jsonl(tmp_path / "c.jsonl", [dict(recs[0], text="t2")])
    assert load_dataset(changed).sha256 != load_dataset(a).sha256


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=5), st.text(max_size=30)), min_size=1, max_size=5))
def test_sha256_distinguishes_field_boundaries(pairs):
    samples = [Sample(i, "c", t, "s") for i, t in pairs]
    moved = [Sample(i + t[:1], "c", t[1:], "s") for i, t in pairs]
    assert (canonical_sha256(samples) == canonical_sha256(moved)) == (samples == moved)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=60))
def test_normalize_text_is_idempotent_and_whitespace_blind(text):
    n = normalize_text(text)
    assert normalize_text(n) == n
    assert normalize_text("  " + text.replace(" ", " \t ") + "\n") == n


# ------------------------------------------------------------------------------------------------- shipped data
@pytest.fixture(scope="module")
def shipped() -> tuple[Dataset, Dataset]:
    return load_dataset(DEFAULT_CALIBRATION, strict_schema=True), load_dataset(DEFAULT_EVAL, strict_schema=True)


def test_shipped_files_are_clean_and_sized(shipped):
    cal, ev = shipped
    for ds, n, per_cat in ((cal, 128, (42, 43)), (ev, 100, (33, 34))):
        assert ds.ok, ds.report()
        assert len(ds.samples) == n
        assert set(ds.categories()) == {"code", "chat", "math"}
        assert all(per_cat[0] <= c <= per_cat[1] for c in ds.categories().values()), ds.categories()
        assert len({s.id for s in ds.samples}) == n
        assert all(200 <= len(s.text) <= 1500 for s in ds.samples)
        assert all(s.source for s in ds.samples)


def test_shipped_calibration_and_eval_are_disjoint(shipped):
    cal, ev = shipped
    assert not {normalize_text(s.text) for s in cal.samples} & {normalize_text(s.text) for s in ev.samples}
    assert not {s.id for s in cal.samples} & {s.id for s in ev.samples}
    code_files = [{s.source.split("/")[-1].split(":")[0] for s in ds.samples if s.category == "code"} for ds in shipped]
    assert not code_files[0] & code_files[1]


def test_shipped_sets_do_not_overlap_training_text(shipped):
    import hashlib

    if not MANIFEST.exists():
        pytest.fail(f"{MANIFEST} missing: run scripts/train_reference_model.py")
    man = json.loads(MANIFEST.read_text(encoding="utf-8"))
    doc_hashes = {d["sha256"] for d in man["documents"]}
    train_files = set(man["train_code_files"])
    units = {c: set(h) for c, h in man["train_unit_hashes"].items()}
    assert len(doc_hashes) > 1000 and len(train_files) > 100 and min(len(u) for u in units.values()) > 1000
    for ds in shipped:
        for s in ds.samples:
            assert hashlib.sha256(s.text.encode()).hexdigest() not in doc_hashes, s.id
            if s.category == "code":
                assert s.source.split("/")[-1].split(":")[0] not in train_files, s.id
            else:
                for unit in s.text.split("\n\n"):
                    key = hashlib.sha256(normalize_text(unit).encode()).hexdigest()[:16]
                    assert key not in units[s.category], (s.id, unit)


def test_shipped_files_match_their_builder():
    """data/*.jsonl are exactly what scripts/build_datasets.py produces (nobody edited them by hand)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("build_datasets", REPO / "scripts" / "build_datasets.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_datasets", mod)  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(sys.modules["build_datasets"])
    mod = sys.modules["build_datasets"]
    corpus = mod.build()
    for built, path in ((corpus.calibration, DEFAULT_CALIBRATION), (corpus.eval, DEFAULT_EVAL)):
        assert canonical_sha256([Sample(s.id, s.category, s.text, s.source) for s in built]) == \
            load_dataset(path).sha256
