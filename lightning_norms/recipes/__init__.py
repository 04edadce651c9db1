"""Recipes that reproduce the source articles' experiments on the embedded data.

They need the ``[recipes]`` extra (``pip install "lightning-norms[recipes]"``).

One module per study (``two_domain``, ``precise_bn``, ``small_batch``, ``gan``, ``lecture``)
defines its LightningModule, its ``LightningCLI`` entry point (``cli_main``) and ``run_study``,
which trains the study's grid through that same CLI and returns its records, table and
verdicts. Shared by all: ``models`` (the small CNN, its norm layers built by
``lightning_norms.create_norm``, and the classifier module), ``data`` (single-domain digits,
class-sorted batches), ``runner`` (the CLI base, seeded quiet runs in parallel processes),
``writer`` (tables, plots, the report files) and ``verdict`` (the paired per-seed rule).
``lightning-norms report`` (:mod:`lightning_norms.recipes.report`) picks a study from its
``STUDIES`` table; the repository's top-level ``recipes/`` holds the ``python -m
recipes.<name>`` launchers, which work inside a clone only. From an installed wheel, run
``python -m lightning_norms.recipes.<name>`` (``two_domain``, ``precise_bn``, ``small_batch``,
``gan``, ``lecture``, ``report``) or ``lightning-norms report``.
"""
