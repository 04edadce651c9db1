"""Launchers for ``python -m recipes.<name>`` (not installed; code: ``lightning_norms.recipes``)."""
