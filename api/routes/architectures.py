"""/v1/architectures: the built-in architectures and the families, with a search of a family's names."""
from __future__ import annotations

import fnmatch
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from api.catalog import BUILTIN_FAMILY, LISTED_FAMILIES, ArchitectureCatalog
from api.deps import Caller, caller
from api.errors import ApiError
from api.routes.common import MAX_PAGE
from core.config import BUILTIN_ARCHITECTURES

router = APIRouter(prefix="/v1/architectures", tags=["architectures"])

FAMILIES: dict[str, str] = {
    "timm": "timm's models (timm.list_models()), built with your class count and input channels; weights are a "
            "state_dict() saved with safetensors. Hugging Face Hub timm models: POST /v1/models "
            '{"source": "hf-hub", "name": "<org>/<repo>", ...}.',
    "torchvision": "torchvision's classification models; for other than 3 input channels the first convolution "
                   "is rebuilt with that many input channels.",
    "robustbench": "RobustBench's model zoo: POST /v1/models {\"source\": \"robustbench\", \"name\": ..., "
                   "\"dataset\": ..., \"threat_model\": ...} fetches the weights.",
}
_BUILTIN_NOTE = "built in; takes images in [0, 1] (normalises inside for cifar10/cifar100)"


def _builtins() -> list[dict[str, Any]]:
    return [{"id": name, "object": "architecture", "family": BUILTIN_FAMILY, "description": _BUILTIN_NOTE}
            for name in BUILTIN_ARCHITECTURES]


def _families() -> list[dict[str, Any]]:
    return [{"id": f"{name}:", "object": "architecture_family", "family": name, "pattern": f"{name}:<model name>",
             "description": text, "search": f"/v1/architectures?family={name}&q="} for name, text in FAMILIES.items()]


def _matches(entry_id: str, q: str | None) -> bool:
    """q is a case-insensitive part of the name after the family prefix, or a pattern with * and ?."""
    if not q:
        return True
    name, q = entry_id.split(":", 1)[-1].lower(), q.lower()
    return fnmatch.fnmatchcase(name, q) if any(c in q for c in "*?[") else q in name


def catalog(request: Request) -> ArchitectureCatalog:
    app = request.app
    if not hasattr(app.state, "architecture_catalog"):
        app.state.architecture_catalog = ArchitectureCatalog(app.state.services.settings.data_dir / "cache")
    return app.state.architecture_catalog


@router.get("", summary="List architectures: the built-ins and the families, or search a family's names")
async def list_architectures(family: str | None = Query(None, description="builtin, timm, torchvision or robustbench"),
                             q: str | None = Query(None, max_length=200,
                                                   description="part of a name, or a pattern with * and ?; without "
                                                               "family it searches builtin, timm and torchvision"),
                             limit: int = Query(50, ge=1, le=MAX_PAGE), after: str | None = None,
                             who: Caller = Depends(caller),
                             names: ArchitectureCatalog = Depends(catalog)) -> dict[str, Any]:
    if family is not None and family not in (BUILTIN_FAMILY, *LISTED_FAMILIES):
        raise ApiError(422, "validation_error", f"unknown family {family!r}: use one of "
                                                f"{', '.join((BUILTIN_FAMILY, *LISTED_FAMILIES))}.")
    if family is None and not q:
        items = _builtins() + _families()   # no name lists: answers at once
    else:
        items = [e for e in _builtins() if _matches(e["id"], q)] if family in (None, BUILTIN_FAMILY) else []
        for name in ([family] if family in LISTED_FAMILIES else [] if family else ["timm", "torchvision"]):
            listed = await run_in_threadpool(names.names, name)
            items += [{**e, "object": "architecture", "family": name} for e in listed if _matches(e["id"], q)]
    if after:
        ids = [e["id"] for e in items]
        if after not in ids:
            raise ApiError(422, "validation_error",
                           f"unknown cursor after={after!r}: pass the last_id of a previous page.")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "last_id": page[-1]["id"] if page else None}
