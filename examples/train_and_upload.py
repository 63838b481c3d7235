"""Train a small CNN on scikit-learn's digits and register it with a robustify server.

    robustify serve                            # in another terminal: the service on http://127.0.0.1:8000
    python examples/train_and_upload.py        # trains, writes model.safetensors, uploads it, prints mdl_…

What a model of your own needs: an architecture the service can build by name (here the built-in
`small-cnn`; `timm:<name>` and `torchvision:<name>` work too, see register_timm_model.py), its
`state_dict()` saved as safetensors (pickles are refused), the class count and the data set it was
trained on. Needs the server extra for torch (`pip install "robustify[server]"`); the server is
found at ROBUSTIFY_URL (default http://127.0.0.1:8000) with ROBUSTIFY_API_KEY, or --url / --api-key.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from robustify import Client
from robustify.engine import create_model, load_dataset


def train(epochs: int, seed: int) -> torch.nn.Module:
    # The service's own digits split (stratified, 20 % test, seed 0): train only on its training
    # images, so that the service's test numbers are measured on images the model never saw.
    # (5 epochs at seed 0 give the very weights `robustify demo` starts from.)
    data = load_dataset("digits")
    torch.manual_seed(seed)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    shuffle = torch.Generator().manual_seed(seed)
    x, y = data.train_x.float() / 255.0, data.train_y    # robustify's models take pixels in [0, 1]
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y), generator=shuffle)
        for start in range(0, len(y) - 1, 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(data.test_x.float() / 255.0).argmax(1) == data.test_y).float().mean().item()
        print(f"epoch {epoch}/{epochs}: clean test accuracy {accuracy:.3f}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="model.safetensors", help="where to save the weights")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-upload", action="store_true", help="only train and save the file")
    parser.add_argument("--url", help="the server (default: ROBUSTIFY_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--api-key", help="default: ROBUSTIFY_API_KEY (none needed on the embedded default)")
    parser.add_argument("--quick", action="store_true", help="3 epochs: for smoke tests")
    args = parser.parse_args()

    model = train(3 if args.quick else args.epochs, args.seed)
    save_file(model.state_dict(), args.out)              # the architecture's own keys, as safetensors
    print(f"saved {args.out}")
    if args.no_upload:
        return
    with Client(args.url, api_key=args.api_key) as client:
        registered = client.models.upload(args.out, architecture="small-cnn", num_classes=10, dataset="digits",
                                          name="digits-small-cnn")
        registered = client.models.wait(registered.id)   # validating -> ready (or rejected, with the reason)
        if registered.status != "ready":
            raise SystemExit(f"model {registered.id} was {registered.status}: {registered.error}")
        print(f"model {registered.id} ready")
        print(f"next: python examples/finetune_and_download.py --model {registered.id}")


if __name__ == "__main__":
    main()
