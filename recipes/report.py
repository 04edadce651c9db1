"""Launcher: ``python -m recipes.report ...`` runs ``lightning-norms report`` (the demo)."""

import sys

from lightning_norms.recipes.report import main

if __name__ == "__main__":
    sys.exit(main())
