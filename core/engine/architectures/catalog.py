"""The model names an architecture family knows, printed as JSON for the API.

Listing timm's, torchvision's or RobustBench's names imports torch (and RobustBench), which the
API process never does: a background thread of the API runs
`python -m core.engine.architectures.catalog <family>...` and caches the answer (api/catalog.py). It
prints {family: [names] or "why listing it failed"}, so one broken package spoils no other family.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any


def family_names(family: str) -> list[dict[str, Any]]:
    """One entry per architecture name: {"id": "<family>:<name>"} (RobustBench's also say for
    which data sets and threat models the name exists)."""
    if family == "timm":
        import timm

        return [{"id": f"timm:{name}"} for name in sorted(timm.list_models())]
    if family == "torchvision":
        from core.engine.architectures.torchvision_family import classification_names

        return [{"id": f"torchvision:{name}"} for name in classification_names()]
    if family == "robustbench":
        from core.engine.architectures.robustbench_zoo import import_robustbench

        import_robustbench()
        from robustbench.model_zoo import model_dicts

        variants: dict[str, list[dict[str, str]]] = {}
        for dataset, threats in model_dicts.items():
            for threat, models in threats.items():
                for name, entry in models.items():
                    if not isinstance(entry.get("gdrive_id"), (list, tuple)):  # ensembles are not supported
                        variants.setdefault(name, []).append({"dataset": dataset.value, "threat_model": threat.value})
        return [{"id": f"robustbench:{name}", "variants": variants[name]} for name in sorted(variants)]
    raise ValueError(f"unknown family {family!r}; listed families: timm, torchvision, robustbench")


def _listed(family: str) -> list[dict[str, Any]] | str:
    try:
        return family_names(family)
    except Exception as exc:  # any failure of a third-party import is reported per family, to the API
        return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    if hasattr(os, "nice"):
        os.nice(10)  # a one-time listing: requests and training on the same machine come first
    json.dump({family: _listed(family) for family in sys.argv[1:]}, sys.stdout)
