"""The model zoo: build architectures by name, load weights safely, fetch RobustBench models.

Weights from users are safetensors only (loading a pickle runs arbitrary code). RobustBench's
own `.pt` files are read with torch's restricted unpickler (weights_only=True) and nothing else.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from core.engine.architectures import _registry, import_robustbench, list_architectures, register_architecture
from core.engine.architectures._layers import PixelInputModel, with_pixel_input
from core.engine.architectures.robustbench_zoo import robustbench_entry
from core.engine.checkpoint import save_weights
from core.errors import InvalidModelFile, ModelDownloadFailed, ValidationError

__all__ = [
    "PixelInputModel", "check_forward", "create_model", "image_hw", "import_robustbench", "list_architectures",
    "load_model_file", "load_robustbench_model", "load_state_dict_file", "register_architecture", "save_model_file",
    "with_pixel_input",
]

log = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 8
_LISTED_KEYS = 8  # keys named in an error message; the rest are counted


ImageSize = int | tuple[int, int]


def image_hw(image_size: ImageSize) -> tuple[int, int]:
    """(height, width) of an image size given as one side (square) or as (height, width)."""
    if isinstance(image_size, int):
        return image_size, image_size
    height, width = (int(v) for v in image_size)
    return height, width


def create_model(architecture: str, *, num_classes: int, in_channels: int = 3, image_size: ImageSize = 32,
                 dataset: str = "cifar10", threat_model: str = "Linf") -> nn.Module:
    """A freshly initialised network (train mode) returning logits.

    Built-in and RobustBench architectures take images in [0, 1]; timm: and torchvision: ones take
    what they were trained on (wrap them with with_pixel_input for [0, 1] pixels).
    """
    if num_classes < 2:
        raise ValidationError(f"a classifier needs at least 2 classes, got num_classes={num_classes}.")
    if in_channels < 1:
        raise ValidationError(f"in_channels must be ≥ 1, got {in_channels}.")
    height, width = image_hw(image_size)
    if min(height, width) < MIN_IMAGE_SIZE:
        raise ValidationError(f"images must be at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE}, got {height}×{width}.")
    return _registry.build(architecture, num_classes=num_classes, in_channels=in_channels,
                           image_size=(height, width), dataset=dataset, threat_model=threat_model)


# --- safetensors files ---------------------------------------------------------------------------

def _refuse_pickle(path: Path, head: bytes, name: str | None = None) -> None:
    # torch.save writes a zip archive (PK..); older torch and plain pickle start with the PROTO opcode 0x80.
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise InvalidModelFile(
            f"{name or path.name} is a pickle file; pickle is refused because loading it runs arbitrary code; "
            "save the state dict with safetensors.torch.save_file(model.state_dict(), 'model.safetensors').")


def load_state_dict_file(path: str | Path, *, label: str | None = None) -> dict[str, torch.Tensor]:
    """A safetensors state dict (CPU tensors). Pickles, truncated or garbled files → InvalidModelFile.

    `label` names the file in error messages (e.g. the user's upload name, where `path` is a
    content-addressed store path that would mean nothing to them); by default the file's name.
    """
    path = Path(path)
    name = label or path.name
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise InvalidModelFile(f"cannot read the model file {path}: {exc.strerror or exc}.") from None
    _refuse_pickle(path, head, name)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InvalidModelFile(
            f"{name} is not a valid safetensors file ({exc}); it may be truncated or corrupt: "
            "save it again with safetensors.torch.save_file(model.state_dict(), path).") from None
    if not state:
        raise InvalidModelFile(f"{name} holds no tensors; save the model's state_dict() into it.")
    return state


def _align_prefixes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """Drop or add the wrapper prefixes that training code leaves on keys (DataParallel's "module.",
    some repositories' "model."), choosing the spelling whose keys match the architecture best."""
    def strip(d: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in d.items()}

    plain = dict(state)
    candidates = [plain, strip(plain, "module."), strip(strip(plain, "module."), "model."),
                  {"model." + k: v for k, v in strip(plain, "module.").items()}]
    return max(candidates, key=lambda c: len(expected.keys() & c.keys()))


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    return shown + (f" and {len(keys) - _LISTED_KEYS} more" if len(keys) > _LISTED_KEYS else "")


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, what: str,
                     optional_missing: frozenset[str] = frozenset()) -> None:
    """InvalidModelFile naming missing and unexpected keys, and every shape that differs."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in optional_missing]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listed(unexpected)}")
    wrong = [f"{k}: expected shape {list(expected[k].shape)}, found {list(v.shape)}"
             for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        problems.append("shape mismatch for " + "; ".join(wrong[:_LISTED_KEYS])
                        + (f" and {len(wrong) - _LISTED_KEYS} more" if len(wrong) > _LISTED_KEYS else ""))
    if problems:
        raise InvalidModelFile(f"{what} does not match the architecture: {'; '.join(problems)}. "
                               "Check the architecture name, class count and input shape.")


@torch.no_grad()
def check_forward(model: nn.Module, *, num_classes: int, in_channels: int, image_size: ImageSize, what: str) -> None:
    """One forward pass on a blank image: the output must be (1, num_classes) and finite."""
    height, width = image_hw(image_size)
    try:
        logits = model(torch.zeros(1, in_channels, height, width))
    except (RuntimeError, AssertionError, ValueError) as exc:  # timm asserts on input sizes it cannot take
        raise InvalidModelFile(f"{what} fails on a {in_channels}×{height}×{width} input ({exc}); "
                               "check the declared input size.") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, num_classes):
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InvalidModelFile(f"{what} returns {shape} for one image; expected [1, {num_classes}] logits. "
                               "Check the declared class count.")
    if not torch.isfinite(logits).all():
        raise InvalidModelFile(f"{what} returns non-finite logits (NaN or inf) on a blank image; "
                               "the weights are likely corrupt.")


def load_model_file(path: str | Path, architecture: str, *, num_classes: int, in_channels: int = 3,
                    image_size: ImageSize = 32, dataset: str = "cifar10", threat_model: str = "Linf",
                    label: str | None = None, input_mean: Sequence[float] | None = None,
                    input_std: Sequence[float] | None = None) -> nn.Module:
    """Build `architecture`, load the safetensors weights at `path` strictly, check one forward pass.

    `label` is how error messages name the file (default: its file name). With `input_mean` /
    `input_std` the network is wrapped to take [0, 1] pixels (its state dict keeps the
    architecture's keys). Returns the model in eval mode on the CPU.
    """
    state = load_state_dict_file(path, label=label)
    model = create_model(architecture, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                         dataset=dataset, threat_model=threat_model)
    state = _align_prefixes(state, model.state_dict())
    what = f"the weights in {label or Path(path).name}"
    check_state_dict(model, state, what=what)
    model.load_state_dict(state, strict=True)
    model = with_pixel_input(model, input_mean, input_std).eval()
    check_forward(model, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                  what=f"{architecture} with {what}")
    return model


def save_model_file(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Save weights as safetensors (the only format load_model_file reads)."""
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    else:
        state = dict(model_or_state_dict)
    save_weights(state, path)


# --- RobustBench ---------------------------------------------------------------------------------

# Buffers that some RobustBench checkpoints lack because the constructor sets them (RobustBench's
# own loader tolerates exactly these for a few models).
_CONSTRUCTOR_BUFFERS = ("mean", "std", "mu", "sigma")


def robustbench_weights_path(name: str, *, dataset: str, threat_model: str, model_dir: str | Path) -> Path:
    """RobustBench's layout: <model_dir>/<dataset>/<threat_model>/<name>.pt."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


def load_robustbench_model(name: str, *, dataset: str = "cifar10", threat_model: str = "Linf",
                           model_dir: str | Path, allow_download: bool = False) -> nn.Module:
    """A RobustBench model with its weights, in eval mode on the CPU.

    Weights come from <model_dir>/<dataset>/<threat_model>/<name>.pt; when missing and allowed,
    they are downloaded there with robustbench's own Google Drive helper.
    """
    entry = robustbench_entry(name, dataset=dataset, threat_model=threat_model)
    path = robustbench_weights_path(name, dataset=dataset, threat_model=threat_model, model_dir=model_dir)
    if not path.is_file():
        if not allow_download:
            raise ModelDownloadFailed(f"weights not found at {path}; downloads are disabled "
                                      "(ROBUSTIFY_ALLOW_DOWNLOAD); place RobustBench's file there or enable downloads.")
        _download_robustbench(name, entry.get("gdrive_id"), path)
    model: nn.Module = entry["model"]()
    expected = model.state_dict()
    state = _align_prefixes(_read_robustbench_checkpoint(path), expected)
    parameters = dict(model.named_parameters())
    optional = frozenset(k for k in expected if k not in parameters and k.split(".")[-1] in _CONSTRUCTOR_BUFFERS)
    check_state_dict(model, state, what=f"RobustBench's {name} file {path}", optional_missing=optional)
    model.load_state_dict(state, strict=not any(k not in state for k in optional))
    return model.eval()


def _download_robustbench(name: str, gdrive_id: object, path: Path) -> None:
    if not gdrive_id:
        raise ModelDownloadFailed(f"RobustBench lists no download for {name}; place its weights at {path}.")
    import_robustbench()
    from robustbench.utils import download_gdrive_new

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")  # a failed download must not look like a finished one
    log.info("downloading RobustBench's %s (Google Drive id %s) to %s", name, gdrive_id, path)
    try:
        download_gdrive_new(gdrive_id, partial)
        if not partial.is_file() or partial.stat().st_size == 0:
            raise OSError("no data arrived")
        os.replace(partial, path)
    except Exception as exc:  # gdown and requests raise many types (network, quota, permission)
        partial.unlink(missing_ok=True)
        raise ModelDownloadFailed(
            f"downloading RobustBench's {name} (Google Drive id {gdrive_id}) to {path} failed "
            f"({type(exc).__name__}: {exc}); retry later, or download it yourself and place it at {path}.") from None


def _read_robustbench_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(512)
    if head.lstrip().startswith(b"<"):
        raise ModelDownloadFailed(
            f"{path} arrived as HTML (probably a Google Drive quota or confirmation page), not as weights; "
            "delete it and retry, or place the real file there.")
    try:
        # weights_only=True: torch's restricted unpickler builds tensors and containers, never arbitrary objects.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... for a bad file
        raise ModelDownloadFailed(
            f"{path} is corrupt or not a weights file torch can read safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it and retry, or place the real file there."
        ) from None
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    elif isinstance(checkpoint, Mapping) and "last" in checkpoint and isinstance(checkpoint["last"], Mapping):
        checkpoint = checkpoint["last"]  # a few RobustBench entries keep {'last': ..., 'best': ...}
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ModelDownloadFailed(f"{path} does not hold a state dict of tensors; delete it and retry, "
                                  "or place the real file there.")
    return dict(checkpoint)

