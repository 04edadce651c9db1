"""Launcher for ``python -m recipes.precise_bn``: runs :mod:`lightning_norms.recipes.precise_bn`."""

from lightning_norms.recipes.precise_bn import cli_main

if __name__ == "__main__":
    cli_main()
