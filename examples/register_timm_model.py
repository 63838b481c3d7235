"""Register a timm model that was trained on normalised images, stating its normalisation.

    python examples/register_timm_model.py                       # resnet18, trained on digits here
    python examples/register_timm_model.py --architecture lcnet_050

Attacks, radii δ and data sets all work on pixels in [0, 1]. A network trained behind
`transforms.Normalize(mean, std)` is registered with that `input_mean` / `input_std`, and the engine
feeds it (x - mean) / std: the weights stay the network's own, and a downloaded checkpoint loads
straight back into `timm.create_model(...)`. Forgetting the normalisation looks exactly like a model
that is not robust, so state it. The weights here are trained locally (nothing is downloaded); with
your own model, skip train() and save yours. Server: ROBUSTIFY_URL / ROBUSTIFY_API_KEY, or --url / --api-key.
"""
from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from robustify import Client
from robustify.engine import load_dataset


def train(architecture: str, epochs: int) -> tuple[torch.nn.Module, float, float]:
    """A timm network for 1-channel 8×8 digits, trained on normalised images; with its mean and std."""
    data = load_dataset("digits")                          # the service's own train/test split
    x, y = data.train_x.float() / 255.0, data.train_y
    mean, std = x.mean().item(), x.std().item()            # the statistics of the training images
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, num_classes=10, in_chans=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y))
        for start in range(0, len(y) - 1, 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model((x[batch] - mean) / std), y[batch]).backward()   # what Normalize does
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model((data.test_x.float() / 255.0 - mean) / std).argmax(1) == data.test_y).float().mean()
        print(f"epoch {epoch}/{epochs}: clean test accuracy {accuracy.item():.3f}")
    return model, mean, std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--architecture", default="resnet18", help="any name timm.list_models() knows")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="timm-model.safetensors")
    parser.add_argument("--url")
    parser.add_argument("--api-key")
    parser.add_argument("--quick", action="store_true", help="timm's tiny test_efficientnet: for smoke tests")
    args = parser.parse_args()
    architecture = "test_efficientnet" if args.quick else args.architecture

    model, mean, std = train(architecture, args.epochs)
    save_file(model.state_dict(), args.out)
    with Client(args.url, api_key=args.api_key) as client:
        registered = client.models.upload(
            args.out, architecture=f"timm:{architecture}", num_classes=10, dataset="digits",
            input_size=[1, 8, 8],                  # [C, H, W] as the network sees them
            input_mean=[mean], input_std=[std])    # one value per channel (ImageNet's would be three)
        registered = client.models.wait(registered.id)
        if registered.status != "ready":
            raise SystemExit(f"model {registered.id} was {registered.status}: {registered.error}")
        print(f"model {registered.id} ready: {registered.architecture}, input {registered.input_size}, "
              f"mean {registered.input_mean}, std {registered.input_std}")


if __name__ == "__main__":
    main()
