"""Launcher for ``python -m recipes.lecture``: runs :mod:`lightning_norms.recipes.lecture`."""

from lightning_norms.recipes.lecture import cli_main

if __name__ == "__main__":
    cli_main()
