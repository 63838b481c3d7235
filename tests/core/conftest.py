"""Real small data (scikit-learn's digits) and a tiny CNN trained on it, shared by engine tests."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits


class TinyCNN(torch.nn.Module):
    """Small enough that a float64 test run takes milliseconds."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="session")
def trained_tiny(digits) -> TinyCNN:
    """A TinyCNN trained normally (CE, a few epochs) on digits: ~95% clean accuracy."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = TinyCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(15):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_small_cnn(tmp_path_factory):
    """scikit-learn's digits as the recipes load them, and the zoo's small CNN trained normally on
    them (5 epochs). Tests that step the optimiser use lr = 0, so the weights stay shared."""
    from core.engine.data.datasets import load_dataset
    from core.engine.recipes.standard import train_standard
    from core.engine.zoo import create_model

    data = load_dataset("digits", data_dir=tmp_path_factory.mktemp("data"))
    torch.manual_seed(0)
    model = train_standard(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8), data,
                           epochs=5, seed=0)
    return model, data
