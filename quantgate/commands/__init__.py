"""CLI command modules; each registers its commands on quantgate.cli_app.app when imported."""
