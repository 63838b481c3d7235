"""Checkpoints without pickle: weights and the full training state as safetensors files.

A `TrainingCheckpoint` holds everything needed to resume a fine-tune exactly (weights, the
best weights so far, optimiser and scheduler state, RNG states, the recipe's own counters).
Tensors go into the safetensors body; everything else is JSON in its metadata header.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import InvalidModelFile

_META_KEY = "robustify_training_state"


@dataclass
class TrainingCheckpoint:
    epoch: int                                   # epochs completed
    model_state: dict[str, torch.Tensor]
    best_model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng_state: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)   # JSON-able recipe state (history, EMA, best)
    metrics: dict[str, float] = field(default_factory=dict)
    is_best: bool = False
    total_epochs: int = 0
    final: bool = False                          # True for the checkpoint saved when the run ended

    def save(self, path: str | Path) -> None:
        save_training_checkpoint(self, path)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> None:
    """A state dict as safetensors (shared storage is cloned so the format accepts it)."""
    tensors = {k: _cpu(v).clone() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata=metadata)


def save_training_checkpoint(ckpt: TrainingCheckpoint, path: str | Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for k, v in ckpt.model_state.items():
        tensors[f"model.{k}"] = _cpu(v).clone()
    for k, v in ckpt.best_model_state.items():
        tensors[f"best.{k}"] = _cpu(v).clone()
    for k, v in ckpt.rng_state.items():
        tensors[f"rng.{k}"] = _cpu(v).clone()
    optim_json_state: dict[str, dict[str, Any]] = {}
    for pid, slots in ckpt.optimizer_state.get("state", {}).items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = _cpu(value).clone()
            else:
                optim_json_state.setdefault(str(pid), {})[name] = value
    meta = {
        "epoch": ckpt.epoch,
        "total_epochs": ckpt.total_epochs,
        "final": ckpt.final,
        "is_best": ckpt.is_best,
        "metrics": ckpt.metrics,
        "extra": ckpt.extra,
        "scheduler_state": ckpt.scheduler_state,
        "optimizer_param_groups": ckpt.optimizer_state.get("param_groups", []),
        "optimizer_scalar_state": optim_json_state,
    }
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})


def load_training_checkpoint(path: str | Path) -> TrainingCheckpoint:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise InvalidModelFile(f"training checkpoint {path} is not a readable safetensors file: {exc}") from exc
    if _META_KEY not in header:
        raise InvalidModelFile(f"{path} is a safetensors file but not a robustify training checkpoint")
    meta = json.loads(header[_META_KEY])

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    state: dict[int, dict[str, Any]] = {}
    for key, value in part("optim.").items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, slots in meta["optimizer_scalar_state"].items():
        state.setdefault(int(pid), {}).update(slots)
    return TrainingCheckpoint(
        epoch=int(meta["epoch"]),
        model_state=part("model."),
        best_model_state=part("best."),
        optimizer_state={"state": state, "param_groups": meta["optimizer_param_groups"]},
        scheduler_state=meta["scheduler_state"],
        rng_state=part("rng."),
        extra=meta["extra"],
        metrics=meta["metrics"],
        is_best=bool(meta["is_best"]),
        total_epochs=int(meta.get("total_epochs", 0)),
        final=bool(meta.get("final", False)),
    )
