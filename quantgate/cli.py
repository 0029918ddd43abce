"""The `quantgate` command line: thin typer wrappers over the pipeline's plain functions.

Commands live in quantgate/commands/*.py, one module per area; importing a module registers its commands.
"""
from __future__ import annotations

import importlib
import sys

from quantgate.cli_app import app

#: Command modules, in the order their commands appear in `quantgate --help`.
COMMAND_MODULES = ("core", "convert", "evaluate", "validate", "registry", "run", "analyze", "export")

for _name in COMMAND_MODULES:
    importlib.import_module(f"quantgate.commands.{_name}")


def main() -> None:
    """Entry point of the `quantgate` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
