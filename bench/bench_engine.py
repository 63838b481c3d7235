"""Throughput of the engine against a straightforward baseline, measured in the same run.

    python bench/bench_engine.py              # GPU: WideResNet-28-10 on random CIFAR-shaped data
    python bench/bench_engine.py --cpu-tiny   # CPU: a tiny CNN, CI-friendly time

W-PGD evaluation (images×steps per second): ours is the fused whole-set W-PGD (bf16 autocast
and channels_last on GPU, large batches, per-step accuracy taken from the next step's forward
pass, everything on the device). The baseline is algorithm.md written plainly: float32,
batch 32, gradients copied to the host for the whole-set normalisation and projection, and a
separate evaluation pass after every step.

W-TRADES training (images per second): ours is core.recipes.finetune.w_trades_step; the
baseline runs the same mathematics with float32, batch 32, and the clean forward recomputed
in every inner step (as the TRADES reference code does), gradients copied to the host.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from core.attacks.wpgd import w_pgd
from core.config import FinetuneConfig
from core.device import Compute
from core.losses import kl_divergence, redlr
from core.recipes.finetune import RandomWeightPerturbation, w_trades_step
from core.threats import Threat


class TinyCifarNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(16)
        self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.b2 = torch.nn.BatchNorm2d(32)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def baseline_w_pgd(model, x, y, delta: float, steps: int, batch_size: int = 32) -> float:
    """Plain W-PGD (w2-linf, ReDLR): host-side normalisation/projection, separate eval pass per step."""
    device = next(model.parameters()).device
    x_host = x.cpu()
    x_adv = x_host.clone()
    alpha = 1.875 * delta / steps
    accs = []
    for _ in range(steps):
        grads = []
        for i in range(0, x.shape[0], batch_size):
            xb = x_adv[i:i + batch_size].to(device).requires_grad_(True)
            (g,) = torch.autograd.grad(redlr(model(xb), y[i:i + batch_size]).sum(), xb)
            grads.append(g.cpu())
        g = torch.cat(grads)
        l1 = g.flatten(1).abs().sum(1)
        h = g.sign() * l1[:, None, None, None]
        n = torch.sqrt(torch.mean(l1 ** 2)).clamp_min(1e-30)
        e = x_adv + alpha * h / n - x_host
        linf = e.flatten(1).abs().amax(1)
        rho = min(1.0, delta / (float(torch.sqrt(torch.mean(linf ** 2))) + 1e-12))
        b = (rho * linf)[:, None, None, None]
        x_adv = (x_host + torch.maximum(torch.minimum(e, b), -b)).clamp(0, 1)
        correct = 0
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                correct += int((model(x_adv[i:i + batch_size].to(device)).argmax(1) == y[i:i + batch_size]).sum())
        accs.append(correct / x.shape[0])
    return min(accs)


def baseline_trades_step(model, opt, x, y, delta: float, steps: int, beta: float = 6.0) -> None:
    """One W-TRADES step written plainly (KL inner loss): clean forward recomputed every inner step."""
    model.eval()
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    alpha = 2.0 * delta / steps
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        loss = kl_divergence(model(x), model(x_adv)).sum()
        (g,) = torch.autograd.grad(loss, x_adv)
        g = g.cpu()
        l1 = g.flatten(1).abs().sum(1)
        h = (g.sign() * l1[:, None, None, None]).to(x.device)
        n = float(torch.sqrt(torch.mean(l1 ** 2))) + 1e-30
        e = x_adv.detach() + alpha * h / n - x
        linf = e.flatten(1).abs().amax(1)
        rho = min(1.0, delta / (float(torch.sqrt(torch.mean(linf ** 2))) + 1e-12))
        b = (rho * linf)[:, None, None, None]
        x_adv = (x + torch.maximum(torch.minimum(e, b), -b)).clamp(0, 1)
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, y) + beta * kl_divergence(logits, model(x_adv.detach())).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def ours_trades_step(model, opt, x, y, threat: Threat, steps: int, compute: Compute, beta: float = 6.0,
                     loss_name: str = "kl") -> None:
    """The recipe's own step (core.recipes.finetune.w_trades_step) with the baseline's settings:
    fixed budget, no weight perturbation, same K, β and inner loss."""
    config = FinetuneConfig(threat_model={"kind": threat.kind, "delta": threat.delta}, attack_steps=steps,
                            beta=beta, attack_loss=loss_name, budget="fixed", weight_perturbation=0.0)
    w_trades_step(model, opt, x, y, threat=threat, config=config, compute=compute,
                  perturbation=RandomWeightPerturbation(model, 0.0), generator=None, upsilon_ema=None)


def timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu-tiny", action="store_true", help="tiny model on the CPU (CI-friendly)")
    ap.add_argument("--n-eval", type=int, default=None)
    ap.add_argument("--eval-steps", type=int, default=None)
    ap.add_argument("--train-batches", type=int, default=None)
    args = ap.parse_args()

    if args.cpu_tiny or not torch.cuda.is_available():
        device = torch.device("cpu")
        model = TinyCifarNet()
        n_eval, steps, batch_ours, train_batches, train_bs = 512, 5, 32, 8, 32
        compute = Compute.resolve("cpu", amp="off")
        label = "cpu, TinyCifarNet"
    else:
        from core.zoo import create_model

        device = torch.device("cuda")
        model = create_model("wide-resnet-28-10", num_classes=10)
        n_eval, steps, batch_ours, train_batches, train_bs = 2000, 10, 500, 4, 512
        compute = Compute.resolve("cuda", amp="auto", channels_last=True)
        label = f"{torch.cuda.get_device_name()}, WideResNet-28-10"
        torch.backends.cudnn.benchmark = True
    n_eval = args.n_eval or n_eval
    steps = args.eval_steps or steps
    train_batches = args.train_batches or train_batches
    torch.manual_seed(0)
    model = model.to(device).eval()
    x = torch.rand((n_eval, 3, 32, 32), device=device)
    y = torch.randint(0, 10, (n_eval,), device=device)
    delta = 8 / 255
    results: dict[str, float] = {}

    # --- W-PGD evaluation -------------------------------------------------------------------
    baseline_w_pgd(model, x[:64], y[:64], delta, 1)   # warm-up
    t_base = timed(lambda: baseline_w_pgd(model, x, y, delta, steps), device)
    fast_model = compute.prepare_model(model)
    xf = compute.images(x)
    w_pgd(fast_model, xf[:64], y[:64], Threat("w2-linf", delta), steps=1, compute=compute)
    t_ours = timed(lambda: w_pgd(fast_model, xf, y, Threat("w2-linf", delta), steps=steps,
                                 batch_size=batch_ours, compute=compute), device)
    results["wpgd_baseline_img_steps_per_s"] = n_eval * steps / t_base
    results["wpgd_ours_img_steps_per_s"] = n_eval * steps / t_ours
    results["wpgd_speedup"] = t_base / t_ours

    # --- W-TRADES training ------------------------------------------------------------------
    model32 = model.float().to(memory_format=torch.contiguous_format)
    xt = torch.rand((train_bs * train_batches, 3, 32, 32), device=device)
    yt = torch.randint(0, 10, (xt.shape[0],), device=device)
    opt = torch.optim.SGD(model32.parameters(), lr=1e-3, momentum=0.9)

    def base_epoch() -> None:
        for i in range(0, xt.shape[0], 32):
            baseline_trades_step(model32, opt, xt[i:i + 32], yt[i:i + 32], delta, 10)

    baseline_trades_step(model32, opt, xt[:32], yt[:32], delta, 1)
    t_base_train = timed(base_epoch, device)
    fast = compute.prepare_model(model32)
    opt2 = torch.optim.SGD(fast.parameters(), lr=1e-3, momentum=0.9)
    threat = Threat("w2-linf", delta)
    xtf = compute.images(xt)

    def ours_epoch(loss_name: str) -> None:
        for i in range(0, xt.shape[0], train_bs):
            ours_trades_step(fast, opt2, xtf[i:i + train_bs], yt[i:i + train_bs], threat, 10, compute,
                             loss_name=loss_name)

    ours_trades_step(fast, opt2, xtf[:train_bs], yt[:train_bs], threat, 1, compute)
    t_ours_train = timed(lambda: ours_epoch("kl"), device)
    t_ours_redlr = timed(lambda: ours_epoch("redlr"), device)
    results["wtrades_baseline_img_per_s"] = xt.shape[0] / t_base_train
    results["wtrades_ours_kl_img_per_s"] = xt.shape[0] / t_ours_train
    results["wtrades_ours_redlr_img_per_s"] = xt.shape[0] / t_ours_redlr
    results["wtrades_speedup_kl"] = t_base_train / t_ours_train

    print(f"device: {label}; W-PGD on {n_eval} images × {steps} steps; W-TRADES on {xt.shape[0]} images, K=10")
    print(f"W-PGD    baseline {results['wpgd_baseline_img_steps_per_s']:10.1f} img·steps/s   "
          f"ours {results['wpgd_ours_img_steps_per_s']:10.1f}   ratio {results['wpgd_speedup']:.2f}x")
    print(f"W-TRADES baseline {results['wtrades_baseline_img_per_s']:10.1f} img/s         "
          f"ours {results['wtrades_ours_kl_img_per_s']:10.1f}   ratio {results['wtrades_speedup_kl']:.2f}x "
          f"(ours with ReDLR inner loss: {results['wtrades_ours_redlr_img_per_s']:.1f} img/s)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
