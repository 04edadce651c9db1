"""Launcher for ``python -m recipes.small_batch`` (:mod:`lightning_norms.recipes.small_batch`)."""

from lightning_norms.recipes.small_batch import cli_main

if __name__ == "__main__":
    cli_main()
