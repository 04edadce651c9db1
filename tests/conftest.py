"""Shared test configuration: one torch thread per pytest worker (the suite runs with -n 2)."""

import os

import torch

torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")
