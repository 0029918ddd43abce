"""Split GGUFs as llama.cpp writes and reads them (tools/gguf-split/gguf-split.cpp, llama_model_loader).

Layout: parts named PREFIX-00001-of-0000N.gguf (llama_split_path); the first part holds every metadata KV, then
split.no (u16), split.tensors.count (i32) and split.count (u16); the other parts hold only those three KVs; tensors
keep their order across the parts, each part's data laid out as in a single file (aligned to 32, offsets from its
own data section). Parts are cut like llama-gguf-split: --split-max-tensors N starts a part at every N-th tensor,
--split-max-size S starts one before a tensor whose padded bytes would take the part's tensor data past S.

Reading: any part names the set (its name gives the prefix and the count); every part must exist, parse, carry
split.no == its index and the same split.count, the tensor names must be unique across parts and their number must
equal split.tensors.count. Anything else is one CheckpointError naming the part and the rule.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from gguf.constants import GGUFValueType

from core.atomic import atomic_publish_many
from core.errors import CheckpointError, GGUFFormatError, QuantGateError
from core.hashing import combined_sha256
from quant.gguf_kv import KV
from quant.gguf_reader import GGUF_DEFAULT_ALIGNMENT, GGUFFile, TensorInfo, gguf_pad, read_gguf
from quant.gguf_writer import TensorSpec, WriteResult, build_metadata, write_gguf

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = "split.no", "split.count", "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT)
MAX_PARTS = 65535                         # split.count is a u16
_PART_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG])\s*$", re.IGNORECASE)
_UNITS = {"K": 1000, "M": 1000 ** 2, "G": 1000 ** 3}
_INT_MAX = 2 ** 31 - 1                    # llama-gguf-split reads the number with sscanf("%d")


class SplitError(QuantGateError):
    """A split request or split file set that cannot be honoured (one error line, exit 2)."""


def split_path(prefix: "str | os.PathLike[str]", i: int, n: int) -> Path:
    """llama_split_path: part i (from 0) of n is PREFIX-%05d-of-%05d.gguf with i + 1."""
    return Path(f"{os.fspath(prefix)}-{i + 1:05d}-of-{n:05d}.gguf")


def split_prefix(out: "str | os.PathLike[str]") -> Path:
    """The prefix `quantize --out model.gguf --split-*` writes model-0000i-of-0000N.gguf under (".gguf" dropped)."""
    s = os.fspath(out)
    return Path(s[:-5] if s.lower().endswith(".gguf") and len(Path(s).name) > 5 else s)


def parse_part_name(path: "str | os.PathLike[str]") -> tuple[Path, int, int] | None:
    """(prefix, index from 0, count) when the file name is a llama.cpp split part name, else None."""
    p = Path(path)
    m = _PART_RE.match(p.name)
    if not m:
        return None
    no, count = int(m["no"]), int(m["count"])
    if not 1 <= no <= count:
        return None
    return p.with_name(m["prefix"]), no - 1, count


def parse_split_size(text: str) -> int:
    """--split-max-size: a positive whole number with a K, M or G suffix (decimal units, as llama-gguf-split's
    M/G: 2G = 2,000,000,000 bytes); anything else is refused."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise SplitError(f"--split-max-size {text!r}: expected a whole number with a K, M or G suffix, e.g. 2G")
    n = int(m[1])
    if not 0 < n <= _INT_MAX:
        raise SplitError(f"--split-max-size {text!r}: the number must be between 1 and {_INT_MAX}")
    return n * _UNITS[m[2].upper()]


def split_options(max_size: "str | int | None" = None, max_tensors: "int | None" = None) -> dict[str, int]:
    """The split fields of a QuantizeRequest ({split_max_bytes} or {split_max_tensors}; {} for one file) from the
    user's --split-max-size (2G, 500M; an int is bytes) / --split-max-tensors: the one parser every entry point
    (quantize, run, submit, DVC stages, the Celery task) uses, so each refuses the same bad values the same way."""
    if max_size is not None and max_tensors is not None:
        raise SplitError("give either --split-max-size or --split-max-tensors, not both")
    if max_tensors is not None:
        if isinstance(max_tensors, bool) or not isinstance(max_tensors, int) or not 0 < max_tensors <= _INT_MAX:
            raise SplitError(f"--split-max-tensors {max_tensors!r}: must be a positive number of tensors")
        return {"split_max_tensors": max_tensors}
    if max_size is None:
        return {}
    if isinstance(max_size, bool) or not isinstance(max_size, (int, str)):
        raise SplitError(f"--split-max-size {max_size!r}: expected a size such as 2G")
    if isinstance(max_size, int):
        if not 0 < max_size <= _INT_MAX * _UNITS["G"]:
            raise SplitError(f"--split-max-size {max_size}: must be a positive number of bytes")
        return {"split_max_bytes": max_size}
    return {"split_max_bytes": parse_split_size(max_size)}


def check_split_fields(d: "Mapping[str, Any] | None") -> dict[str, int]:
    """split fields received from outside (a Celery message, a JobSpec dict): only the two known keys, valid values."""
    if not d:
        return {}
    if not isinstance(d, Mapping) or set(d) - {"split_max_bytes", "split_max_tensors"}:
        raise SplitError(f"split options: expected split_max_bytes or split_max_tensors, got {sorted(map(str, d))}"
                         if isinstance(d, Mapping) else "split options: expected a mapping")
    return split_options(d.get("split_max_bytes"), d.get("split_max_tensors"))


def split_tag(split: "Mapping[str, int]") -> str:
    """A short file-name-safe tag of the split options ('' for one file): job folders differ per layout."""
    if "split_max_tensors" in split:
        return f"split-{split['split_max_tensors']}t"
    if "split_max_bytes" in split:
        return f"split-{split['split_max_bytes']}b"
    return ""


def plan_parts(nbytes: Sequence[int], *, max_bytes: int | None = None, max_tensors: int | None = None,
               alignment: int = GGUF_DEFAULT_ALIGNMENT) -> list[list[int]]:
    """Indices of the tensors in each part, cut exactly as llama-gguf-split's split_strategy cuts them."""
    if (max_bytes is None) == (max_tensors is None):
        raise SplitError("give exactly one of --split-max-size and --split-max-tensors")
    if max_tensors is not None and not 0 < max_tensors <= _INT_MAX:
        raise SplitError(f"--split-max-tensors {max_tensors}: must be a positive number of tensors")
    if max_bytes is not None and max_bytes <= 0:
        raise SplitError(f"--split-max-size {max_bytes}: must be positive")
    n = len(nbytes)
    if n == 0:
        raise SplitError("a split GGUF needs at least one tensor")
    parts: list[list[int]] = [[]]
    cur = 0
    for i, size in enumerate(nbytes):
        padded = gguf_pad(int(size), alignment)
        if max_bytes is not None:
            cut = cur + padded > max_bytes
        else:
            cut = 0 < i < n and i % max_tensors == 0
        if cut:
            if not parts[-1]:
                raise SplitError(f"one of the splits would have 0 tensors: --split-max-size {max_bytes} bytes is "
                                 f"smaller than the first tensor ({padded} bytes)")
            parts.append([])
            cur = padded
        else:
            cur += padded
        parts[-1].append(i)
    if len(parts) > MAX_PARTS:
        raise SplitError(f"the split would have {len(parts)} parts; GGUF's split.count allows at most {MAX_PARTS}")
    return parts


def split_kv(i: int, n: int, n_tensors: int) -> list[KV]:
    """The split.* KVs of part i of n in llama-gguf-split's order: split.no (u16), split.tensors.count (i32),
    split.count (u16) (it sets split.count last, once the number of parts is known, and gguf_set_val re-appends)."""
    return [KV(SPLIT_NO, i, GGUFValueType.UINT16), KV(SPLIT_TENSORS_COUNT, n_tensors, GGUFValueType.INT32),
            KV(SPLIT_COUNT, n, GGUFValueType.UINT16)]


@dataclass
class SplitWriteResult:
    """What a split write published: every part's WriteResult (in order) and the set's identity."""

    parts: list[WriteResult]
    sha256: str               # core.hashing.combined_sha256 over the parts (what checkpoint_sha256 gives them)

    @property
    def path(self) -> Path:
        return self.parts[0].path

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.parts)

    @property
    def seconds(self) -> dict[str, float]:
        """Where the time went (produce / hash / write), summed over the parts."""
        out: dict[str, float] = {}
        for r in self.parts:
            for k, v in r.seconds.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def part_records(self) -> list[dict]:
        """[{path, sha256, nbytes}] per part, for artifact records and audit events."""
        return [{"path": str(r.path), "sha256": r.sha256, "nbytes": r.nbytes} for r in self.parts]


def write_split_gguf(prefix: "str | os.PathLike[str]", *, kv: Sequence[KV], tensors: Sequence[TensorSpec],
                     parts: Sequence[Sequence[int]], on_tensor: Callable[[int, int, str], None] | None = None,
                     before_publish: Callable[[SplitWriteResult], None] | None = None) -> SplitWriteResult:
    """Write `tensors` as the split GGUF PREFIX-0000i-of-0000N.gguf, `parts` giving each part's tensor indices.

    All-or-nothing as far as files allow: every part is written and fsynced under a temp name first (invalid input
    fails before any byte is written); `before_publish(result)` runs then (the pipeline's audit event); then the
    parts are renamed into place, the first part (the one llama.cpp and quantgate open) last. A failure before or
    during the renames removes every temp and every part already renamed. A process killed between two renames can
    leave parts 2..k without part 1 (no loader opens those; the next write into the folder removes dead writers'
    temps, not those parts)."""
    n = len(parts)
    if n == 0 or n > MAX_PARTS:
        raise SplitError(f"a split GGUF has 1 to {MAX_PARTS} parts, not {n}")
    kv = [k for k in kv if k.key not in SPLIT_KEYS]
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise GGUFFormatError(f"duplicate tensor name {t.name!r}")
        seen.add(t.name)
    if sorted(j for g in parts for j in g) != list(range(len(tensors))):
        raise SplitError("the parts must hold every tensor exactly once")
    specs = [[tensors[j] for j in group] for group in parts]
    metas = [(list(kv) if i == 0 else []) + split_kv(i, n, len(tensors)) for i in range(n)]
    for m, s in zip(metas, specs):
        build_metadata(m, s)  # validates every part before anything is written
    targets = [split_path(prefix, i, n) for i in range(n)]
    done = 0

    def progress(k: int, _total: int, name: str) -> None:
        if on_tensor is not None:
            on_tensor(done + k, len(tensors), name)

    results: list[WriteResult] = []
    with atomic_publish_many(targets, first_last=True) as temps:
        for tmp, m, s in zip(temps, metas, specs):
            results.append(write_gguf(tmp, kv=m, tensors=s, on_tensor=progress))
            done += len(s)
        out = SplitWriteResult(
            [WriteResult(t, r.sha256, r.nbytes, r.tensor_offsets) for t, r in zip(targets, results)],
            combined_sha256({t.name: r.sha256 for t, r in zip(targets, results)}))
        if before_publish is not None:
            before_publish(out)
    return out


def _u(g: GGUFFile, key: str) -> int | None:
    v = g.value(key)
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None


def part_paths(path: "str | os.PathLike[str]", g: GGUFFile) -> list[Path] | None:
    """Every part's path when `g` (parsed from `path`) is a part of a split GGUF, in order; None for a plain GGUF.
    A split.count the name contradicts, or a split file whose name is not a part name, raises CheckpointError."""
    p = Path(path)
    kv = g.get(SPLIT_COUNT)
    count = _u(g, SPLIT_COUNT)
    named = parse_part_name(p)
    if kv is not None and count is None:
        raise CheckpointError(f"{p}: {SPLIT_COUNT} is not an integer")
    if count is None or (count <= 1 and named is None):
        return None
    if named is None:
        raise CheckpointError(f"{p}: {SPLIT_COUNT} is {count} but the file name is not a split part name "
                              "(PREFIX-00001-of-0000N.gguf), so the other parts cannot be found")
    prefix, _idx, name_count = named
    if name_count != count:
        raise CheckpointError(f"{p}: the file name says {name_count} parts but {SPLIT_COUNT} is {count}")
    return [split_path(prefix, i, count) for i in range(count)]


def check_parts(parts: Sequence[GGUFFile]) -> list[str]:
    """What llama_model_loader checks across a split's parts: split.no == index, one split.count, unique tensor
    names, split.tensors.count == the number of tensors. Returns the problems (empty when the set is sound)."""
    problems: list[str] = []
    names: set[str] = set()
    for i, g in enumerate(parts):
        if _u(g, SPLIT_NO) != i:
            problems.append(f"{g.path.name}: {SPLIT_NO} is {g.value(SPLIT_NO)!r}, expected {i}")
        if _u(g, SPLIT_COUNT) != len(parts):
            problems.append(f"{g.path.name}: {SPLIT_COUNT} is {g.value(SPLIT_COUNT)!r}, expected {len(parts)}")
        for t in g.tensors:
            if t.name in names:
                problems.append(f"{g.path.name}: tensor {t.name!r} is duplicated across the split's parts")
            names.add(t.name)
    want = _u(parts[0], SPLIT_TENSORS_COUNT)
    if want != len(names):
        problems.append(f"{parts[0].path.name}: {SPLIT_TENSORS_COUNT} is {parts[0].value(SPLIT_TENSORS_COUNT)!r} "
                        f"but the {len(parts)} parts hold {len(names)} tensors")
    return problems


def refuse_split(path: "str | os.PathLike[str]", what: str) -> None:
    """Raise CheckpointError when `path` is a part of a split GGUF: for the commands that read one file only."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() != ".gguf":
        return
    try:
        with read_gguf(p) as g:
            split = _u(g, SPLIT_COUNT) or 0
    except GGUFFormatError:
        return  # the command's own reader reports it
    if split > 1:
        raise CheckpointError(f"{p} is part of a {split}-part split GGUF; {what} reads single-file GGUFs: merge the "
                              "parts first (llama-gguf-split --merge)")


def open_gguf_parts(path: "str | os.PathLike[str]") -> list[GGUFFile]:
    """Open a GGUF, or every part of the split GGUF `path` is a part of (any part may be given), checking the set
    (check_parts); the first problem is a CheckpointError naming the part (an unparseable part: GGUFFormatError).
    Returns the parsed files in part order (one for a plain file); the caller closes them."""
    p = Path(path)
    opened: list[GGUFFile] = []

    def read(part: Path, what: str) -> GGUFFile:
        if not part.exists():
            raise CheckpointError(f"{part}: {what} is missing")
        g = read_gguf(part)  # GGUFFormatError as it is (the loaders turn it into a CheckpointError)
        opened.append(g)
        return g

    try:
        first = read(p, "the GGUF file")
        paths = part_paths(p, first)
        if paths is None:
            return opened
        parts = [first if q.name == p.name else read(q, f"part {i + 1} of {len(paths)} of the split GGUF")
                 for i, q in enumerate(paths)]
        problems = check_parts(parts)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise CheckpointError(f"invalid split GGUF {paths[0]}: {problems[0]}{more}")
        return parts
    except BaseException:
        for g in opened:
            g.close()
        raise


class GGUFSet:
    """A split GGUF read as one file: the first part's metadata, every part's tensors in order, each tensor's data
    read from the part that holds it. Offers the read side of GGUFFile (get, value, tensor, tensor_data, release,
    close) so the readers built for one file (quant.gguf_to_hf, runtime, validation) take a split set unchanged."""

    def __init__(self, parts: Sequence[GGUFFile]) -> None:
        self.parts = list(parts)
        first = self.parts[0]
        self.path, self.version, self.alignment, self.kv = first.path, first.version, first.alignment, first.kv
        self.tensors: list[TensorInfo] = [t for g in self.parts for t in g.tensors]
        self.file_size = sum(g.file_size for g in self.parts)
        self.problems: list[str] = [m for g in self.parts for m in g.problems]
        self._owner = {t.name: g for g in self.parts for t in g.tensors}

    @property
    def files(self) -> list[Path]:
        """Every part's path, in order."""
        return [g.path for g in self.parts]

    def get(self, key: str) -> KV | None:
        return self.parts[0].get(key)

    def value(self, key: str, default: Any = None) -> Any:
        return self.parts[0].value(key, default)

    def tensor(self, name: str) -> TensorInfo:
        return self._owner[name].tensor(name)

    def tensor_data(self, name: "str | TensorInfo") -> np.ndarray:
        """The tensor's stored bytes, a read-only view of the part that holds it."""
        key = name.name if isinstance(name, TensorInfo) else name
        g = self._owner.get(key)
        if g is None:
            raise KeyError(key)
        return g.tensor_data(g.tensor(key) if not isinstance(name, TensorInfo) else name)

    def release(self, t: "TensorInfo | None" = None) -> None:
        """GGUFFile.release on the part holding `t` (None: on every part)."""
        for g in (self.parts if t is None else [self._owner[t.name]]):
            g.release(t)

    def close(self) -> None:
        for g in self.parts:
            g.close()

    def __enter__(self) -> "GGUFSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_gguf(path: "str | os.PathLike[str]") -> "GGUFFile | GGUFSet":
    """read_gguf for a plain GGUF; for any part of a split GGUF the checked set (open_gguf_parts) as one GGUFSet.
    Raises GGUFFormatError for an unparseable file, CheckpointError for a broken part set."""
    parts = open_gguf_parts(path)
    return parts[0] if len(parts) == 1 else GGUFSet(parts)


def gguf_files(path: "str | os.PathLike[str]") -> list[Path]:
    """The files a GGUF consists of: [path] for a plain file, every part in order for any part of a split GGUF
    (named as llama.cpp names them; whether they exist and agree is open_gguf_parts' check)."""
    p = Path(path)
    try:
        with read_gguf(p, strict=False) as g:
            paths = part_paths(p, g)
    except GGUFFormatError:
        return [p]
    return paths if paths is not None else [p]


def first_part(path: "str | os.PathLike[str]") -> Path:
    """The file llama.cpp must be given for `path`: the first part of the split GGUF any part of which is `path`
    (llama_model_loader finds the rest from its name), else `path` itself."""
    return gguf_files(path)[0]


__all__ = ["GGUFSet", "open_gguf", "gguf_files", "first_part", "SPLIT_KEYS", "MAX_PARTS", "SplitError",
           "SplitWriteResult", "split_path", "split_prefix", "parse_part_name", "parse_split_size", "plan_parts", "split_kv", "write_split_gguf", "part_paths",
           "check_parts", "open_gguf_parts", "refuse_split"]
