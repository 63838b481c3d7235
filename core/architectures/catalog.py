"""The model names an architecture family knows, printed as JSON for the API.

Listing timm's, torchvision's or RobustBench's names imports torch (and RobustBench), which the
API process never does: it runs `python -m core.architectures.catalog <family>` once per family
and caches the answer (api/catalog.py).
"""
from __future__ import annotations

import json
import sys
from typing import Any


def family_names(family: str) -> list[dict[str, Any]]:
    """One entry per architecture name: {"id": "<family>:<name>"} (RobustBench's also say for
    which data sets and threat models the name exists)."""
    if family == "timm":
        import timm

        return [{"id": f"timm:{name}"} for name in sorted(timm.list_models())]
    if family == "torchvision":
        from core.architectures.torchvision_family import classification_names

        return [{"id": f"torchvision:{name}"} for name in classification_names()]
    if family == "robustbench":
        from core.architectures.robustbench_zoo import import_robustbench

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


if __name__ == "__main__":
    json.dump(family_names(sys.argv[1]), sys.stdout)
