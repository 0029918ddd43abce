"""Hand-off to runtimes and hubs: an Ollama folder (GGUF + Modelfile) and a Hugging Face Hub folder (GGUFs + a
model card with the Hub's YAML metadata and the registry's quality numbers).

Ollama's TEMPLATE is a Go text/template over `.Messages` (each with `.Role`, `.Content`) and `.System`; it is derived
here from the GGUF's `tokenizer.chat_template` (Jinja) for the families we recognise by the template's marker text
(Llama 3, ChatML/Qwen, Mistral v0.1/v0.2 `[INST]`, Gemma, Phi-3). `render_go_template` is a small renderer of the Go
template subset those templates use (range, if/else if/else, eq/ne/and/or/not/len/slice, fields, variables,
`{{-`/`-}}` trimming, comments) and `ollama_prompt` feeds it the way Ollama does (a Modelfile SYSTEM prepended when the
conversation has no system message; consecutive messages of one role merged; `.System` = the system messages):
tests compare its output with transformers' `apply_chat_template` on the real Jinja templates.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from core.atomic import atomic_write_text
from core.errors import CheckpointError, QuantGateError
from core.hashing import checkpoint_sha256, file_sha256
from core.templating import render
from core.text import MdSafe, md_code, one_line
from quant.gguf_reader import read_gguf
from quant.gguf_split import parse_part_name, refuse_split, split_path
from registry.client import get_version, mlflow_client, parse_model_ref, resolve
from registry.config import RegistrySettings

TEMPLATES = Path(__file__).parent / "templates"


class ExportError(QuantGateError):
    """An export that cannot be made as asked (unknown chat template, name clash, bad template file...)."""


# ----------------------------------------------------------------------------------------------------------------
# Go text/template subset
# ----------------------------------------------------------------------------------------------------------------

_GO_SPACE = " \t\r\n"
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(`[^`]*`)|(\()|(\))|(:=)|(,)|([^\s(),]+))')


@dataclass
class _Node:
    kind: str                      # text | out | if | range
    text: str = ""
    expr: Any = None
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)
    vars: tuple[str, ...] = ()


def _lex(template: str) -> list[tuple[str, str]]:
    """(kind, value) pieces: ("text", s) and ("action", body), with {{- / -}} whitespace trimming applied."""
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(_GO_SPACE)
        if m.group(1):
            text = text.rstrip(_GO_SPACE)
        if text:
            out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    text = template[pos:]
    if trim_next:
        text = text.lstrip(_GO_SPACE)
    if "{{" in text:
        raise ExportError("unterminated {{ in Go template")
    if text:
        out.append(("text", text))
    return out


def _tokens(expr: str) -> list[str]:
    toks, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            if expr[pos:].strip() == "":
                break
            raise ExportError(f"cannot parse Go template expression {one_line(expr)!r}")
        toks.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return toks


def _parse_pipeline(toks: list[str]) -> Any:
    """A command as a nested list: [function, args...] or a single operand."""
    args: list[Any] = []
    while toks:
        t = toks.pop(0)
        if t == "(":
            depth, inner = 1, []
            while toks:
                u = toks.pop(0)
                depth += (u == "(") - (u == ")")
                if depth == 0:
                    break
                inner.append(u)
            if depth:
                raise ExportError("unbalanced ( in Go template")
            args.append(("sub", _parse_pipeline(inner)))
        elif t == ")":
            raise ExportError("unbalanced ) in Go template")
        else:
            args.append(t)
    if not args:
        raise ExportError("empty Go template action")
    return args


def _parse(pieces: list[tuple[str, str]]) -> list[_Node]:
    root: list[_Node] = []
    stack: list[tuple[_Node | None, list[_Node]]] = [(None, root)]
    for kind, val in pieces:
        cur = stack[-1][1]
        if kind == "text":
            cur.append(_Node("text", val))
            continue
        if val.startswith("/*"):
            if not val.endswith("*/"):
                raise ExportError("unterminated comment in Go template")
            continue
        word = val.split(None, 1)[0] if val else ""
        rest = val[len(word):].strip()
        if word in ("if", "range"):
            vars_: tuple[str, ...] = ()
            if word == "range" and ":=" in rest:
                names, rest = rest.split(":=", 1)
                vars_ = tuple(n.strip() for n in names.split(","))
            node = _Node(word, expr=_parse_pipeline(_tokens(rest)), vars=vars_)
            cur.append(node)
            stack.append((node, node.body))
        elif word == "else":
            owner = stack[-1][0]
            if owner is None:
                raise ExportError("{{ else }} outside if/range in Go template")
            stack.pop()
            if rest.startswith("if "):   # else if: a nested if in the else branch, closed by the same end
                node = _Node("if", expr=_parse_pipeline(_tokens(rest[3:])))
                owner.orelse.append(node)
                node.vars = ("__chained__",)
                stack.append((owner, owner.orelse))
                stack.append((node, node.body))
            else:
                stack.append((owner, owner.orelse))
        elif word == "end":
            if len(stack) == 1:
                raise ExportError("{{ end }} without if/range in Go template")
            node, _ = stack.pop()
            while len(stack) > 1 and node is not None and node.vars == ("__chained__",):
                node, _ = stack.pop()   # the else-if chain closes with its first if
        else:
            cur.append(_Node("out", expr=_parse_pipeline(_tokens(val))))
    if len(stack) != 1:
        raise ExportError("missing {{ end }} in Go template")
    return root


def _truthy(v: Any) -> bool:
    return not (v is None or v is False or v == 0 or (hasattr(v, "__len__") and len(v) == 0))


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        if name not in obj:
            raise ExportError(f"Go template: no field {name!r}")
        return obj[name]
    raise ExportError(f"Go template: cannot take field {name!r} of {type(obj).__name__}")


def _operand(tok: Any, dot: Any, env: dict[str, Any]) -> Any:
    if isinstance(tok, tuple):
        return _call(tok[1], dot, env)
    if tok.startswith('"'):
        return json.loads(tok)
    if tok.startswith("`"):
        return tok[1:-1]
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok in ("true", "false"):
        return tok == "true"
    if tok == ".":
        return dot
    if tok.startswith("."):
        v = dot
        for part in tok[1:].split("."):
            v = _field(v, part)
        return v
    if tok.startswith("$"):
        name, _, path = tok.partition(".")
        if name not in env:
            raise ExportError(f"Go template: undefined variable {name}")
        v = env[name]
        for part in path.split(".") if path else ():
            v = _field(v, part)
        return v
    raise ExportError(f"Go template: unknown operand {one_line(tok)!r}")


_FUNCS = {"eq", "ne", "and", "or", "not", "len", "slice", "index"}


def _call(cmd: list[Any], dot: Any, env: dict[str, Any]) -> Any:
    head = cmd[0]
    if isinstance(head, str) and head in _FUNCS:
        if head == "and":
            v: Any = True
            for a in cmd[1:]:
                v = _operand(a, dot, env)
                if not _truthy(v):
                    return v
            return v
        if head == "or":
            v = False
            for a in cmd[1:]:
                v = _operand(a, dot, env)
                if _truthy(v):
                    return v
            return v
        args = [_operand(a, dot, env) for a in cmd[1:]]
        if head == "eq":
            return any(args[0] == b for b in args[1:])
        if head == "ne":
            return args[0] != args[1]
        if head == "not":
            return not _truthy(args[0])
        if head == "len":
            return len(args[0])
        if head == "slice":
            return args[0][args[1]:args[2]] if len(args) > 2 else args[0][args[1]:]
        if head == "index":
            return args[0][args[1]]
    if len(cmd) != 1:
        raise ExportError(f"Go template: unsupported function {one_line(head)!r}")
    return _operand(head, dot, env)


def _exec(nodes: list[_Node], dot: Any, env: dict[str, Any], out: list[str]) -> None:
    for n in nodes:
        if n.kind == "text":
            out.append(n.text)
        elif n.kind == "out":
            v = _call(n.expr, dot, env)
            out.append("" if v is None else ("true" if v is True else "false" if v is False else str(v)))
        elif n.kind == "if":
            _exec(n.body if _truthy(_call(n.expr, dot, env)) else n.orelse, dot, env, out)
        elif n.kind == "range":
            seq = _call(n.expr, dot, env)
            if not _truthy(seq):
                _exec(n.orelse, dot, env, out)
                continue
            for i, item in enumerate(seq):
                inner = dict(env)
                if len(n.vars) == 1:
                    inner[n.vars[0]] = item
                elif len(n.vars) == 2:
                    inner[n.vars[0]], inner[n.vars[1]] = i, item
                _exec(n.body, item, inner, out)


def render_go_template(template: str, data: Mapping[str, Any]) -> str:
    """Render `template` (the Go text/template subset Ollama's chat templates use) over `data`."""
    out: list[str] = []
    _exec(_parse(_lex(template)), data, {"$": data}, out)
    return "".join(out)


def ollama_prompt(template: str, messages: Sequence[Mapping[str, str]], system: str | None = None) -> str:
    """The prompt Ollama builds for a chat: the Modelfile's SYSTEM prepended when the conversation has no system
    message first (server/routes.go), consecutive messages of one role except tool merged with a blank line and
    `.System` = every system message joined (template/template.go `collate`), `.Messages` = the merged list."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    merged: list[dict[str, str]] = []
    for m in msgs:
        if merged and merged[-1]["Role"] == m["role"] and m["role"] != "tool":
            merged[-1]["Content"] += "\n\n" + m["content"]
        else:
            merged.append({"Role": m["role"], "Content": m["content"]})
    sys_text = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    return render_go_template(template, {"System": sys_text, "Messages": merged, "Prompt": "", "Response": ""})


# ----------------------------------------------------------------------------------------------------------------
# Chat-template families: Jinja (tokenizer.chat_template) -> Ollama TEMPLATE + stop tokens
# ----------------------------------------------------------------------------------------------------------------

_END = "{{/* the model's answer starts here */}}"   # keeps the trailing newline(s) inside the template

_GO_TEMPLATES = {
    "llama3": ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
               "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n" + _END),
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               "{{ end }}<|im_start|>assistant\n" + _END),
    "gemma": ('{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
              "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n" + _END),
    "phi3": "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n" + _END,
    # Mistral v0.1/v0.2 layout; the system prompt goes before the last user message (as mistral-common and
    # Ollama's own mistral template do; the original v0.2 Jinja template refuses a system message).
    "mistral": ('{{- range $i, $_ := .Messages }}{{- if eq .Role "user" }}[INST] '
                "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}"
                '{{ .Content }} [/INST]{{- else if eq .Role "assistant" }}{{ .Content }}{EOS}{{- end }}{{- end }}'),
}

#: End-of-turn markers of each family, used as stop strings when the vocabulary has them as tokens.
FAMILY_STOPS = {
    "llama3": ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"),
    "chatml": ("<|im_end|>", "<|im_start|>"),
    "gemma": ("<end_of_turn>", "<start_of_turn>"),
    "phi3": ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>"),
    "mistral": ("[INST]", "[/INST]"),
}

FAMILY_NAMES = {"llama3": "Llama 3", "chatml": "ChatML (Qwen)", "gemma": "Gemma", "phi3": "Phi-3",
                "mistral": "Mistral [INST]"}


def detect_family(chat_template: str) -> str | None:
    """The family of a Jinja chat template, from its marker text; None when it is none we convert."""
    t = chat_template
    if "<|start_header_id|>" in t and "<|eot_id|>" in t:
        # Llama 3.1+ add a dated system preamble and tool blocks that this template does not reproduce
        return None if "Cutting Knowledge Date" in t else "llama3"
    if "<|im_start|>" in t and "<|im_end|>" in t:
        return "chatml"
    if "<start_of_turn>" in t and "<end_of_turn>" in t:
        return "gemma"
    if "<|assistant|>" in t and "<|end|>" in t and re.search(r"\|>(?:'\s*\+\s*')?\\n", t):
        return "phi3"   # '<|user|>\n' or '<|' + role + '|>' + '\n' (Phi-4's tags have no newline after them)
    if "[INST]" in t and re.search(r"""['"] \[/INST\]['"]""", t) and "<<SYS>>" not in t:
        return "mistral"
    return None


_JINJA_ESC = {"n": "\n", "t": "\t", "'": "'", '"': '"', "\\": "\\"}


def _jinja_unescape(s: str) -> str:
    return re.sub(r"\\(.)", lambda m: _JINJA_ESC.get(m.group(1), m.group(0)), s)


def default_system(chat_template: str, family: str) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (Qwen's), else None."""
    if family != "chatml":
        return None
    m = re.search(r"""<\|im_start\|>system\\n((?:[^'"\\]|\\.)+?)<\|im_end\|>""", chat_template)
    return _jinja_unescape(m.group(1)) if m else None


@dataclass
class OllamaTemplate:
    family: str | None          # None: a --template file was used
    template: str               # Go template text (Modelfile TEMPLATE)
    stops: list[str]
    system: str | None          # Modelfile SYSTEM (the template's default system prompt)


def _token_text(t: Any) -> str:
    return t.decode("utf-8", "replace") if isinstance(t, (bytes, bytearray)) else str(t)


def ollama_template(chat_template: str | None, tokens: Sequence[Any], *, eos_id: int | None = None,
                    eot_id: int | None = None, override: str | None = None) -> OllamaTemplate:
    """Ollama TEMPLATE, stops and SYSTEM for a GGUF's chat template and vocabulary (or the override Go template)."""
    vocab = [_token_text(t) for t in tokens]
    present = set(vocab)
    specials = [vocab[i] for i in (eos_id, eot_id) if i is not None and 0 <= i < len(vocab)]
    if override is not None:
        _parse(_lex(override))   # a broken template fails here, not in `ollama create`
        return OllamaTemplate(None, override, list(dict.fromkeys(specials)), None)
    if not chat_template:
        raise ExportError("the GGUF has no tokenizer.chat_template; pass --template FILE (an Ollama Go template)")
    family = detect_family(chat_template)
    if family is None:
        head = one_line(chat_template, 120)
        raise ExportError(f"unknown chat template family (known: {', '.join(FAMILY_NAMES.values())}; "
                          f"template starts {head!r}); pass --template FILE (an Ollama Go template)")
    tmpl = _GO_TEMPLATES[family]
    if "{EOS}" in tmpl:
        eos = vocab[eos_id] if eos_id is not None and 0 <= eos_id < len(vocab) else None
        if not eos:
            raise ExportError(f"{FAMILY_NAMES[family]} template needs the EOS token, the GGUF names none")
        tmpl = tmpl.replace("{EOS}", eos)
    stops = [s for s in FAMILY_STOPS[family] if s in present] + specials
    return OllamaTemplate(family, tmpl, list(dict.fromkeys(stops)), default_system(chat_template, family))


def _quoted(s: str, what: str) -> str:
    if '"' in s or "\n" in s or "\\" in s:
        raise ExportError(f"{what} {one_line(s)!r} cannot be written as a quoted Modelfile value")
    return f'"{s}"'


def modelfile_text(gguf_name: str, t: OllamaTemplate, source: str) -> str:
    """The Modelfile: FROM the GGUF beside it, TEMPLATE, SYSTEM (if the template has a default), PARAMETER stop."""
    for what, text in (("TEMPLATE", t.template), ("SYSTEM", t.system or "")):
        if '"""' in text:
            raise ExportError(f'the {what} text contains """, which a Modelfile cannot hold')
    lines = [f"# Modelfile written by quantgate export ollama from {one_line(source, 300)}",
             f"# chat template: {FAMILY_NAMES.get(t.family or '', 'from --template')}",
             f"FROM ./{gguf_name}", f'TEMPLATE """{t.template}"""']
    if t.system:
        lines.append(f'SYSTEM """{t.system}"""')
    lines += [f"PARAMETER stop {_quoted(s, 'stop token')}" for s in t.stops if s]
    return "\n".join(lines) + "\n"


def _copy_into(src: Path, out_dir: Path) -> Path:
    target = out_dir / src.name
    if target.exists() and target.resolve() == src.resolve():
        return target
    fd, tmp = tempfile.mkstemp(prefix=".quantgate-copy-", dir=out_dir)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@dataclass
class OllamaExport:
    gguf: Path
    modelfile: Path
    family: str | None
    stops: list[str]
    name: str

    def create_command(self) -> str:
        return f"ollama create {self.name} -f {self.modelfile}"


def _is_registry_ref(ref: str) -> bool:
    _, ver, alias = parse_model_ref(ref)
    return bool(ver or alias)


def ollama_name(text: str) -> str:
    """A model name `ollama create` accepts: lowercase letters, digits, '-', '_', '.'."""
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-.") or "model"


_OLLAMA_SPLIT = ("{what}; Ollama imports one GGUF file per Modelfile FROM (ollama/ollama#5245): quantize it "
                 "without --split-max-size/--split-max-tensors, or merge the parts (llama-gguf-split --merge)")


def _refuse_split_for_ollama(path: Path) -> None:
    """ExportError, before anything is written, when `path` is a part of a split GGUF (Ollama cannot import one)."""
    try:
        refuse_split(path, "Ollama")
    except CheckpointError:
        raise ExportError(_OLLAMA_SPLIT.format(what=f"{one_line(str(path), 200)} is part of a split GGUF")) from None


def export_ollama(ref: str, out_dir: "str | os.PathLike[str]", *, settings: Any = None,
                  template_file: "str | os.PathLike[str] | None" = None, name: str | None = None) -> OllamaExport:
    """Write out_dir/<file>.gguf (downloaded from the registry for MODEL@ALIAS / MODEL/VERSION, or copied from a
    GGUF path) and out_dir/Modelfile. A split GGUF is refused before anything is written (Ollama takes one file)."""
    out = Path(out_dir)
    src = Path(ref)
    if src.is_file():
        _refuse_split_for_ollama(src)
    elif _is_registry_ref(ref):
        from registry.queries import gguf_file_name  # lazy: the audit trail's SQLAlchemy, MLflow

        if parse_part_name(gguf_file_name(ref, settings=settings)) is not None:
            raise ExportError(_OLLAMA_SPLIT.format(what=f"{one_line(ref, 200)} is a split GGUF"))
    out.mkdir(parents=True, exist_ok=True)
    override = Path(template_file).read_text(encoding="utf-8") if template_file is not None else None
    if src.is_file():
        gguf = _copy_into(src, out)
        default_name = src.stem
    elif _is_registry_ref(ref):
        from registry.queries import download  # lazy: the audit trail's SQLAlchemy, MLflow

        gguf = download(ref, out, settings=settings)
        default_name = ref.removeprefix("models:/").replace("@", "-").replace("/", "-")
    else:
        raise ExportError(f"{ref!r} is neither a GGUF file nor a registry reference (MODEL@ALIAS or MODEL/VERSION)")
    with read_gguf(gguf) as g:
        tmpl = ollama_template(g.value("tokenizer.chat_template"), g.value("tokenizer.ggml.tokens") or [],
                               eos_id=g.value("tokenizer.ggml.eos_token_id"),
                               eot_id=g.value("tokenizer.ggml.eot_token_id"), override=override)
    mf = out / "Modelfile"
    atomic_write_text(mf, modelfile_text(gguf.name, tmpl, ref))
    return OllamaExport(gguf, mf, tmpl.family, tmpl.stops, ollama_name(name or default_name))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face Hub folder
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class HFFile:
    file: str
    version: str
    aliases: list[str]
    mix: str
    size_bytes: int
    bpw: float | None
    ppl_ratio: float | None
    kld: float | None
    verdict: str
    sha256: str
    gate_set: str
    gates: list[dict[str, Any]]     # the verdict's gates: name, value, passed (empty: unvalidated)
    #: a split GGUF: every part's file name, in order (file is the first; size_bytes the total; sha256 the set's
    #: core.hashing.checkpoint_sha256, as the registry records it); empty for a single file
    parts: list[str] = field(default_factory=list)


@dataclass
class HFExport:
    out_dir: Path
    readme: Path
    files: list[HFFile]
    metadata: dict[str, Any]


def _metric(metrics: Mapping[str, float], *names: str) -> float | None:
    for n in names:
        if n in metrics:
            return float(metrics[n])
    return None


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _license(paths: Iterable[Path]) -> str | None:
    for p in paths:
        with read_gguf(p) as g:
            lic = g.value("general.license")
        if lic:
            return str(lic)
    return None


def export_hf(model: str, out_dir: "str | os.PathLike[str]", *, aliases: Sequence[str] = (), settings: Any = None,
              include_failed: bool = False, quantized_by: str = "quantgate", license: str | None = None,
              base_model: str | None = None) -> HFExport:
    """Write a folder ready for `huggingface-cli upload`: the chosen versions' GGUFs (the versions the aliases name,
    else every version whose validation passed, or every version with include_failed) and README.md."""
    from registry.queries import download, run_artifact_text  # lazy: the audit trail's SQLAlchemy, MLflow

    s = settings or RegistrySettings.from_env()
    client = mlflow_client(s)
    if aliases:
        versions = [resolve(client, f"{model}@{a}") for a in aliases]
    else:
        found = client.search_model_versions(f"name='{model}'")
        if not found:
            raise ExportError(f"no registered model {model!r} (or it has no versions)")
        versions = [get_version(client, model, v.version) for v in sorted(found, key=lambda v: int(v.version))]
        if not include_failed:
            versions = [v for v in versions if v.tags.get("verdict") == "passed"]
            if not versions:
                raise ExportError(f"no version of {model!r} passed validation (use --include-failed to export anyway)")
    seen: dict[str, str] = {}
    uniq = []
    for mv in versions:
        if str(mv.version) in {str(u.version) for u in uniq}:
            continue
        f = mv.tags.get("gguf_file", "")
        if f in seen:
            raise ExportError(f"versions {seen[f]} and {mv.version} both hold a file named {f!r}")
        seen[f] = str(mv.version)
        uniq.append(mv)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[HFFile] = []
    paths: list[Path] = []
    for mv in uniq:
        path = download(f"{model}/{mv.version}", out, settings=s)
        paths.append(path)
        named = parse_part_name(path)
        set_paths = [split_path(named[0], i, named[2]) for i in range(named[2])] if named else [path]
        run = client.get_run(mv.run_id)
        m = run.data.metrics
        tags = mv.tags
        bpw = m.get("bits_per_weight", tags.get("bits_per_weight"))  # the run metric (older versions: a tag)
        verdict_text = run_artifact_text(s, mv.run_id, "validation/verdict.json")
        gates = json.loads(verdict_text).get("gates", []) if verdict_text else []
        files.append(HFFile(
            file=path.name, version=str(mv.version), aliases=sorted(mv.aliases or []),
            mix=tags.get("precision") or "unknown", size_bytes=sum(p.stat().st_size for p in set_paths),
            bpw=float(bpw) if bpw else None, ppl_ratio=_metric(m, "ppl_ratio", "val.ppl_ratio"),
            kld=_metric(m, "kl_mean", "val.kl_mean"), verdict=tags.get("verdict", "unvalidated"),
            sha256=checkpoint_sha256(set_paths) if named else file_sha256(path), gate_set=tags.get("gate_set", ""),
            gates=gates, parts=[p.name for p in set_paths] if named else []))
    rm = client.get_registered_model(model)
    source = (rm.tags or {}).get("source_model") or model
    meta: dict[str, Any] = {
        "base_model": base_model or source,
        "base_model_relation": "quantized",
        "quantized_by": quantized_by,
        "library_name": "gguf",
        "license": license or _license(paths) or "other",
        "tags": ["gguf", "quantized", "quantgate"],
    }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    rows = [{
        "file": MdSafe("<br>".join(md_code(n) for n in f.parts)) if f.parts else md_code(f.file), "mix": f.mix,
        "size": _size(f.size_bytes), "bpw": _fmt(f.bpw, ".2f"),
        "ppl_ratio": _fmt(f.ppl_ratio, ".4f"), "kld": _fmt(f.kld, ".4f"), "verdict": f.verdict,
        "sha256": md_code(f.sha256), "version": f.version,
        "aliases": MdSafe(", ".join(md_code(a) for a in f.aliases)) if f.aliases else "",
    } for f in files]
    text = render(TEMPLATES, "hf_model_card.md.j2", front=MdSafe(front), model=model, source=source,
                  base_model=meta["base_model"], rows=rows,
                  validations=[{"file": md_code(f.file), "gate_set": f.gate_set or "unnamed", "gates": [
                      {"name": md_code(g.get("name", "")), "value": "n/a" if g.get("value") is None
                       else format(float(g["value"]), ".6g"),
                       "result": "skipped" if g.get("skipped") else "pass" if g.get("passed") else "FAIL"}
                      for g in f.gates]} for f in files if f.gates],
                  first_file=md_code(files[0].file) if files else "")
    readme = out / "README.md"
    atomic_write_text(readme, text)
    return HFExport(out, readme, files, meta)
