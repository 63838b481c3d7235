"""/v1/models: register uploaded safetensors weights, a RobustBench model or a Hugging Face Hub
timm model; list, get, delete. Fine-tunes register their result here too (worker/chain.py)."""
from __future__ import annotations

from typing import Any, Literal

import pydantic
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import responses as r
from api.bodies import check_metadata, media_type, read_json, read_multipart
from api.catalog import ArchitectureCatalog, unlisted_name_problem
from api.crud import find_owned_dataset, get_owned_model, visible_models
from api.deps import Caller, CallerDep, Services, ServicesDep, SessionDep
from api.errors import ApiError
from api.routes.common import BINARY, PageAfter, PageLimit, artifact_download, paginate
from api.schemas import (
    BUILTIN_DATASETS,
    HubModelCreate,
    InputContract,
    ModelUploadForm,
    RobustBenchModelCreate,
)
from api.tenants import shares
from core.engine.architecture_names import (
    BUILTIN_ARCHITECTURES,
    FAMILY_PREFIXES,
    is_known_architecture_name,
    parse_architecture,
    robustbench_architecture,
)
from core.engine.hub import hub_architecture
from core.engine.input_contract import default_input_stats
from core.errors import ErrorCode
from core.limits import MAX_NUM_CLASSES
from core.service.db import Artifact, Job, Model, new_id, utcnow
from core.service.queue import enqueue_model_validation
from core.service.uploads import inspect_safetensors
from core.states import TERMINAL_STATES
from core.storage.artifacts import commit_or_unstore, delete_artifact, record_artifact

router = APIRouter(prefix="/v1/models", tags=["models"])

_UPLOAD_SCHEMA = {
    "type": "object", "required": ["file", "architecture", "num_classes", "dataset"],
    "properties": {
        "file": {"type": "string", "format": "binary", "description": "safetensors state dict"},
        "architecture": {"type": "string", "description": f"one of {', '.join(BUILTIN_ARCHITECTURES)}, "
                         "timm:<name>, torchvision:<name> or robustbench:<name> (GET /v1/architectures)",
                         "examples": list(BUILTIN_ARCHITECTURES)},
        "num_classes": {"type": "integer", "minimum": 2, "maximum": MAX_NUM_CLASSES},
        "dataset": {"type": "string", "minLength": 1, "maxLength": 100},
        "name": {"type": "string"}, "metadata": {"type": "string", "description": "a JSON object"},
        # Descriptions are the dashboard's form hints: words for users, no class names. input_shape,
        # the former name of input_size, is still accepted and left out of the form.
        "input_size": {"type": "string", "description": "channels,height,width the model takes, e.g. 3,224,224; "
                                                        "default: the data set's image shape"},
        "input_mean": {"type": "string", "description": "per channel, e.g. 0.485,0.456,0.406: the network sees "
                                                        "(pixel - mean) / std with pixels in [0, 1]; default: the "
                                                        "data set's statistics for timm: and torchvision: models, "
                                                        "none otherwise (the built-in architectures normalise inside)"},
        "input_std": {"type": "string", "description": "per channel, e.g. 0.229,0.224,0.225; give it with input_mean"},
    },
}
_CREATE_OPENAPI = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": _UPLOAD_SCHEMA},
    "application/json": {"schema": {"oneOf": [RobustBenchModelCreate.model_json_schema(),
                                              HubModelCreate.model_json_schema()]}},
}}}


def _body(cls: type[pydantic.BaseModel], fields: Any) -> Any:
    """`fields` validated as `cls`, with its errors located in the request body."""
    try:
        return cls.model_validate(fields)
    except pydantic.ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _weights(session: Session, m: Model) -> Artifact | None:
    return session.get(Artifact, m.weights_artifact_id) if m.weights_artifact_id else None


def _enqueue_validation(svc: Services, session: Session, m: Model) -> None:
    try:
        enqueue_model_validation(svc.celery, m.id)
    except Exception as exc:  # the broker is down: say so instead of leaving it validating forever
        m.status = "rejected"
        m.error = {"code": ErrorCode.BROKER_UNAVAILABLE,
                   "message": f"could not queue the validation of this model ({exc}); register it again when the "
                              "broker is back."}
        session.commit()


@router.post("", status_code=201, response_model=r.Model, openapi_extra=_CREATE_OPENAPI, summary="Register a model")
async def create_model(request: Request, svc: ServicesDep, who: CallerDep, session: SessionDep) -> r.Model:
    kind = media_type(request)
    limit = svc.settings.max_upload_bytes
    if kind == "application/json":
        body = await read_json(request, svc.settings)
        if isinstance(body, dict) and body.get("source") == "hf-hub":
            hub = _body(HubModelCreate, body)
            check_metadata(hub.metadata, svc.settings)
            return await run_in_threadpool(_create_hub, svc, session, who, hub)
        spec = _body(RobustBenchModelCreate, body)
        check_metadata(spec.metadata, svc.settings)
        return await run_in_threadpool(_create_robustbench, svc, session, who, spec)
    if kind == "multipart/form-data":
        with shares(request).uploads.held(who.key_id):  # the key's own share of the uploads (429 beyond it)
            upload = await read_multipart(request, svc.store, limit)
            try:
                return await run_in_threadpool(_create_upload, svc, session, who,
                                               request.app.state.architecture_catalog, upload.fields,
                                               upload.file_path, upload.filename)
            finally:
                upload.discard()  # no-op once the file was moved into the store
    raise ApiError(415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                   "send multipart/form-data (a safetensors upload) or application/json "
                   '({"source": "robustbench", ...} or {"source": "hf-hub", ...}).')


# What a RobustBench data set implies about a model's head and input.
_ROBUSTBENCH_SHAPES: dict[str, tuple[int, list[int]]] = {
    "cifar10": (10, [3, 32, 32]), "cifar100": (100, [3, 32, 32]), "imagenet": (1000, [3, 224, 224]),
}


def register_robustbench_model(svc: Services, session: Session, who: Caller,
                               spec: RobustBenchModelCreate) -> Model:
    """A `validating` row for a RobustBench model; the worker fetches and checks the weights."""
    num_classes, input_shape = _ROBUSTBENCH_SHAPES[spec.dataset]
    m = Model(
        id=new_id("mdl"), owner_key_id=who.key_id, name=spec.name, source="robustbench",
        architecture=robustbench_architecture(spec.name), num_classes=num_classes, dataset=spec.dataset,
        input_shape=input_shape, threat_model=spec.threat_model, status="validating", meta=spec.metadata,
    )
    session.add(m)
    session.commit()
    _enqueue_validation(svc, session, m)
    return m


def _create_robustbench(svc: Services, session: Session, who: Caller, spec: RobustBenchModelCreate) -> r.Model:
    return r.Model.from_row(register_robustbench_model(svc, session, who, spec), None)


def _create_hub(svc: Services, session: Session, who: Caller, spec: HubModelCreate) -> r.Model:
    """A `validating` row for a Hub model; the worker reads its config and weights, and fills in
    the input size, mean and std that the registration left to the hub's config."""
    size = spec.input_size or BUILTIN_DATASETS.get(spec.dataset) or _uploaded_shape(session, who, spec.dataset)
    if size is not None and spec.input_mean is not None:
        _check_channels(spec.input_mean, size)
    m = Model(
        id=new_id("mdl"), owner_key_id=who.key_id, name=spec.name, source="hf-hub",
        architecture=hub_architecture(spec.name, spec.revision), num_classes=spec.num_classes,
        dataset=spec.dataset, input_shape=size, input_mean=spec.input_mean, input_std=spec.input_std,
        status="validating", meta=spec.metadata,
    )
    session.add(m)
    session.commit()
    _enqueue_validation(svc, session, m)
    return r.Model.from_row(m, None)


def _input_contract(architecture: str, dataset: str, size: list[int], form: InputContract
                    ) -> tuple[list[float], list[float]]:
    """The stated mean/std, else the defaults of core.engine.input_contract; checked against the channels."""
    if form.input_mean is None or form.input_std is None:
        return default_input_stats(architecture, dataset, size[0])
    _check_channels(form.input_mean, size)
    return list(form.input_mean), list(form.input_std)


def _check_channels(mean: list[float], size: list[int]) -> None:
    """A stated mean/std has one value per input channel (the size may come from the data set)."""
    if len(mean) != size[0]:
        raise RequestValidationError([{
            "loc": ("body", "input_mean"), "type": "value_error",
            "msg": f"input_mean and input_std have {len(mean)} values but the input has {size[0]} "
                   f"channels (input_size {size})"}])


def _create_upload(svc: Services, session: Session, who: Caller, catalog: ArchitectureCatalog,
                   fields: dict[str, str], file_path: Any, filename: str | None) -> r.Model:
    form = _body(ModelUploadForm, fields)
    check_metadata(form.metadata, svc.settings)
    if file_path is None:
        raise RequestValidationError([{"loc": ("body", "file"), "msg": "Field required: the safetensors file part",
                                       "type": "missing"}])
    if not is_known_architecture_name(form.architecture):
        name = form.architecture
        families = ", ".join(f"{p}<name>" for p in FAMILY_PREFIXES)
        hint = "" if ":" in name else f" (for timm's or torchvision's {name}: timm:{name} or torchvision:{name})"
        raise ApiError(422, ErrorCode.UNSUPPORTED_ARCHITECTURE,
                       f"unknown architecture {name!r}{hint}: use one of {', '.join(BUILTIN_ARCHITECTURES)} or a "
                       f"family: {families}; GET /v1/architectures lists them.")
    if parse_architecture(form.architecture).is_hub:
        raise ApiError(422, ErrorCode.UNSUPPORTED_ARCHITECTURE,
                       'register a Hugging Face Hub model with a JSON body {"source": "hf-hub", "name": '
                       '"<org>/<repo>", "num_classes": ..., "dataset": ...}; to upload your own weights for its '
                       "architecture, name the architecture in its config.json as timm:<architecture>.")
    problem = unlisted_name_problem(catalog, form.architecture)
    if problem:
        raise ApiError(422, ErrorCode.UNSUPPORTED_ARCHITECTURE, problem,
                       errors=[{"loc": ["body", "architecture"], "field": "architecture", "msg": problem,
                                "type": "value_error"}])
    input_shape = form.input_size or _default_shape(session, who, form.dataset)
    input_mean, input_std = _input_contract(form.architecture, form.dataset, input_shape, form)
    inspect_safetensors(file_path)  # InvalidModelFile -> 422, and the temp file is discarded
    weights = record_artifact(
        session, svc.store, kind="model_weights", src_path=file_path, move=True,
        filename=_safe_name(filename) or "model.safetensors", content_type="application/octet-stream",
        owner_key_id=who.key_id,
    )
    m = Model(
        id=new_id("mdl"), owner_key_id=who.key_id, name=form.name or _safe_name(filename) or form.architecture,
        source="upload", architecture=form.architecture, num_classes=form.num_classes, dataset=form.dataset,
        input_shape=input_shape, input_mean=input_mean, input_std=input_std, status="validating",
        weights_artifact_id=weights.id, meta=form.metadata,
    )
    session.add(m)
    commit_or_unstore(session, svc.store, weights.sha256, check=lambda: r.Model.from_row(m, weights).model_dump_json())
    _enqueue_validation(svc, session, m)
    return r.Model.from_row(m, weights)


def _uploaded_shape(session: Session, who: Caller, dataset: str) -> list[int] | None:
    ds = find_owned_dataset(session, who, dataset)
    return list(ds.image_shape) if ds is not None else None


def _default_shape(session: Session, who: Caller, dataset: str) -> list[int]:
    shape = BUILTIN_DATASETS.get(dataset) or _uploaded_shape(session, who, dataset)
    if shape is not None:
        return shape
    raise RequestValidationError([{
        "loc": ("body", "input_size"), "type": "missing",
        "msg": f"input_size is required for dataset {dataset!r} (no default size is known for it), e.g. \"3,224,224\"",
    }])


def _safe_name(filename: str | None) -> str | None:
    if not filename:
        return None
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return name[:200] or None


@router.get("", response_model=r.ModelList, summary="List models")
def list_models(who: CallerDep, session: SessionDep, limit: PageLimit = 20,
                after: PageAfter = None,
                status: Literal["validating", "ready", "rejected"] | None = None) -> r.ModelList:
    visible = visible_models(who)
    stmt = select(Model).where(*visible)
    if status:
        stmt = stmt.where(Model.status == status)
    rows, more = paginate(session, stmt, Model, after, limit, after_filter=visible[0])
    return r.ModelList.page([r.Model.from_row(m, _weights(session, m)) for m in rows], more)


@router.get("/{model_id}", response_model=r.Model, summary="Get a model")
def get_model(model_id: str, who: CallerDep, session: SessionDep) -> r.Model:
    m = get_owned_model(session, who, model_id)
    return r.Model.from_row(m, _weights(session, m))


@router.delete("/{model_id}", response_model=r.Deleted, summary="Delete a model")
def delete_model(model_id: str, svc: ServicesDep, who: CallerDep, session: SessionDep) -> r.Deleted:
    m = get_owned_model(session, who, model_id)
    busy = session.scalar(select(Job.id).where(Job.model_id == m.id, Job.status.not_in(TERMINAL_STATES)).limit(1))
    if busy:
        raise ApiError(409, ErrorCode.CONFLICT, f"model {m.id} is used by job {busy}, which has not finished; "
                                        "cancel it or wait for it to finish first.", job_id=busy)
    weights = _weights(session, m)
    # The row stays (finished jobs refer to it) but disappears from the API.
    m.deleted_at = utcnow()
    m.weights_artifact_id = None
    session.flush()
    if weights is not None:
        delete_artifact(session, svc.store, weights)
    session.commit()
    return r.Deleted(id=m.id, object="model", deleted=True)


@router.get("/{model_id}/content", summary="Download the weights (safetensors)",
            response_class=Response, responses={200: {"content": {"application/octet-stream": BINARY}}})
def model_content(model_id: str, request: Request, svc: ServicesDep, who: CallerDep, session: SessionDep) -> Any:
    m = get_owned_model(session, who, model_id)
    weights = _weights(session, m)
    if weights is None and m.status == "validating":
        raise ApiError(409, ErrorCode.MODEL_NOT_READY, f"model {m.id} is still validating; its weights can be "
                                               "downloaded once it is ready.", model_id=m.id, model_status=m.status)
    if weights is None:
        raise ApiError(404, ErrorCode.NOT_FOUND, f"model {m.id} has no stored weights "
                                         "(RobustBench models are loaded from the RobustBench zoo by the worker).")
    return artifact_download(request, svc.store, weights)
