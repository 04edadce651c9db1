"""Launcher for ``python -m recipes.two_domain``: runs :mod:`lightning_norms.recipes.two_domain`."""

from lightning_norms.recipes.two_domain import cli_main

if __name__ == "__main__":
    cli_main()
