"""Launchers for ``python -m recipes.<name>`` inside a clone (not installed).

The code is ``lightning_norms.recipes``; from an installed wheel the same commands are
``python -m lightning_norms.recipes.<name>``.
"""
