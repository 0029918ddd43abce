"""quantgate export ollama|hf: the Modelfile's Go template renders the same prompt as transformers' apply_chat_template
on each family's real Jinja template; the whole path on the bundled reference model (quantize -> validate ->
register -> export ollama / export hf) with a real MLflow store; errors are one line and exit 2."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from quantgate.export import (
    ExportError,
    detect_family,
    ollama_prompt,
    ollama_template,
    render_go_template,
)

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "models" / "reference"
FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "chat_templates.json").read_text(encoding="utf-8"))
TEMPLATES = FIXTURES["templates"]

CONVERSATIONS = {
    "system+user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
                   {"role": "user", "content": "Who are you?\nTell me {{ .System }} and <b>x</b>."}],
    "system+multi-turn": [{"role": "system", "content": "Be kind.\nAlways."}, {"role": "user", "content": "Hello"},
                          {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Again"}],
    "user only": [{"role": "user", "content": "One question"}],
}


def _cases():
    for key, fx in TEMPLATES.items():
        for name, msgs in CONVERSATIONS.items():
            if fx["system_supported"] or msgs[0]["role"] != "system":
                yield pytest.param(key, name, id=f"{key}-{name}")


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REF)


def _hf_prompt(tok, fx: dict, msgs: list[dict]) -> str:
    """transformers' prompt without the leading BOS (llama.cpp / Ollama add BOS themselves from the GGUF)."""
    text = tok.apply_chat_template(msgs, chat_template=fx["chat_template"], tokenize=False, add_generation_prompt=True,
                                   bos_token=fx["bos_token"], eos_token=fx["eos_token"])
    assert text.startswith(fx["bos_token"])
    return text[len(fx["bos_token"]):]


def _vocab(fx: dict) -> list[str]:
    """A vocabulary holding the family's special tokens (ids 1 = BOS, 2 = EOS), like the real model's."""
    return ["<unk>", fx["bos_token"] or "<unused>", fx["eos_token"], "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|end|>",
            "<|user|>", "<|assistant|>", "hello"]


# ---------------------------------------------------------------------------------------------------- Go renderer

def test_go_renderer_subset():
    data = {"System": "S", "Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"},
                                        {"Role": "tool", "Content": "c"}]}
    t = ('{{- range $i, $m := .Messages }}\n  {{- if eq .Role "user" }}U{{ $i }}:{{ .Content }}'
         '{{ else if eq .Role "assistant" "x" }}A:{{ $m.Content }}{{ else }}O:{{ .Content }}{{ end }}|\n'
         '{{- end }} {{ if and $.System (eq (len (slice $.Messages 1)) 2) }}last2{{ end }}{{/* c */}}\n')
    assert render_go_template(t, data) == "U0:a|A:b|O:c| last2\n"
    assert render_go_template("x  {{- .System -}}  y", data) == "xSy"
    assert render_go_template('{{ if not .Messages }}no{{ else }}{{ len .Messages }}{{ end }}', data) == "3"
    assert render_go_template('{{ range .Missing }}x{{ else }}empty{{ end }}', {"Missing": []}) == "empty"
    for bad in ("{{ if .System }}x", "{{ end }}", "{{ .System", "{{ frob .System }}"):
        with pytest.raises(ExportError):
            render_go_template(bad, data)


def test_ollama_prompt_merges_roles_and_adds_default_system():
    t = "{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}<{{ .System }}>"
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert ollama_prompt(t, msgs, system="D") == "[system:D][user:a\n\nb]<D>"
    assert ollama_prompt(t, [{"role": "system", "content": "S"}] + msgs, system="D") == "[system:S][user:a\n\nb]<S>"
    tools = [{"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]
    assert ollama_prompt(t, tools) == "[tool:1][tool:2]<>"                     # tool results are never merged


# ----------------------------------------------------------------------- the families vs transformers' real templates

@pytest.mark.parametrize("key,conv", list(_cases()))
def test_go_template_renders_the_same_prompt_as_transformers(hf_tokenizer, key, conv):
    fx, msgs = TEMPLATES[key], CONVERSATIONS[conv]
    t = ollama_template(fx["chat_template"], _vocab(fx), eos_id=2)
    assert t.family == fx["family"]
    assert ollama_prompt(t.template, msgs, t.system) == _hf_prompt(hf_tokenizer, fx, msgs)


@pytest.mark.parametrize("key", [k for k, fx in TEMPLATES.items() if not fx["system_supported"]])
def test_templates_without_system_role_refuse_it_in_transformers(hf_tokenizer, key):
    """Why those families have no system+user case above: their own Jinja template raises on a system message."""
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError):
        _hf_prompt(hf_tokenizer, TEMPLATES[key], CONVERSATIONS["system+user"])


def test_family_detection_stops_and_default_system():
    qwen = TEMPLATES["qwen2_5"]
    t = ollama_template(qwen["chat_template"], _vocab(qwen), eos_id=2)
    assert t.system == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert t.stops == ["<|im_end|>", "<|im_start|>"]            # EOS is <|im_end|> itself: listed once
    l3 = ollama_template(TEMPLATES["llama3"]["chat_template"], _vocab(TEMPLATES["llama3"]), eos_id=2)
    assert l3.stops == ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"] and l3.system is None
    # stop candidates the vocabulary lacks are left out: only the EOS stays
    small = ollama_template(TEMPLATES["gemma2"]["chat_template"], ["<unk>", "<bos>", "<eos>"], eos_id=2)
    assert small.stops == ["<eos>"]
    llama31 = TEMPLATES["llama3"]["chat_template"].replace("{% set loop", "Cutting Knowledge Date{% set loop")
    assert detect_family(llama31) is None
    assert detect_family("{{ '[INST] <<SYS>>\\n' + m + ' [/INST]' }}") is None   # Llama 2 chat: not Mistral
    with pytest.raises(ExportError, match="unknown chat template family"):
        ollama_template("{% for m in messages %}### {{ m.content }}{% endfor %}", ["a"], eos_id=0)
    with pytest.raises(ExportError, match="no tokenizer.chat_template"):
        ollama_template(None, ["a"], eos_id=0)


# ------------------------------------------------------------------------------- the reference model, end to end

@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """One embedded MLflow store + audit trail for this module (the pipeline's audit events go there too)."""
    d = tmp_path_factory.mktemp("export-store") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUANTGATE_STORE_DIR", str(d))
        yield d


@pytest.fixture(scope="module")
def ref_q8(tmp_path_factory, store_dir):
    """The reference model quantized to Q8_0 (from the HF folder: convert + quantize in one step)."""
    from core.records import QuantizeRequest
    from quantgate.pipeline import quantize_model

    work = tmp_path_factory.mktemp("export-ref")
    art = quantize_model(QuantizeRequest(source=REF, out=work / "reference-q8_0.gguf", precision="Q8_0", threads=1))
    return work, art


def _modelfile_parts(text: str) -> dict:
    tmpl = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return {"from": re.search(r"^FROM (.+)$", text, re.M).group(1), "template": tmpl,
            "system": system.group(1) if system else None,
            "stops": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)}


def test_reference_model_chat_template_reaches_the_gguf_and_the_modelfile(ref_q8, hf_tokenizer, tmp_path):
    from quant.gguf_reader import read_gguf
    from quantgate.export import export_ollama

    work, art = ref_q8
    cfg = json.loads((REF / "tokenizer_config.json").read_text(encoding="utf-8"))
    with read_gguf(art.path) as g:
        assert g.value("tokenizer.chat_template") == cfg["chat_template"] == hf_tokenizer.chat_template
        vocab = [t.decode() if isinstance(t, bytes) else t for t in g.value("tokenizer.ggml.tokens")]
    assert len(vocab) == 4096 and "<|im_start|>" not in vocab and "[INST]" not in vocab   # why the [INST] template
    res = export_ollama(str(art.path), tmp_path / "ollama")
    assert res.family == "mistral" and res.stops == ["</s>"]
    assert (tmp_path / "ollama" / "reference-q8_0.gguf").read_bytes() == Path(art.path).read_bytes()
    parts = _modelfile_parts(res.modelfile.read_text(encoding="utf-8"))
    assert parts["from"] == "./reference-q8_0.gguf" and parts["stops"] == ["</s>"] and parts["system"] is None
    for name, msgs in CONVERSATIONS.items():   # the reference template takes a system prompt: every case
        want = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert want.startswith("<s>"), name
        assert ollama_prompt(parts["template"], msgs) == want[len("<s>"):], name
    assert res.create_command() == f"ollama create reference-q8_0 -f {res.modelfile}"


def _cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """The real console script, in a fresh process."""
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


class _Run:
    def __init__(self, res):
        self.returncode, self.stdout, self.stderr = res.exit_code, res.stdout, res.stderr


def _invoke(args: list[str], env: dict, monkeypatch) -> _Run:
    """The same CLI in this process (typer's runner): the registry settings come from the same environment."""
    from typer.testing import CliRunner

    from quantgate.cli import app

    monkeypatch.setenv("QUANTGATE_STORE_DIR", env["QUANTGATE_STORE_DIR"])
    return _Run(CliRunner().invoke(app, args))


@pytest.fixture(scope="module")
def registered(ref_q8, store_dir):
    """The reference Q8_0 really validated (6 eval samples, 32 tokens) and registered in an embedded MLflow store,
    promoted to `validated`; a second, unvalidated version from a GGUF without a chat template."""
    from quantgate.pipeline import validate_artifact
    from quantgate.sample import SampleShape, make_sample_checkpoint
    from registry.config import RegistrySettings
    from registry.registration import promote, register_gguf
    from validation.thresholds import load_gates

    work, art = ref_q8
    rows = [json.loads(x) for x in (ROOT / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines() if x]
    picked = [r for c in ("code", "chat", "math") for r in [r for r in rows if r["category"] == c][:2]]
    ds = work / "eval-small.jsonl"
    ds.write_text("".join(json.dumps(r) + "\n" for r in picked), encoding="utf-8")
    env = {**os.environ, "QUANTGATE_STORE_DIR": str(store_dir), "PYTHONPATH": str(ROOT)}
    settings = RegistrySettings.from_env(env={"QUANTGATE_STORE_DIR": str(store_dir)})
    verdict = validate_artifact(REF, art.path, load_gates(ROOT / "params.yaml"), dataset=ds, max_tokens=32,
                                expectations=False, report_dir=work / "reports", record=False)
    assert verdict.passed, verdict.gates
    rv = register_gguf(art.path, settings=settings, verdict=verdict, artifact=art, model_name="reference")
    promote("reference", rv.version, "validated", settings=settings)
    from core.records import QuantizeRequest
    from quantgate.pipeline import quantize_model

    bare = make_sample_checkpoint(work / "bare", SampleShape(n_layer=1, n_embd=256, n_ff=256, n_head=2, n_head_kv=1,
                                                             n_vocab=256), seed=1)   # no tokenizer files
    bare_q = quantize_model(QuantizeRequest(source=bare, out=work / "bare-q8_0.gguf", precision="Q8_0", threads=1))
    rv2 = register_gguf(bare_q.path, settings=settings, artifact=bare_q, model_name="bare")
    return {"settings": settings, "env": env, "verdict": verdict, "art": art, "v1": rv, "bare": rv2, "work": work}


def test_export_ollama_from_the_registry_cli(registered, tmp_path):
    r = _cli(["export", "ollama", "reference@validated", "--out", str(tmp_path / "o")], registered["env"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"ollama create reference-validated -f {tmp_path / 'o' / 'Modelfile'}" in r.stdout
    got = tmp_path / "o" / Path(registered["art"].path).name
    from core.hashing import file_sha256

    assert file_sha256(got) == registered["art"].sha256
    assert _modelfile_parts((tmp_path / "o" / "Modelfile").read_text())["stops"] == ["</s>"]


def test_export_ollama_errors_are_one_line_exit_2(registered, tmp_path, monkeypatch):
    env, bare = registered["env"], f"bare/{registered['bare'].version}"
    r = _invoke(["export", "ollama", bare, "--out", str(tmp_path / "b")], env, monkeypatch)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "--template FILE" in r.stderr
    assert "Traceback" not in r.stderr
    r = _invoke(["export", "ollama", "reference@nope", "--out", str(tmp_path / "c")], env, monkeypatch)
    assert r.returncode == 2 and "no alias 'nope'" in r.stderr and r.stderr.count("\n") == 1
    r = _invoke(["export", "ollama", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "d")], env, monkeypatch)
    assert r.returncode == 2 and "neither a GGUF file nor a registry reference" in r.stderr
    # the override: a Go template file makes the GGUF without a chat template exportable
    (tmp_path / "t.tmpl").write_text("{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant:")
    r = _invoke(["export", "ollama", bare, "--out", str(tmp_path / "b"), "--template", str(tmp_path / "t.tmpl"),
                 "--name", "Bare Model"], env, monkeypatch)
    assert r.returncode == 0, r.stderr
    parts = _modelfile_parts((tmp_path / "b" / "Modelfile").read_text())
    assert parts["template"] == (tmp_path / "t.tmpl").read_text() and "ollama create bare-model -f" in r.stdout
    (tmp_path / "broken.tmpl").write_text("{{ if .System }}never closed")
    r = _invoke(["export", "ollama", bare, "--out", str(tmp_path / "e"), "--template", str(tmp_path / "broken.tmpl")],
                env, monkeypatch)
    assert r.returncode == 2 and "missing {{ end }}" in r.stderr


def test_export_hf_model_card(registered, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from core.hashing import file_sha256
    from registry.client import mlflow_client

    env, v = registered["env"], registered["verdict"]
    client = mlflow_client(registered["settings"])
    # a hostile registry string must stay literal text in the card
    client.set_model_version_tag("reference", registered["v1"].version, "precision", "Q8_0 | <img src=x> `x`")
    try:
        r = _invoke(["export", "hf", "reference", "--out", str(tmp_path / "hub"), "--license", "mit",
                     "--quantized-by", "ci: bot"], env, monkeypatch)
    finally:
        client.set_model_version_tag("reference", registered["v1"].version, "precision", "Q8_0")
    assert r.returncode == 0, r.stderr
    assert "note: base_model 'reference' is not a Hub id" in r.stdout
    readme = tmp_path / "hub" / "README.md"
    gguf = tmp_path / "hub" / Path(registered["art"].path).name
    assert file_sha256(gguf) == registered["art"].sha256
    card = ModelCard.load(readme)
    d = card.data.to_dict()
    assert d["base_model_relation"] == "quantized" and d["quantized_by"] == "ci: bot" and d["license"] == "mit"
    assert d["base_model"] == "reference" and "gguf" in d["tags"] and d["library_name"] == "gguf"
    text = card.text
    row = next(line for line in text.splitlines() if registered["art"].sha256 in line)
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert len(cells) == 10, cells                                   # the escaped '|' did not split the row
    assert cells[1] == r"Q8\_0 \| \<img src=x\> \`x\`" and not re.search(r"(?<!\\)<img", text)
    assert cells[6] == "passed" and cells[7] == registered["v1"].version and cells[8] == "` validated `"
    assert cells[4] == f"{v.metrics['ppl_ratio']:.4f}" and cells[5] == f"{v.metrics['kl_mean']:.4f}"
    assert cells[3] == f"{float(registered['art'].bits_per_weight):.2f}"
    # the gate set: every gate of the verdict with its measured value
    for g in v.gates:
        want = "n/a" if g.value is None else format(float(g.value), ".6g")
        assert f"| ` {g.name} ` | {want} | {'pass' if g.passed else 'FAIL'} |" in text, g.name
    assert f"(gate set ` {v.gate_set} `)" in text
    # only passing versions by default; --alias picks; a model with no passing version is one error line
    r = _invoke(["export", "hf", "bare", "--out", str(tmp_path / "none")], env, monkeypatch)
    assert r.returncode == 2 and "no version of 'bare' passed validation" in r.stderr
    r = _invoke(["export", "hf", "bare", "--include-failed", "--out", str(tmp_path / "all")], env, monkeypatch)
    assert r.returncode == 0, r.stderr
    d2 = ModelCard.load(tmp_path / "all" / "README.md").data.to_dict()
    assert d2["license"] == "other" and "unvalidated" in (tmp_path / "all" / "README.md").read_text()
