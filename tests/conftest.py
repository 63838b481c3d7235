"""Shared test set-up: CPU-only, deterministic, quiet."""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Two cores, and end-to-end tests run worker processes beside the test process: one thread
# each avoids oversubscription, which slows tiny models down several-fold.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
