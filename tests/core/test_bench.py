"""Per-device evaluation batches, the float32 stem under bf16, and the benchmark and GPU-check
scripts (their pass counts and fields are asserted, never their timings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from core.engine.config import EvaluateConfig
from core.engine.defaults import auto_eval_batch_size, resolve_eval_batch_size
from core.engine.device import Compute, Float32Conv2d, bf16_rounds_step, keep_stem_float32, release_stem
from core.engine.zoo import create_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import bench_engine  # noqa: E402
import render_runtimes  # noqa: E402


def test_evaluation_batch_is_auto_and_resolves_per_device() -> None:
    assert EvaluateConfig().batch_size == "auto"
    assert EvaluateConfig(batch_size=64).batch_size == 64 and EvaluateConfig(batch_size="32").batch_size == 32
    for bad in (0, 1.5, "big", True):
        with pytest.raises(ValidationError, match="batch_size"):
            EvaluateConfig(batch_size=bad)
    assert auto_eval_batch_size("cuda", (3, 32, 32)) == 1024
    assert auto_eval_batch_size("cuda", (3, 224, 224)) == 64            # large images: fewer, never below 64
    assert auto_eval_batch_size("cpu", (3, 32, 32)) == 64               # cache-sized on a CPU
    assert auto_eval_batch_size("cpu", (1, 8, 8)) == 256
    assert auto_eval_batch_size("cpu", (3, 224, 224)) == 32
    assert resolve_eval_batch_size("auto", "cpu", (1, 28, 28)) == 256
    assert resolve_eval_batch_size(500, "cpu", (3, 32, 32)) == 500      # a number is kept as given


def test_first_conv_runs_in_float32_under_bf16_and_the_rest_in_bf16() -> None:
    torch.manual_seed(0)
    model = create_model("preact-resnet-18", num_classes=10).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: dict[int, torch.dtype] = {}
    for i, conv in enumerate(convs[:2]):
        conv.register_forward_hook(lambda _m, _i, out, i=i: seen.__setitem__(i, out.dtype))
    x = torch.rand(2, 3, 32, 32)
    compute = Compute.resolve("cpu", amp="bf16", channels_last=False, attack_step=1.875 * (8 / 255) / 50)
    assert compute.float32_stem and bf16_rounds_step(0.001) and not bf16_rounds_step(0.01)
    assert not Compute.resolve("cpu", amp="bf16", attack_step=2 * (8 / 255) / 10).float32_stem
    assert not Compute.resolve("cpu", amp="off", attack_step=0.001).float32_stem
    with compute.autocast():
        model(x)
    assert seen == {0: torch.bfloat16, 1: torch.bfloat16}   # plain autocast: the stem in bf16 too
    compute.prepare_model(model)
    assert type(convs[0]) is Float32Conv2d and type(convs[1]) is torch.nn.Conv2d
    with compute.autocast():
        out = model(x)
    assert seen == {0: torch.float32, 1: torch.bfloat16} and out.dtype == torch.bfloat16
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # same weights and keys
    release_stem(model)
    assert type(convs[0]) is torch.nn.Conv2d
    assert keep_stem_float32(torch.nn.Linear(2, 2)) is None


def test_baselines_agree_with_ours_and_pass_counts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rows = bench_engine.run_model("small-cnn", torch.device("cpu"), 1, (96, 3, 16, 1, 2))
    wpgd, trades = rows
    assert (wpgd["workload"], trades["workload"]) == ("w-pgd", "w-trades")
    p = {k: v["passes_per_image_step"] for k, v in wpgd["implementations"].items()}
    # ours: one forward + one backward per image per step, plus one final forward; the baselines
    # evaluate every iterate (and the clean set) in a separate pass
    assert p["ours"] == {"forward": 4 / 3, "backward": 1.0}
    assert p["lean"] == p["reference"] == {"forward": 7 / 3, "backward": 1.0}
    q = {k: v["passes_per_image_step"] for k, v in trades["implementations"].items()}
    # per training step with K = 2: ours K attack passes + 2 outer forwards (clean, adversarial);
    # the baselines recompute the clean forward in every inner step
    assert q["ours"] == {"forward": 4.0, "backward": 4.0}
    assert q["lean"] == q["reference"] == {"forward": 6.0, "backward": 4.0}
    for row in rows:
        for base in ("lean", "reference"):
            r = row["ratios"][base]
            assert 0 < r["min"] <= r["median"] <= r["max"]
    assert wpgd["implementations"]["ours"]["batch_size"] == 256   # the CPU auto batch for 8×8 images

    # the three W-PGDs compute the same attack: the same robust accuracy on a trained model
    from core.engine.data.datasets import load_digits
    from core.engine.recipes.standard import train_standard
    data = load_digits()
    net = train_standard(create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits"),
                         data, epochs=2, device="cpu")
    x = data.test_x[:200].float().div(255) if data.test_x.dtype == torch.uint8 else data.test_x[:200].float()
    y = data.test_y[:200]
    compute = bench_engine.user_eval_compute(torch.device("cpu"), 10)
    ours = bench_engine.ours_w_pgd(net, x, y, 0.1, 10, compute, 64)
    assert abs(bench_engine.lean_w_pgd(net, x, y, 0.1, 10) - ours) <= 1 / 200
    assert abs(bench_engine.reference_w_pgd(net, x, y, 0.1, 10) - ours) <= 1 / 200
    assert ours < bench_engine._accuracy(net, x, y, 64)          # the attack fools some points

    # the docs section is rendered from a results file
    result = {**bench_engine.environment(torch.device("cpu"), "test-box"), "command": "python bench/bench_engine.py",
              "rows": rows}
    page = "# Runtimes\n\nbefore\n<!-- bench:start -->\nold\n<!-- bench:end -->\nafter\n"
    out = render_runtimes.render(page, [result])
    assert "old" not in out and out.startswith("# Runtimes\n\nbefore\n") and out.endswith("after\n")
    assert "machine `test-box`" in out and "| small-cnn | w-pgd, 96 img × 3 steps | ours | 256 |" in out
    with pytest.raises(ValueError, match="markers"):
        render_runtimes.render("no markers", [result])


def test_gpu_check_cpu_smoke_runs_every_section() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "check.json"
        env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1",
               "HOME": tmp}
        proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result = json.loads(out.read_text())
        table = out.with_suffix(".txt").read_text()          # the table, written beside the JSON
    assert result["cpu_smoke"] is True and result["ok"] is True and result["device_type"] == "cpu"
    s = result["sections"]
    assert list(s) == ["precision", "schedules", "service", "throughput"]     # the slowest last
    assert all(v["ok"] and v["seconds"] > 0 for v in s.values())
    # the default schedule and allocate, from the same start model: the same W2 before, K = 10 against 1
    runs = {r["schedule"]: r for r in s["schedules"]["runs"]}
    assert set(runs) == {"default", "allocate"} and runs["default"]["w2_before"] == runs["allocate"]["w2_before"]
    assert (runs["default"]["attack_schedule"], runs["default"]["attack_steps"]) == ("standard", 10)
    assert (runs["allocate"]["attack_schedule"], runs["allocate"]["attack_steps"]) == ("allocate", 1)
    assert all(r["job_s"] > r["train_s"] > 0 for r in runs.values())
    assert "| allocate (allocate) | 0 | 1 × 1 |" in proc.stdout
    assert table.startswith("robustify GPU check on CPU") and "| allocate (allocate) |" in table
    p = s["precision"]
    assert p["same_robust_accuracy"] is True and p["default_minus_float32_images"] == 0
    assert p["evaluation_default"]["precision"] == "float32" and p["bf16"]["precision"] == "bf16"
    # the stem stays float32 exactly when the attack step is finer than bf16's input spacing
    assert p["bf16_float32_stem"] is bf16_rounds_step(1.875 * p["delta"] / p["wpgd_steps"])
    assert isinstance(p["bf16_minus_float32_images"], int)
    rows = s["throughput"]["rows"]
    assert [(r["workload"], r["compiled"]) for r in rows] == [("w-pgd", False), ("w-trades", False),
                                                              ("w-pgd", "eager"), ("w-trades", "eager")]
    assert rows[0]["implementations"]["ours"]["passes_per_image_step"] == {"forward": 1.5, "backward": 1.0}
    assert rows[2]["implementations"]["ours"]["passes_per_image_step"] == {"forward": 2.0, "backward": 1.0}
    assert all(set(r["implementations"]) == {"ours", "lean", "reference"} for r in rows)
    svc = s["service"]
    assert svc["job_status"] == "succeeded" and svc["worker_device"] and svc["training_precision"] == "float32"
    assert "precision" in proc.stdout and "service: up in" in proc.stdout and "| ours |" in proc.stdout


def test_fast_wtrades_bench_screens_on_validation_images_and_attacks_the_test_images_once(tmp_path) -> None:
    out = tmp_path / "fast.json"
    proc = subprocess.run([sys.executable, "bench/fast_wtrades.py", "--datasets", "digits", "--seeds", "0",
                           "--methods", "standard-k10,memory-k1", "--screen", "allocate,allocate-g3", "--epochs", "2",
                           "--train", "256", "--test-examples", "64", "--data-dir", str(tmp_path / "data"),
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    runs = {r["method"]: r for r in result["runs"]}
    # the screen picks by the screen images: the larger difference to K = 10 there
    screen_w2 = {m: runs[m]["screen"]["w2"]["accuracy"] for m in ("allocate", "allocate-g3")}
    chosen = result["screen_choice"]["digits"]
    assert screen_w2[chosen] == max(screen_w2.values())
    # the test images are attacked only for --methods and the screen's choice
    assert {m for m, r in runs.items() if "test" in r} == {"standard-k10", "memory-k1", chosen}
    for r in runs.values():
        for part in [p for p in ("screen", "test") if p in r]:
            numbers = r[part]
            assert numbers["w2"]["accuracy"] == min(numbers["redlr"]["accuracy"], numbers["ce"]["accuracy"])
            for key in ("clean", "redlr", "ce", "redlr_2delta"):
                lo, hi = numbers[key]["ci95"]
                assert numbers[key]["n"] == 64 and lo <= numbers[key]["accuracy"] <= hi
            assert numbers["redlr_2delta"]["accuracy"] <= numbers["clean"]["accuracy"]
        assert r["job_seconds"] >= r["train_seconds"] > 0
    rows = {row["method"]: row for row in result["summary"]}
    assert set(rows) == {"standard-k10", "memory-k1", chosen}
    assert rows["standard-k10"]["speedup_vs_k10"]["median"] == 1.0
    assert rows["standard-k10"]["w2_difference_vs_k10"]["median"] == 0.0
    passes = {method: rows[method]["passes_per_image_per_step"] for method in ("standard-k10", "memory-k1")}
    assert passes == {"standard-k10": 11, "memory-k1": 2}
    schedules = {method: (runs[method]["config"]["attack_schedule"], runs[method]["config"]["attack_steps"])
                 for method in ("memory-k1", "allocate")}
    assert schedules == {"memory-k1": ("memory", 1), "allocate": ("allocate", 1)}
    assert "| digits | memory-k1 | 2 | 2 |" in proc.stdout and f"| digits | {chosen} | 64 |" in proc.stdout


def test_fast_wtrades_bench_splits_are_disjoint_stratified_samples() -> None:
    import fast_wtrades

    from core.engine.data.datasets import load_digits
    from core.engine.data.sampling import class_counts

    data = load_digits()
    splits = fast_wtrades.make_splits(fast_wtrades.SETUPS["digits"], data, 100)
    train, screen = splits.finetune.train_y.numpy(), splits.screen[1].numpy()
    assert len(train) + len(screen) == len(data.train_y) and len(screen) == 300 and len(splits.test[1]) == 100
    assert min(class_counts(screen, 10)) >= 28 and min(class_counts(splits.test[1].numpy(), 10)) >= 9
    # the recipe's own test split is the screen images: it never sees the test images
    assert torch.equal(splits.finetune.test_y, splits.screen[1])
    # fine-tune images and screen images are a partition of the training split (as multisets of images)
    as_bytes = lambda images: Counter(bytes(img.numpy()) for img in images)  # noqa: E731
    assert as_bytes(splits.finetune.train_x) + as_bytes(splits.screen[0].mul(255).round().byte()) \
        == as_bytes(data.train_x)
