"""The engine in this process: `from robustify.engine import evaluate, finetune` (docs/python-api.md).

Needs the server extra (`pip install "robustify[server]"`: torch and the engine). Why it lives here,
and not only at core.engine.api, which holds the code: users import the package they installed,
`robustify`, as they import `openai` or `timm`; `core` is the service's internal layout. The SDK stays
torch-free because nothing imports this module but the user: `import robustify` (the client) never
loads it, and tests/test_layers.py lets this one module, and no other of the SDK, sit on the engine's
floor and import core.engine.api (a re-export, so the engine keeps one implementation).
"""
from __future__ import annotations

try:
    from core.engine.api import (
        FinetuneOutput,
        ImageData,
        create_model,
        evaluate,
        finetune,
        image_data,
        load_dataset,
    )
except ModuleNotFoundError as exc:   # a client-only install: no torch
    if exc.name and exc.name.partition(".")[0] in ("core", "robustify"):
        raise
    raise ModuleNotFoundError(
        f"robustify.engine runs the engine in this process and needs the server extra (no module {exc.name!r}): "
        'pip install "robustify[server]"', name=exc.name) from exc

__all__ = ["FinetuneOutput", "ImageData", "create_model", "evaluate", "finetune", "image_data", "load_dataset"]
