"""Hugging Face Hub models in timm's format, read from the local Hugging Face cache.

A timm model on the Hub is a repository with `config.json` (the timm architecture, the class
count, and `pretrained_cfg` with the input size, mean and std it was trained with) and
`model.safetensors` (its state dict with timm's keys). Both are looked up in the local cache
first (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub, as huggingface_hub
itself does) and downloaded into it only when downloads are allowed (ROBUSTIFY_ALLOW_DOWNLOAD).
Repositories that hold only `pytorch_model.bin` are refused: that file is a pickle.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.engine.input_contract import check_input_stats
from core.errors import InvalidModelFile, ModelDownloadFailed, UnsupportedArchitecture

HUB_PREFIX = "timm:hf-hub:"
# The Hub's repository ids: "name" or "org/name", letters, digits, ".", "_", "-"; no "--" or "..",
# no part ending in "." or "-". \Z, not $: Python's $ also matches before a trailing newline.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
REPO_ID = re.compile(rf"(?!.*(--|\.\.)){_PART}(/{_PART})?\Z")
# A git revision: a branch, tag or commit, possibly with "/" (refs/pr/1); no ".." or "//", no part
# that starts with "." and no leading or trailing "/" (git's own ref-name rules, restricted).
REVISION = re.compile(r"(?!.*(\.\.|//))(?!/)(?!.*/\Z)(?!\.)(?!.*/\.)[A-Za-z0-9._/-]{1,100}\Z")


def is_repo_id(value: str) -> bool:
    return REPO_ID.match(value) is not None


def is_revision(value: str) -> bool:
    return REVISION.match(value) is not None


@dataclass(frozen=True)
class HubModelConfig:
    """What the repository's config.json says about the model."""

    repo: str
    revision: str
    architecture: str                   # "timm:<architecture>"
    num_classes: int
    input_size: list[int] | None        # [C, H, W]
    mean: list[float] | None
    std: list[float] | None


def hub_architecture(repo: str, revision: str | None = None) -> str:
    """The architecture name a hub registration carries until its config is read: timm:hf-hub:<repo>[@rev]."""
    return HUB_PREFIX + repo + (f"@{revision}" if revision else "")


def parse_hub_architecture(architecture: str) -> tuple[str, str]:
    """(repo, revision) of "timm:hf-hub:<repo>[@<revision>]" (revision "main" when absent)."""
    rest = architecture.removeprefix(HUB_PREFIX)
    repo, _, revision = rest.partition("@")
    revision = revision or "main"
    if not (is_repo_id(repo) and is_revision(revision)):  # the API refuses these; a stored row is checked again
        raise UnsupportedArchitecture(f"{architecture!r} does not name a Hugging Face Hub repository and revision "
                                      "(org/name[@revision], no '..', no leading '/' or '.').")
    return repo, revision


def hub_cache_dir() -> Path:
    """The Hugging Face cache, resolved now (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def fetch_hub_file(repo: str, filename: str, *, revision: str = "main", allow_download: bool = False) -> Path:
    """A file of a Hub repository from the local cache; downloaded into the cache only when allowed."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        if not allow_download:
            raise ModelDownloadFailed(
                f"{repo}'s {filename} (revision {revision}) is not in the Hugging Face cache {cache}, and downloads "
                f"are disabled (ROBUSTIFY_ALLOW_DOWNLOAD): put it there (`huggingface-cli download {repo}` on a "
                "machine with the same HF_HOME) or allow downloads.") from None
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache))
    except LocalEntryNotFoundError as exc:  # the Hub could not be reached
        raise ModelDownloadFailed(f"downloading {repo}'s {filename} into {cache} failed ({exc}); "
                                  "retry later, or put the file into the cache yourself.") from None
    except EntryNotFoundError:
        raise ModelDownloadFailed(f"{repo} (revision {revision}) has no {filename}.") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:  # unknown or private repository, HTTP errors
        raise ModelDownloadFailed(f"downloading {repo}'s {filename} failed ({type(exc).__name__}: {exc}); "
                                  "check the repository name and revision.") from None


def _cached(repo: str, filename: str, revision: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(), revision=revision), str)


def _floats(value: Any) -> list[float] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    return None


def read_hub_config(repo: str, *, revision: str = "main", allow_download: bool = False) -> HubModelConfig:
    """Read and check the repository's timm config.json."""
    from core.engine.architectures.timm_family import check_timm_name

    path = fetch_hub_file(repo, "config.json", revision=revision, allow_download=allow_download)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFile(f"{repo}'s config.json is not readable JSON ({exc}).") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise UnsupportedArchitecture(
            f"{repo}'s config.json names no timm architecture (an \"architecture\" field); only timm models on the "
            "Hub are supported: models that need their own code (transformers, open_clip, ...) are not.")
    if config.get("model_args"):
        raise UnsupportedArchitecture(
            f"{repo}'s config.json sets model_args {sorted(config['model_args'])}; hub models with constructor "
            "arguments are not supported yet. Upload its state dict as safetensors with architecture "
            f"timm:{config['architecture']} instead if the defaults fit.")
    check_timm_name(config["architecture"])
    raw = config.get("pretrained_cfg")
    pretrained: dict[str, Any] = raw if isinstance(raw, dict) else {}
    num_classes = config.get("num_classes", pretrained.get("num_classes"))
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidModelFile(f"{repo}'s config.json gives no usable num_classes ({num_classes!r}).")
    size = pretrained.get("input_size")
    input_size = [int(v) for v in size] if isinstance(size, (list, tuple)) and len(size) == 3 else None
    return HubModelConfig(repo=repo, revision=revision, architecture="timm:" + config["architecture"],
                          num_classes=num_classes, input_size=input_size, mean=_floats(pretrained.get("mean")),
                          std=_floats(pretrained.get("std")))


def load_hub_model(repo: str, *, revision: str = "main", num_classes: int, input_size: Sequence[int] | None,
                   input_mean: Sequence[float] | None, input_std: Sequence[float] | None, dataset: str,
                   allow_download: bool = False) -> tuple[Any, HubModelConfig]:
    """The hub model with its weights, taking [0, 1] pixels, and the input contract it was given.

    Sizes, mean and std left as None come from the config (identity when it has none); the
    declared class count must be the config's (a new head would predict nothing useful until trained).
    """
    from core.engine.zoo import load_model_file

    config = read_hub_config(repo, revision=revision, allow_download=allow_download)
    if num_classes != config.num_classes:
        raise InvalidModelFile(f"{repo} predicts {config.num_classes} classes (its config.json), but the model "
                               f"was registered with num_classes={num_classes}; register it with "
                               f"num_classes={config.num_classes}.")
    size = list(input_size or config.input_size or [3, 224, 224])
    mean = list(input_mean) if input_mean is not None else config.mean or [0.0] * size[0]
    std = list(input_std) if input_std is not None else config.std or [1.0] * size[0]
    problem = check_input_stats(mean, std, size[0])
    if problem:
        raise InvalidModelFile(f"{repo}: {problem} (input size {size}); state input_mean and input_std.")
    try:
        weights = fetch_hub_file(repo, "model.safetensors", revision=revision, allow_download=allow_download)
    except ModelDownloadFailed:
        if _cached(repo, "pytorch_model.bin", revision):
            raise InvalidModelFile(f"{repo} holds only pytorch_model.bin, a pickle; pickle is refused because "
                                   "loading it runs arbitrary code. Publish the weights as model.safetensors "
                                   "(timm's push_to_hf_hub writes it).") from None
        raise
    model = load_model_file(weights, config.architecture, num_classes=num_classes, in_channels=size[0],
                            image_size=(size[1], size[2]), dataset=dataset, label=f"{repo}'s model.safetensors",
                            input_mean=mean, input_std=std)
    return model, HubModelConfig(repo=repo, revision=revision, architecture=config.architecture,
                                 num_classes=num_classes, input_size=size, mean=mean, std=std)
