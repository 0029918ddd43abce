"""Issue 12 section 4: inputs that used to hang or eat memory are refused quickly, in bounded memory, with one short
error line. Memory is measured as the peak RSS of a fresh child process (ru_maxrss), time with a hard timeout."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "quantgate.cli"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "QUANTGATE_STORE_DIR": str(tmp_path / "store"),
            "QUANTGATE_CACHE_DIR": str(tmp_path / "cache"), "QUANTGATE_PARAMS": str(tmp_path / "no-params.yaml"),
            "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def cli(args: list[str], tmp_path: Path, timeout: float = 60, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                       env=_env(tmp_path, **env))
    return r, time.monotonic() - t0


def assert_one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[:2000]
    assert len(lines[0]) <= 600, len(lines[0])
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def peak_rss_mb(code: str, tmp_path: Path, timeout: float = 120) -> tuple[str, float]:
    """Run `code` in a fresh interpreter; return (its stdout, its peak RSS in MiB). The code prints its result."""
    wrapper = code + "\nimport resource\nprint('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    r = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=timeout,
                       cwd=tmp_path, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    out, rss = r.stdout.rsplit("RSS ", 1)
    return out, int(rss) / 1024


def baseline_rss_mb(imports: str, tmp_path: Path) -> float:
    return peak_rss_mb(imports, tmp_path)[1]


# --- FIFOs and devices ------------------------------------------------------------------------------------------

@pytest.fixture
def fifo(tmp_path):
    p = tmp_path / "model.gguf"
    os.mkfifo(p)
    return p


def test_fifo_as_model_is_refused_not_hung(fifo, tmp_path):
    r, dt = cli(["quantize", "--model", str(fifo), "--precision", "Q8_0", "--out", str(tmp_path / "o.gguf")],
                tmp_path, timeout=60)
    assert_one_error_line(r, "not a regular file")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_fifo_inside_an_hf_folder_is_refused(tmp_path, name):
    from core.errors import CheckpointError
    from quant.loaders import open_checkpoint
    from quantgate.sample import SampleShape, make_sample_checkpoint

    src = make_sample_checkpoint(tmp_path / "hf", SampleShape(n_layer=1, n_embd=64, n_ff=128, n_vocab=64), seed=1)
    (src / name).unlink()
    os.mkfifo(src / name)
    if name == "model.safetensors":  # a lone FIFO file named like the checkpoint
        _refused_in_thread(lambda: open_checkpoint(src / name), CheckpointError)
    _refused_in_thread(lambda: open_checkpoint(src), CheckpointError)


def _refused_in_thread(fn, exc_type, timeout: float = 20) -> BaseException:
    """fn() must raise exc_type within `timeout` seconds (a hang on a FIFO would block forever)."""
    box: list[BaseException | None] = []

    def go():
        try:
            fn()
            box.append(None)
        except BaseException as e:  # noqa: BLE001
            box.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():  # unblock the reader so the test process can exit, then fail
        pytest.fail("hung on a FIFO")
    assert box and isinstance(box[0], exc_type), box
    return box[0]


def test_device_and_fifo_datasets_and_gates_are_refused(fifo, tmp_path):
    from runtime.datasets import DatasetError, load_dataset
    from validation.thresholds import GateSpecError, load_gates

    ds = tmp_path / "eval.jsonl"
    os.mkfifo(ds)
    g = tmp_path / "gates.yaml"
    os.mkfifo(g)
    assert "regular file" in str(_refused_in_thread(lambda: load_dataset(ds), DatasetError))
    assert "regular file" in str(_refused_in_thread(lambda: load_gates(g), GateSpecError))
    assert "regular file" in str(_refused_in_thread(lambda: load_gates("/dev/zero"), GateSpecError))


# --- datasets ---------------------------------------------------------------------------------------------------

def test_huge_one_line_dataset_is_refused_in_bounded_memory(tmp_path):
    """40 MB on one line used to take 5.7 GB; now it is refused before being split into words."""
    big = tmp_path / "big.txt"
    big.write_bytes(b"word " * (8 * 1024 * 1024))
    base = baseline_rss_mb("import runtime.datasets", tmp_path)
    out, rss = peak_rss_mb(textwrap.dedent(f"""
        from runtime.datasets import DatasetError, load_dataset
        try:
            load_dataset({str(big)!r})
            print('ACCEPTED')
        except DatasetError as e:
            print('REFUSED', e)
    """), tmp_path)
    assert out.startswith("REFUSED") and "characters" in out, out[:500]
    assert rss - base < 300, f"peak RSS {rss:.0f} MiB (baseline {base:.0f})"


def test_dataset_file_and_sample_count_limits(tmp_path):
    from runtime import datasets as D

    big = tmp_path / "huge.jsonl"
    with open(big, "wb") as f:
        f.truncate(D.MAX_DATASET_BYTES + 1)   # sparse: size is checked before reading
    with pytest.raises(D.DatasetError, match="bytes"):
        D.load_dataset(big)
    many = tmp_path / "many.txt"
    many.write_text("\n".join(f"s{i}" for i in range(50)), encoding="utf-8")
    with pytest.raises(D.DatasetError, match="samples"):
        D.load_dataset(many, one_per_line=True, max_samples=10)
    assert len(D.load_dataset(many, one_per_line=True, max_samples=50).samples) == 50
    line = tmp_path / "line.jsonl"
    line.write_text(json.dumps({"text": "x" * 5000}) + "\n" + json.dumps({"text": "ok"}) + "\n", encoding="utf-8")
    with pytest.raises(D.DatasetError, match="characters"):
        D.load_dataset(line, max_sample_chars=1000)


# --- YAML -------------------------------------------------------------------------------------------------------

BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


def test_yaml_alias_bomb_gates_give_one_short_line(tmp_path):
    g = tmp_path / "gates.yaml"
    g.write_text(BOMB, encoding="utf-8")
    assert len(BOMB) < 800
    tiny = tmp_path / "x.gguf"
    tiny.write_bytes(b"GGUF")
    r, dt = cli(["validate", "--quantized", str(tiny), "--baseline", str(tiny), "--gates", str(g)], tmp_path)
    assert_one_error_line(r, "alias")
    assert dt < 30


@pytest.mark.parametrize("reader", ["load_gates", "read_params", "settings"])
def test_yaml_anchors_refused_everywhere(tmp_path, monkeypatch, reader):
    from core.errors import QuantGateError

    p = tmp_path / "params.yaml"
    p.write_text(BOMB, encoding="utf-8")
    if reader == "load_gates":
        from validation.thresholds import load_gates as fn
    elif reader == "read_params":
        from quantgate.commands.run import read_params as fn
    else:
        from quantgate.config import load_settings

        monkeypatch.setenv("QUANTGATE_PARAMS", str(p))

        def fn(_):
            return load_settings()
    with pytest.raises(QuantGateError, match="alias") as ei:
        fn(p)
    assert len(str(ei.value)) < 600


def test_plain_yaml_still_reads(tmp_path):
    from quantgate.commands.run import read_params
    from validation.thresholds import load_gates

    p = tmp_path / "gates.yaml"
    p.write_text("gates:\n  - kl_mean <= 0.05\n  - metric: top1_agreement\n    min: 0.9\n", encoding="utf-8")
    assert len(load_gates(p).gates) == 2
    assert read_params(p)["gates"][0] == "kl_mean <= 0.05"
    assert len(load_gates(ROOT / "gates.yaml").gates) >= 1
    assert read_params(ROOT / "params.yaml")


# --- safetensors header -----------------------------------------------------------------------------------------

def _header_file(path: Path, n_bytes: int) -> None:
    """A safetensors file whose JSON header is `n_bytes` of tiny tensor entries (all pointing at 0 bytes)."""
    entry = '"t%09d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
    n = n_bytes // len(entry % 0)
    body = "{" + "".join(entry % i for i in range(n)).rstrip(",") + "}"
    raw = body.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)


def test_60mb_safetensors_header_is_refused_before_reading(tmp_path):
    f = tmp_path / "big.safetensors"
    _header_file(f, 60 * 1024 * 1024)
    base = baseline_rss_mb("import quant.loaders.safetensors_src", tmp_path)
    out, rss = peak_rss_mb(textwrap.dedent(f"""
        from pathlib import Path
        from core.errors import CheckpointError
        from quant.loaders.safetensors_src import read_safetensors_header
        try:
            read_safetensors_header(Path({str(f)!r}))
            print('ACCEPTED')
        except CheckpointError as e:
            print('REFUSED', e)
    """), tmp_path)
    assert out.startswith("REFUSED") and "header" in out, out[:500]
    assert rss - base < 50, f"peak RSS {rss:.0f} MiB (baseline {base:.0f})"


def test_largest_accepted_header_stays_in_bounded_memory(tmp_path):
    """The worst header under the limit (every byte a tiny tensor entry) is parsed within a bounded peak."""
    from quant.loaders import safetensors_src as S

    f = tmp_path / "max.safetensors"
    _header_file(f, S.MAX_HEADER_BYTES - 1024)
    base = baseline_rss_mb("import quant.loaders.safetensors_src", tmp_path)
    out, rss = peak_rss_mb(textwrap.dedent(f"""
        from pathlib import Path
        from core.errors import CheckpointError
        from quant.loaders.safetensors_src import read_safetensors_header
        try:
            print('OK', len(read_safetensors_header(Path({str(f)!r}))))
        except CheckpointError as e:
            print('REFUSED', e)
    """), tmp_path)
    assert rss - base < 700, f"peak RSS {rss:.0f} MiB (baseline {base:.0f}): {out[:200]}"


# --- MLflow unreachable -----------------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_models_list_with_mlflow_refusing_connections_fails_fast(tmp_path):
    port = _closed_port()
    r, dt = cli(["models", "list"], tmp_path, timeout=60, QUANTGATE_MLFLOW_URI=f"http://127.0.0.1:{port}")
    assert_one_error_line(r, "unreachable", f"127.0.0.1:{port}")
    assert dt < 45, dt


def test_models_list_with_a_silent_mlflow_times_out(tmp_path):
    """A server that accepts connections and never answers: bounded by MLFLOW_HTTP_REQUEST_TIMEOUT (2 s here)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    port = srv.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        r, dt = cli(["models", "list"], tmp_path, timeout=90, QUANTGATE_MLFLOW_URI=f"http://127.0.0.1:{port}",
                    MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()
    assert_one_error_line(r, "unreachable")
    assert dt < 45, dt


def test_deeply_nested_or_oversized_yaml_is_one_error(tmp_path):
    from core.safe_yaml import MAX_YAML_BYTES
    from validation.thresholds import GateSpecError, load_gates

    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 100_000, encoding="utf-8")
    with pytest.raises(GateSpecError, match="nested too deeply|invalid YAML"):
        load_gates(deep)
    big = tmp_path / "big.yaml"
    big.write_text("gates:\n" + "  - kl_mean <= 0.05\n" * (MAX_YAML_BYTES // 19 + 10), encoding="utf-8")
    with pytest.raises(GateSpecError, match="bytes"):
        load_gates(big)
