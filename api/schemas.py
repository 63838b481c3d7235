"""Request bodies (what the API answers is api/responses.py).

The job's `config` and `threat_model` are the engine's own pydantic models
(core.engine.config.FinetuneConfig / EvaluateConfig / ThreatModelSpec), so defaults are filled in
and bad values are 422s naming the field.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.json_schema import models_json_schema

from core.engine.config import EvaluateConfig, FinetuneConfig, ThreatModelSpec
from core.engine.recipes.frontier import RecommendRule, SweepSpec
from core.limits import MAX_NUM_CLASSES, MAX_SEED
from core.service.webhooks import WEBHOOK_URL_PATTERN, WebhookEventType
from core.states import JobType

BUILTIN_DATASETS: dict[str, list[int]] = {
    # name -> the input shape [C, H, W] of its images
    "digits": [1, 8, 8],
    "fashion-mnist": [1, 28, 28],
    "cifar10": [3, 32, 32],
    "cifar100": [3, 32, 32],
}
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")
ROBUSTBENCH_THREATS = ("Linf", "L2", "corruptions")


_COMPONENTS = "#/components/schemas/"
RECIPE_CONFIGS: tuple[type[BaseModel], ...] = (FinetuneConfig, EvaluateConfig)


def add_recipe_schemas(openapi: dict[str, Any]) -> dict[str, Any]:
    """Put the recipe configs (and the models they use) into the OpenAPI components, which
    JobCreate.config refers to; FastAPI only adds models that a route declares itself."""
    _, defs = models_json_schema([(m, "validation") for m in RECIPE_CONFIGS],
                                 ref_template=_COMPONENTS + "{model}")
    components = openapi.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in defs.get("$defs", {}).items():
        components.setdefault(name, schema)
    return openapi


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# ---------------------------------------------------------------------------- requests
class RobustBenchRef(_Body):
    name: str = Field(min_length=1, max_length=180, pattern=r"^[A-Za-z0-9_.\-]+$",
                      examples=["Wang2023Better_WRN-28-10"])
    dataset: Literal["cifar10", "cifar100", "imagenet"] = "cifar10"
    threat_model: Literal["Linf", "L2", "corruptions"] = "Linf"


class RobustBenchModelCreate(RobustBenchRef):
    """POST /v1/models with a JSON body registers a RobustBench model."""

    source: Literal["robustbench"]
    metadata: dict[str, Any] | None = None


def _json_object(value: Any) -> Any:
    """A form field holding a JSON object (or nothing)."""
    import json

    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"metadata must be a JSON object ({exc})") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError("metadata must be a JSON object")
    return value


def _number_list(value: Any, what: str, example: str) -> Any:
    """A form's text "1,8,8", "1x8x8" or "[1, 8, 8]" -> a list of numbers (None when empty); any
    other value is left to the field's type."""
    if isinstance(value, str):
        text = value.strip().strip("[]")
        if not text:
            return None
        parse = int if what in ("input_size", "input_shape") else float
        try:
            return [parse(p) for p in text.replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise ValueError(f'{what} must look like "{example}"') from None
    return value


MAX_IMAGE_SIDE = 4096
# The schemas state what the validators check (which keep their own clearer messages).
ImageSize = Annotated[list[int], WithJsonSchema({
    "type": "array", "minItems": 3, "maxItems": 3,
    "items": {"type": "integer", "minimum": 1, "maximum": MAX_IMAGE_SIDE}})]
ChannelStats = Annotated[list[float], Field(min_length=1, max_length=MAX_IMAGE_SIDE)]


def _image_size(value: list[int] | None, what: str) -> list[int] | None:
    if value is not None and (len(value) != 3 or any(v < 1 or v > MAX_IMAGE_SIDE for v in value)):
        raise ValueError(f"{what} must be three positive sizes: channels, height, width "
                         f"(each at most {MAX_IMAGE_SIDE})")
    return value


class InputContract(_Body):
    """What the model takes: input_size [C, H, W] and the per-channel mean/std it was trained with.

    The engine feeds the network (x - input_mean) / input_std with x in [0, 1]; omitted, the mean
    and std default to the data set's statistics for timm:/torchvision: architectures (cifar10,
    cifar100, imagenet) and to identity otherwise (built-in architectures normalise inside).
    """

    input_size: ImageSize | None = Field(default=None, description="[C, H, W]; default from the dataset",
                                         examples=[[3, 224, 224]])
    input_mean: ChannelStats | None = Field(default=None, examples=[[0.485, 0.456, 0.406]])
    input_std: ChannelStats | None = Field(default=None, examples=[[0.229, 0.224, 0.225]])

    @field_validator("input_size")
    @classmethod
    def _size(cls, value: list[int] | None) -> list[int] | None:
        return _image_size(value, "input_size")

    @model_validator(mode="after")
    def _stats_per_channel(self) -> InputContract:
        from core.engine.input_contract import check_input_stats

        if (self.input_mean is None) != (self.input_std is None):
            raise ValueError("give both input_mean and input_std, or neither")
        if self.input_mean is not None and self.input_std is not None:
            channels = self.input_size[0] if self.input_size else len(self.input_mean)
            problem = check_input_stats(self.input_mean, self.input_std, channels)
            if problem:
                raise ValueError(problem)
        return self


class ModelUploadForm(InputContract):
    """The text fields of the multipart upload (the weights come as the `file` part)."""

    architecture: str = Field(min_length=1, max_length=200)
    num_classes: int = Field(ge=2, le=MAX_NUM_CLASSES)
    dataset: str = Field(min_length=1, max_length=100)
    name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] | None = None
    input_shape: ImageSize | None = Field(default=None, description="the former name of input_size")

    @field_validator("metadata", mode="before")
    @classmethod
    def _json_metadata(cls, value: Any) -> Any:
        return _json_object(value)

    @field_validator("input_size", "input_shape", "input_mean", "input_std", mode="before")
    @classmethod
    def _text(cls, value: Any, info: Any) -> Any:
        """A form sends every field as text (a JSON body states lists as lists)."""
        example = "0.485,0.456,0.406" if info.field_name in ("input_mean", "input_std") else "3,224,224"
        return _number_list(value, info.field_name, example)

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, value: list[int] | None) -> list[int] | None:
        return _image_size(value, "input_shape")

    @model_validator(mode="after")
    def _one_size(self) -> ModelUploadForm:
        if self.input_shape is not None:
            if self.input_size is not None and self.input_size != self.input_shape:
                raise ValueError("input_shape is the former name of input_size; give one of them")
            self.input_size = self.input_shape
        return self


class HubModelCreate(InputContract):
    """POST /v1/models with a JSON body {"source": "hf-hub", ...} registers a timm model on the Hugging Face Hub.

    Its config.json and model.safetensors are read from the worker's Hugging Face cache
    (downloaded when downloads are allowed). input_size, input_mean and input_std default to the
    hub config's pretrained_cfg.
    """

    source: Literal["hf-hub"]
    name: str = Field(min_length=1, max_length=160, examples=["timm/resnet18.a1_in1k"],
                      description="the repository id, org/name")
    revision: str | None = Field(default=None, max_length=100, pattern=r"^[A-Za-z0-9._/-]+$",
                                 description="a branch, tag or commit (refs/pr/1); no '..', '//', or part starting "
                                             "with '.' or '/' (git's ref-name rules)")
    num_classes: int = Field(ge=2, le=MAX_NUM_CLASSES)
    dataset: str = Field(min_length=1, max_length=100, description="what it was trained on")
    metadata: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _repo(cls, value: str) -> str:
        from core.engine.hub import is_repo_id

        if not is_repo_id(value):
            raise ValueError("name must be a Hugging Face repository id such as timm/resnet18.a1_in1k (org/name: "
                             "letters, digits, '.', '_', '-'; no '--' or '..', no part ending in '.' or '-', "
                             "nothing after it, not even a newline)")
        return value

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        from core.engine.hub import is_revision

        if value is not None and not is_revision(value):
            raise ValueError("revision must be a branch, tag or commit such as main, v1.0 or refs/pr/1: no '..' "
                             "or '//', no part that starts with '.', no leading or trailing '/'")
        return value


class InlineModelRef(_Body):
    robustbench: RobustBenchRef


def _webhook_url(value: str) -> str:
    from core.service.webhooks import url_problem

    problem = url_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# An absolute http(s) URL; whether its host resolves to a public address is checked on use
# (422 webhook_target_forbidden / webhook_target_unresolvable).
# (The pattern is checked by _webhook_url, with a clearer message than pydantic's.)
WebhookUrl = Annotated[str, Field(min_length=1, max_length=2048, examples=["https://ci.example.com/robustify-hook"],
                                  json_schema_extra={"pattern": WEBHOOK_URL_PATTERN}), AfterValidator(_webhook_url)]


class JobWebhook(_Body):
    url: WebhookUrl = Field(description="Where to POST the job's webhooks (registered as an endpoint of this API key "
                                        "on first use; its signing secret is on GET /v1/webhooks).")
    events: list[WebhookEventType] | None = Field(
        default=None, min_length=1, description="Event types to send; omitted: the endpoint's (default every type).")


class WebhookEndpointCreate(_Body):
    url: WebhookUrl
    events: list[WebhookEventType] | None = Field(default=None, min_length=1,
                                                  description="Event types to send; omitted: every type.")
    default: bool = Field(default=False, description="Send the webhooks of every job of this API key that "
                                                     "names no webhook here (one default per key).")
    description: str | None = Field(default=None, max_length=200)


# Exactly one of model_id and model is given (null counts as absent): the schema says so as the
# validator _one_model checks it.
_ONE_MODEL: dict[str, Any] = {"oneOf": [
    {"required": ["model_id"], "properties": {"model_id": {"type": "string"}, "model": {"type": "null"}}},
    {"required": ["model"], "properties": {"model": {"type": "object"}, "model_id": {"type": "null"}}},
]}


class JobCreate(_Body):
    model_config = ConfigDict(json_schema_extra=_ONE_MODEL)

    type: JobType
    model_id: str | None = Field(default=None, max_length=40, description="A registered model; or give `model`.")
    model: InlineModelRef | None = Field(default=None, description="An inline RobustBench reference (registered on "
                                                                   "first use); or give `model_id`.")
    dataset: str = Field(min_length=1, max_length=100, examples=list(BUILTIN_DATASETS),
                         description="A built-in data set (digits, fashion-mnist, cifar10, cifar100) or a dataset id.")
    threat_model: ThreatModelSpec | None = None
    # A plain object here: the route validates it with the model that `type` names, so a bad
    # value is a 422 naming body.config.<field>. The schema below documents both recipes.
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Recipe fields, each optional (defaults shown): FinetuneConfig when type is finetune or "
                    "sweep (every child's recipe), EvaluateConfig when type is evaluate.",
        json_schema_extra={"anyOf": [{"$ref": f"{_COMPONENTS}{m.__name__}"} for m in RECIPE_CONFIGS]},
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    metadata: dict[str, Any] | None = None
    webhook: JobWebhook | None = Field(default=None, description="Signed webhooks for this job (default: the "
                                                                 "API key's default endpoint, if any).")
    sweep: SweepSpec | None = Field(default=None, description="type sweep only: the values to fine-tune with, one "
                                                              "child fine-tune per combination.")
    recommend: RecommendRule | None = Field(default=None, description="type sweep only: the rule that picks one "
                                                                      "child (default: the highest w2 within a "
                                                                      "clean drop of 0.03).")

    @model_validator(mode="after")
    def _one_model(self) -> JobCreate:
        if (self.model_id is None) == (self.model is None):
            raise ValueError("give exactly one of model_id or model (an inline {\"robustbench\": {...}} reference)")
        return self

    @model_validator(mode="after")
    def _sweep_fields(self) -> JobCreate:
        if self.type == "sweep" and self.sweep is None:
            raise ValueError('a sweep needs `sweep`, the values to fine-tune with, e.g. {"delta": [0.05, 0.1, 0.2]}')
        if self.type != "sweep" and (self.sweep is not None or self.recommend is not None):
            raise ValueError(f"`sweep` and `recommend` belong to type sweep, not {self.type}")
        return self
