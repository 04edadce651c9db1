"""Recipes that reproduce the source articles' experiments on the embedded data.

They need the ``[recipes]`` extra (``pip install "lightning-norms[recipes]"``).

Each study is a module with a ``LightningCLI`` entry point (``cli_main``); the repository's
top-level ``recipes/`` holds the ``python -m recipes.<name>`` launchers, and
``lightning-norms report`` (:mod:`lightning_norms.recipes.report`) runs the studies.
"""
