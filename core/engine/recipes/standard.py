"""Plain (non-robust) training with cross-entropy: makes the starting model of demos and tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.engine.data.datasets import ImageData, augment_crop_flip, is_cifar_like, to_unit_float
from core.engine.device import Compute


def train_standard(model: torch.nn.Module, data: ImageData, *, epochs: int = 10, lr: float = 3e-3,
                   batch_size: int = 64, seed: int = 0, device: str | torch.device | None = None
                   ) -> torch.nn.Module:
    """Adam on CE for a few epochs; returns the model in eval mode on the CPU."""
    compute = Compute.resolve(device, amp="off", channels_last=False)
    model = compute.prepare_model(model).train()
    generator = torch.Generator(device=compute.device).manual_seed(seed)
    x_all = data.train_x.to(compute.device)
    y_all = data.train_y.to(compute.device)
    augment = is_cifar_like(data.image_shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = x_all.shape[0]
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator, device=compute.device)
        for start in range(0, n - 1, batch_size):
            idx = perm[start:start + batch_size]
            if idx.numel() < 2:
                continue
            x = to_unit_float(x_all[idx], compute.device)
            if augment:
                x = augment_crop_flip(x, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y_all[idx]).backward()
            optimizer.step()
    return model.eval().cpu()


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: ImageData, *, batch_size: int = 500) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, data.test_x.shape[0], batch_size):
        x = to_unit_float(data.test_x[start:start + batch_size], device)
        correct += int((model(x).argmax(1) == data.test_y[start:start + batch_size].to(device)).sum())
    return correct / data.test_x.shape[0]
