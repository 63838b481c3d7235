"""Where and in which precision the engine computes (bf16 autocast and channels_last on GPU).

A float32 stem under bf16: bf16 keeps 8 significant bits, so an input pixel just below 1 is
rounded to a multiple of 2^-8 ≈ 0.0039, coarser than an attack step of 1.875·(8/255)/50 ≈ 0.0012:
the step would vanish in the rounding before the first layer sees it. When the attack step is
below BF16_INPUT_SPACING, `Compute.float32_stem` keeps the input normalisation (elementwise, so
float32 already under autocast) and the model's first convolution in float32; the rest of the
network runs in bf16.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

BF16_INPUT_SPACING = 2.0 ** -8   # the spacing of bf16 numbers in [0.5, 1): the coarsest for pixels in [0, 1]


class Float32Conv2d(nn.Conv2d):
    """A Conv2d that runs in float32 whatever autocast asks (same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The model's first Conv2d in registration order (the stem of every built-in and
    RobustBench architecture); None if it has none."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def keep_stem_float32(model: nn.Module) -> nn.Conv2d | None:
    """Make the first Conv2d of `model` compute in float32 under autocast (in place; the weights
    and state dict stay as they are). Returns that convolution, or None if there is none or it is
    not a plain nn.Conv2d (a subclass keeps its own forward)."""
    conv = first_conv(model)
    if conv is None or type(conv) not in (nn.Conv2d, Float32Conv2d):
        return None
    conv.__class__ = Float32Conv2d
    return conv


def release_stem(model: nn.Module) -> None:
    """Undo keep_stem_float32."""
    for m in model.modules():
        if type(m) is Float32Conv2d:
            m.__class__ = nn.Conv2d  # type: ignore[assignment]  # the class swap keep_stem_float32 made, undone


def bf16_rounds_step(step: float) -> bool:
    """Whether bf16 would round inputs in [0, 1] coarser than an attack step of `step`."""
    return 0.0 < step < BF16_INPUT_SPACING


@dataclass(frozen=True)
class Compute:
    device: torch.device
    amp_dtype: torch.dtype | None   # None: plain float32
    channels_last: bool
    float32_stem: bool = False      # under bf16: input normalisation and first conv in float32

    @classmethod
    def resolve(cls, device: str | torch.device | None = None,
                amp: Literal["auto", "bf16", "off"] = "auto", channels_last: bool = True,
                attack_step: float | None = None) -> Compute:
        """`attack_step`: the smallest attack step the computation takes (in pixel units); under
        bf16, a step finer than bf16's input spacing keeps the stem in float32."""
        dev = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        on_gpu = dev.type == "cuda"
        use_bf16 = amp == "bf16" or (amp == "auto" and on_gpu)
        stem = use_bf16 and attack_step is not None and bf16_rounds_step(attack_step)
        return cls(dev, torch.bfloat16 if use_bf16 else None, channels_last and on_gpu, stem)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Images on the device, in the memory format the model was converted to."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.amp_dtype is not None and self.float32_stem:
            keep_stem_float32(model)
        return model


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
