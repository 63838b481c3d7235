"""W-TRADES training throughput on one device against N devices (DDP), measured in the same run.

    python bench/bench_ddp.py                  # GPUs: WideResNet-28-10, random CIFAR-shaped data,
                                               # 1 GPU against all visible GPUs (needs at least 2)
    python bench/bench_ddp.py --cpu-tiny       # CPU: a tiny CNN, gloo, 1 process against 2
                                               # (checks that the script runs; CPU ratios say nothing about GPUs)

Both sides run the product's step, core.engine.recipes.finetune.w_trades_step, on the same global batch
(strong scaling: N devices share each batch), with the multi-device side set up as a job is
(World.wrap: DDP, SyncBatchNorm on CUDA; the threat across the world, so Υ_B and δ_B are global).
The last line is JSON: images per second for each side and their ratio (N would be ideal).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _setup(args: argparse.Namespace, device: torch.device):  # noqa: ANN202 - model and data
    from core.engine.zoo import create_model

    torch.manual_seed(0)
    if args.cpu_tiny:
        model = create_model("small-cnn", num_classes=10, in_channels=3, image_size=32)
    else:
        model = create_model("wide-resnet-28-10", num_classes=10, in_channels=3, image_size=32)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    return model.to(device), x.to(device), y.to(device)


def throughput(args: argparse.Namespace, rank: int = 0, size: int = 1, rendezvous: str | None = None) -> float:
    """Images per second of W-TRADES steps on `size` ranks (this call is rank `rank`)."""
    from core.engine.config import FinetuneConfig
    from core.engine.device import Compute
    from core.engine.distributed import SINGLE, init_world, shutdown_world
    from core.engine.recipes.finetune import RandomWeightPerturbation, w_trades_step
    from core.engine.threats import Threat

    cuda = torch.cuda.is_available() and not args.cpu_tiny
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if size > 1 and rendezvous is None:
        raise ValueError("several ranks need a rendezvous address")
    world = (init_world(rank, size, rendezvous, backend="nccl" if cuda else "gloo")
             if size > 1 and rendezvous is not None else SINGLE)
    config = FinetuneConfig(threat_model={"kind": "w2-linf", "delta": 0.03}, batch_size=args.batch,
                            attack_steps=args.attack_steps)
    compute = Compute.resolve(device, config.amp, config.channels_last)
    model, x, y = _setup(args, device)
    model = compute.prepare_model(model)
    trainer = world.wrap(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    threat = Threat.from_spec(config.threat_model).across(world)
    perturbation = RandomWeightPerturbation(model, config.weight_perturbation)
    generator = torch.Generator(device=device).manual_seed(0)
    xs, ys = world.shard(compute.images(x)), world.shard(y)
    ema = torch.ones((), device=device, dtype=torch.float64)

    def step() -> None:
        nonlocal ema
        _, _, new = w_trades_step(trainer, optimizer, xs, ys, threat=threat, config=config, compute=compute,
                                  perturbation=perturbation, generator=generator, upsilon_ema=ema)
        ema = new if new is not None else ema

    for _ in range(args.warmup):
        step()
    world.any(False)  # every rank starts the clock together
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    world.any(False)
    seconds = time.perf_counter() - t0
    shutdown_world(world)
    return args.batch * args.steps / seconds


def _rank(rank: int, size: int, rendezvous: str, args: argparse.Namespace, out: str) -> None:
    if args.cpu_tiny:
        torch.set_num_threads(1)
    rate = throughput(args, rank, size, rendezvous)
    if rank == 0:
        Path(out).write_text(json.dumps(rate))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny CNN on the CPU, gloo, 2 processes")
    ap.add_argument("--devices", type=int, default=None, help="the multi-device side (default: all GPUs, or 2)")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default 512 on GPU, 32 on CPU)")
    ap.add_argument("--attack-steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    args = ap.parse_args()
    gpus = torch.cuda.device_count() if not args.cpu_tiny else 0
    if not args.cpu_tiny and gpus < 2:
        raise SystemExit(f"bench_ddp needs at least 2 GPUs (found {gpus}); use --cpu-tiny to check the script")
    n = args.devices or (gpus if gpus else 2)
    args.batch = args.batch or (512 if gpus else 32)
    args.steps = args.steps or (20 if gpus else 2)
    args.warmup = args.warmup or (3 if gpus else 1)
    if args.batch % n:
        raise SystemExit(f"--batch {args.batch} must be a multiple of {n} devices")

    one = throughput(args)  # the baseline: one device, in this process
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rate.json")
        mp.spawn(_rank, args=(n, str(Path(tmp) / "rendezvous"), args, out), nprocs=n, join=True)
        many = json.loads(Path(out).read_text())
    what = "tiny CNN, CPU/gloo" if args.cpu_tiny else f"WideResNet-28-10, {torch.cuda.get_device_name(0)}, NCCL"
    print(f"W-TRADES training ({what}, global batch {args.batch}, {args.attack_steps} attack steps): "
          f"1 device {one:.1f} img/s, {n} devices {many:.1f} img/s, ratio {many / one:.2f} (ideal {n})")
    print(json.dumps({"devices": n, "batch": args.batch, "one_device_img_per_s": one,
                      "n_devices_img_per_s": many, "scaling": many / one}))


if __name__ == "__main__":
    main()
