"""Shared test set-up: CPU-only, deterministic, quiet."""
from __future__ import annotations

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
