"""Where and in which precision the engine computes (bf16 autocast and channels_last on GPU)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal

import torch


@dataclass(frozen=True)
class Compute:
    device: torch.device
    amp_dtype: torch.dtype | None   # None: plain float32
    channels_last: bool

    @classmethod
    def resolve(cls, device: str | torch.device | None = None,
                amp: Literal["auto", "bf16", "off"] = "auto", channels_last: bool = True) -> "Compute":
        dev = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        on_gpu = dev.type == "cuda"
        use_bf16 = amp == "bf16" or (amp == "auto" and on_gpu)
        return cls(dev, torch.bfloat16 if use_bf16 else None, channels_last and on_gpu)

    def autocast(self) -> contextlib.AbstractContextManager:
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
        return model


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))
