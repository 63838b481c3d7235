"""/v1/architectures: the built-in architectures and the families, with a search of a family's names."""
from __future__ import annotations

import fnmatch
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from api import responses as r
from api.catalog import BUILTIN_FAMILY, LISTED_FAMILIES, ArchitectureCatalog
from api.deps import CallerDep
from api.errors import ApiError
from api.routes.common import PageLimit
from core.engine.architecture_names import BUILTIN_ARCHITECTURES, parse_architecture
from core.errors import ErrorCode

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
    name, q = parse_architecture(entry_id).name.lower(), q.lower()
    return fnmatch.fnmatchcase(name, q) if any(c in q for c in "*?[") else q in name


def catalog(request: Request) -> ArchitectureCatalog:
    return request.app.state.architecture_catalog


CatalogDep = Annotated[ArchitectureCatalog, Depends(catalog)]


# The families a search without `family` covers (RobustBench's names are searched by family).
_SEARCHED_BY_DEFAULT = ("timm", "torchvision")
Family = Literal["builtin", "timm", "torchvision", "robustbench"]
assert set(get_args(Family)) == {BUILTIN_FAMILY, *LISTED_FAMILIES}  # one list of families
FamilyFilter = Annotated[Family | None, Query(description="the family to search")]
NameQuery = Annotated[str | None, Query(max_length=200, description="part of a name, or a pattern with * and ?; "
                                        "without family it searches builtin, timm and torchvision")]
NameAfter = Annotated[str | None, Query(max_length=300, description="last_id of the page before")]


@router.get("", response_model=r.ArchitectureList, response_model_exclude_unset=True,
            summary="List architectures: the built-ins and the families, or search a family's names",
            description="A family's names are listed once per server, in the background: until then "
                        "(seconds after an install or upgrade) a search answers 503 `catalog_building` with "
                        "Retry-After.")
async def list_architectures(who: CallerDep, names: CatalogDep, family: FamilyFilter = None, q: NameQuery = None,
                             limit: PageLimit = 50, after: NameAfter = None) -> dict[str, Any]:
    if family is None and not q:
        items = _builtins() + _families()   # no name lists: answers at once
    else:
        items = [e for e in _builtins() if _matches(e["id"], q)] if family in (None, BUILTIN_FAMILY) else []
        wanted = [family] if family in LISTED_FAMILIES else [] if family else list(_SEARCHED_BY_DEFAULT)
        listed = await run_in_threadpool(names.names, wanted) if wanted else {}
        for name, entries in listed.items():
            items += [{**e, "object": "architecture", "family": name} for e in entries if _matches(e["id"], q)]
    if after:
        ids = [e["id"] for e in items]
        if after not in ids:
            raise ApiError(422, ErrorCode.VALIDATION_ERROR,
                           f"unknown cursor after={after!r}: pass the last_id of a previous page.")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "last_id": page[-1]["id"] if page else None}
