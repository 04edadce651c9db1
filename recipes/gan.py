"""Launcher for ``python -m recipes.gan``: runs :mod:`lightning_norms.recipes.gan`."""

from lightning_norms.recipes.gan import cli_main

if __name__ == "__main__":
    cli_main()
