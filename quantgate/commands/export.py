"""Hand-off commands: export ollama (GGUF + Modelfile), export hf (GGUFs + model card for the Hugging Face Hub)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from quantgate.cli_app import app, console
from quantgate.commands.registry import _registry_errors, _settings

export_app = typer.Typer(no_args_is_help=True, help="Hand a model to a runtime or a hub: ollama, hf.")
app.add_typer(export_app, name="export")


@export_app.command("ollama")
@_registry_errors
def export_ollama(
    ref: str = typer.Argument(..., help="[models:/]MODEL@ALIAS or [models:/]MODEL/VERSION from the "
                                                    "registry, or a GGUF file"),
    out: Path = typer.Option(..., "--out", help="Folder to write the GGUF and the Modelfile into"),
    template: Optional[Path] = typer.Option(None, "--template", help="Ollama Go template to use instead of the one "
                                                                     "derived from the GGUF's chat template"),
    name: Optional[str] = typer.Option(None, "--name", help="Model name for the `ollama create` line"),
) -> None:
    """Write an Ollama folder: the GGUF and a Modelfile (TEMPLATE from its chat template, stop tokens, SYSTEM)."""
    from core.text import one_line
    from quantgate.export import FAMILY_NAMES
    from quantgate.export import export_ollama as do_export

    settings = None if Path(ref).is_file() else _settings()
    res = do_export(ref, out, settings=settings, template_file=template, name=name)
    family = FAMILY_NAMES.get(res.family or "", "from --template")
    console.print(f"wrote {one_line(res.gguf)} and {one_line(res.modelfile)} (chat template: {family}; stop: "
                  f"{one_line(', '.join(res.stops) or 'none')})", highlight=False, markup=False, soft_wrap=True)
    console.print("next:", highlight=False)
    console.print(f"  {one_line(res.create_command())}", highlight=False, markup=False, soft_wrap=True)


@export_app.command("hf")
@_registry_errors
def export_hf(
    model: str = typer.Argument(..., help="Registered model name (or models:/NAME)"),
    out: Path = typer.Option(..., "--out", help="Folder to write the GGUFs and README.md into"),
    alias: list[str] = typer.Option([], "--alias", help="Export the version this alias names (repeatable; default: "
                                                        "every version that passed validation)"),
    include_failed: bool = typer.Option(False, "--include-failed", help="Without --alias: every version"),
    quantized_by: str = typer.Option("quantgate", "--quantized-by", help="Model card quantized_by"),
    license: Optional[str] = typer.Option(None, "--license", help="Model card license (default: the GGUF's "
                                                                  "general.license, else 'other')"),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="Hub id of the source model (default: the "
                                                                        "registry's source name)"),
) -> None:
    """Write a folder for `huggingface-cli upload`: GGUFs + README.md (Hub metadata, per-file quality table, gates)."""
    import re

    from core.text import one_line
    from quantgate.export import export_hf as do_export

    res = do_export(model.removeprefix("models:/"), out, aliases=alias, settings=_settings(),
                    include_failed=include_failed, quantized_by=quantized_by, license=license, base_model=base_model)
    for f in res.files:
        console.print(f"  {one_line(f.file)}  {one_line(f.mix)}  {f.verdict}  v{f.version}", highlight=False,
                      markup=False, soft_wrap=True)
    console.print(f"wrote {len(res.files)} GGUF(s) and {one_line(res.readme)}", highlight=False, markup=False,
                  soft_wrap=True)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(res.metadata["base_model"])):
        console.print(f"note: base_model {one_line(res.metadata['base_model'])!r} is not a Hub id (owner/name); "
                      "pass --base-model so the Hub links the card to its source", highlight=False, markup=False,
                      soft_wrap=True)
    console.print("next:", highlight=False)
    console.print(f"  huggingface-cli upload REPO_ID {one_line(res.out_dir)} .", highlight=False, markup=False,
                  soft_wrap=True)
