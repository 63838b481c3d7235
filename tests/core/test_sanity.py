"""The registration's sanity check (core/engine/sanity.py) on scikit-learn's digits: a correct model
passes with its accuracy; a wrong normalisation, pixel range or channel order is warned about, and
the cheap variant that fixes it names the cause."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from core.engine.architectures._layers import with_pixel_input
from core.engine.sanity import SAMPLE_SIZE, near_chance, sanity_check


def _check(model: nn.Module, data, mean=None, std=None, **over):
    shape = over.pop("input_shape", list(data.image_shape))
    return sanity_check(model, data, num_classes=over.pop("num_classes", 10), input_shape=shape,
                        input_mean=mean, input_std=std, **over)


@pytest.mark.parametrize(("correct", "n", "classes", "near"), [
    (25, 256, 10, True), (35, 256, 10, True), (40, 256, 10, False), (240, 256, 10, False),
    (140, 256, 2, True), (170, 256, 2, True), (180, 256, 2, False), (230, 256, 2, False),
    (3, 256, 100, True), (13, 256, 100, False),
])
def test_the_near_chance_rule(correct: int, n: int, classes: int, near: bool) -> None:
    assert near_chance(correct, n, classes) is near


def test_a_correct_model_passes_with_its_accuracy(digits_small_cnn) -> None:
    model, data = digits_small_cnn
    r = _check(model, data)
    assert r["status"] == "passed" and r["likely_cause"] is None and not r["near_chance"]
    # the cheap variants ran on the sample's first 64 images, and none did better
    assert {v["name"]: (v["n"], v["fixes"]) for v in r["variants"]} == {
        "dataset_normalisation": (64, False), "pixels_0_255": (64, False)}
    assert r["n"] == SAMPLE_SIZE and r["dataset"] == "digits" and r["split"] == "test" and r["seed"] == 0
    assert r["accuracy"] == r["correct"] / r["n"] > 0.8
    assert r["ci95"][0] < r["accuracy"] < r["ci95"][1] and r["chance"] == 0.1
    assert r["message"].startswith(f"Clean accuracy {r['accuracy']:.3f}") and "Warning" not in r["message"]
    again = _check(model, data)
    assert (again["correct"], again["ci95"]) == (r["correct"], r["ci95"])  # the seeded sample: the same images


def test_a_wrong_normalisation_warns_and_names_it(digits_small_cnn) -> None:
    model, data = digits_small_cnn
    wrong = with_pixel_input(model, [0.5], [0.05])  # the same weights registered with a wrong mean/std
    r = _check(wrong, data, [0.5], [0.05])
    assert r["status"] == "warning" and r["likely_cause"] == "normalisation", r["message"]
    fixed = {v["name"]: v for v in r["variants"]}
    assert fixed["no_normalisation"]["fixes"] and fixed["no_normalisation"]["accuracy"] > 0.8
    # the best variant that fixes it names the cause (this small CNN hardly minds the scale of its input,
    # so 0..255 pixels help too, a little less)
    assert max((v for v in r["variants"] if v["fixes"]), key=lambda v: v["accuracy"])["name"] == "no_normalisation"
    assert "imagenet_normalisation" not in fixed and "channels_reversed" not in fixed  # one channel
    assert not r["near_chance"] and r["accuracy"] < 0.8   # wrong, but not near chance: a variant shows it
    assert r["message"].startswith("Warning: the model classifies digits better with another input.")
    assert "Without normalisation (mean 0, std 1) the accuracy is 0.9" in r["message"]
    assert "registered normalisation (input_mean / input_std) is probably wrong" in r["message"]


class _Scaled(nn.Module):
    def __init__(self, net: nn.Module, scale: float, channel: int | None = None) -> None:
        super().__init__()
        self.net, self.scale, self.channel = net, scale, channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel is not None:
            x = x[:, self.channel:self.channel + 1]
        out: torch.Tensor = self.net(x * self.scale)
        return out


def test_a_model_that_takes_0_255_pixels_is_told_so(digits_small_cnn) -> None:
    model, data = digits_small_cnn
    r = _check(_Scaled(model, 1 / 255), data)   # trained on 0..255 pixels, registered for 0..1
    assert r["status"] == "warning" and r["likely_cause"] == "pixel_range", r["message"]
    assert r["near_chance"] and r["message"].startswith("Warning: the model barely classifies digits.")
    assert "expects pixels in 0..255" in r["message"]


def test_the_other_channel_order_is_told_so(digits_small_cnn) -> None:
    model, data = digits_small_cnn
    # three channels: the digit in the first, nothing in the others; the model reads the last
    rgb = dataclasses.replace(data, train_x=data.train_x.repeat(1, 3, 1, 1),
                              test_x=torch.cat([data.test_x, torch.zeros_like(data.test_x).repeat(1, 2, 1, 1)], 1))
    r = _check(_Scaled(model, 1.0, channel=2), rgb)
    assert r["status"] == "warning" and r["likely_cause"] == "channel_order", r["message"]
    assert {v["name"] for v in r["variants"]} == {"imagenet_normalisation", "dataset_normalisation",
                                                  "channels_reversed", "pixels_0_255"}
    assert [v["name"] for v in r["variants"] if v["fixes"]] == ["channels_reversed"]


def test_a_wrong_num_classes_is_named_when_nothing_else_fixes_it(digits_small_cnn) -> None:
    _, data = digits_small_cnn
    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))   # an untrained 3-class head
    r = _check(head, data, num_classes=3)
    assert r["status"] == "warning" and r["likely_cause"] == "num_classes", r["message"]
    assert "The model has 3 outputs but digits has 10 classes" in r["message"]


def test_a_model_of_another_input_size_is_skipped(digits_small_cnn) -> None:
    model, data = digits_small_cnn
    r = _check(model, data, input_shape=[3, 32, 32])
    assert r["status"] == "skipped" and r["accuracy"] is None
    assert r["message"] == ("The accuracy check was skipped: the data set's images are 1×8×8 but the model takes "
                            "3×32×32.")
