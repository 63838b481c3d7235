"""The model zoo: registry, safetensors-only loading with named key/shape errors, RobustBench files offline,
timm and torchvision families, and the input normalisation in front of them."""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.engine.architecture_names import BUILTIN_ARCHITECTURES
from core.engine.architectures import PreActResNet, SmallCNN, WideResNet
from core.engine.zoo import (
    PixelInputModel,
    create_model,
    import_robustbench,
    list_architectures,
    load_model_file,
    load_robustbench_model,
    load_state_dict_file,
    save_model_file,
    with_pixel_input,
)
from core.errors import InvalidModelFile, ModelDownloadFailed, UnsupportedArchitecture, ValidationError

RB_NAME = "Wang2023Better_WRN-28-10"


def _small_cnn_file(tmp_path: Path, **changes: torch.Tensor) -> Path:
    """A small-cnn state dict for 8×8 grayscale digits, with entries replaced or added."""
    torch.manual_seed(0)
    state = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8).state_dict()
    state.update(changes)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _load_small_cnn(path: Path) -> torch.nn.Module:
    return load_model_file(path, "small-cnn", num_classes=10, in_channels=1, image_size=8, dataset="digits")


# --- registry and architectures ------------------------------------------------------------------

def test_registry_holds_exactly_the_builtin_names() -> None:
    assert sorted(list_architectures()) == sorted(BUILTIN_ARCHITECTURES)


@pytest.mark.parametrize("architecture, in_channels, image_size, dataset", [
    ("small-cnn", 1, 8, "digits"),
    ("small-cnn", 1, 28, "fashion-mnist"),
    ("preact-resnet-18", 3, 32, "cifar10"),
    ("wide-resnet-28-10", 3, 32, "cifar10"),
    ("wide-resnet-34-10", 3, 32, "cifar100"),
])
def test_builtin_architecture_gives_logits_and_survives_a_file_round_trip(
        tmp_path: Path, architecture: str, in_channels: int, image_size: int, dataset: str) -> None:
    num_classes = 100 if dataset == "cifar100" else 10
    kwargs = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size, dataset=dataset)
    torch.manual_seed(0)
    model = create_model(architecture, **kwargs).eval()
    x = torch.rand(2, in_channels, image_size, image_size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, num_classes) and torch.isfinite(logits).all()
    path = tmp_path / "weights.safetensors"
    save_model_file(model, path)
    loaded = load_model_file(path, architecture, **kwargs)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)


def test_small_variants_of_the_classes_build() -> None:
    x = torch.rand(2, 3, 32, 32)
    assert WideResNet(depth=10, widen_factor=1, num_classes=7)(x).shape == (2, 7)
    assert PreActResNet(blocks=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=5)(x).shape == (2, 5)
    assert SmallCNN(num_classes=3, in_channels=3, width=4)(x).shape == (2, 3)
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=12)


def test_cifar_models_normalise_inside_and_keep_it_out_of_the_state_dict() -> None:
    model = create_model("wide-resnet-28-10", num_classes=10, dataset="cifar10")
    assert "normalize.mean" not in model.state_dict()
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))


def test_unknown_architecture_lists_the_known_names() -> None:
    with pytest.raises(UnsupportedArchitecture) as info:
        create_model("resnet-9000", num_classes=10)
    assert info.value.code == "unsupported_architecture"
    assert all(name in info.value.message for name in BUILTIN_ARCHITECTURES)
    assert "robustbench:" in info.value.message


def test_too_small_images_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least 8"):
        create_model("small-cnn", num_classes=10, in_channels=1, image_size=4)


# --- safetensors loading -------------------------------------------------------------------------

def test_one_wrong_shape_is_named_with_expected_and_found(tmp_path: Path) -> None:
    path = _small_cnn_file(tmp_path, **{"classifier.3.weight": torch.zeros(9, 64)})
    with pytest.raises(InvalidModelFile) as info:
        _load_small_cnn(path)
    assert "classifier.3.weight: expected shape [10, 64], found [9, 64]" in info.value.message
    assert info.value.code == "invalid_model_file"


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8).state_dict()
    del state["features.0.bias"]
    state["head.extra"] = torch.zeros(3)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(InvalidModelFile) as info:
        _load_small_cnn(path)
    assert "missing keys: features.0.bias" in info.value.message
    assert "unexpected keys: head.extra" in info.value.message


def test_module_prefixes_from_data_parallel_are_accepted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    save_model_file({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "dp.safetensors")
    loaded = _load_small_cnn(tmp_path / "dp.safetensors")
    assert torch.equal(loaded.features[0].weight, model.features[0].weight)


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_files_are_refused_without_being_loaded(tmp_path: Path, zipfile: bool) -> None:
    path = tmp_path / "model.safetensors"
    state = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8).state_dict()
    torch.save(state, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(InvalidModelFile, match="is a pickle file; pickle is refused") as info:
        _load_small_cnn(path)
    assert "safetensors.torch.save_file" in info.value.message


def test_truncated_and_garbled_safetensors_are_invalid(tmp_path: Path) -> None:
    path = _small_cnn_file(tmp_path)
    raw = path.read_bytes()
    for content in (raw[: len(raw) // 2], b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", b"", os.urandom(64)[1:]):
        path.write_bytes(b"\x00" + content if content[:1] == b"\x80" else content)
        with pytest.raises(InvalidModelFile):
            load_state_dict_file(path)


def test_non_finite_weights_fail_the_forward_check(tmp_path: Path) -> None:
    path = _small_cnn_file(tmp_path, **{"classifier.3.bias": torch.full((10,), float("nan"))})
    with pytest.raises(InvalidModelFile, match="non-finite"):
        _load_small_cnn(path)


def test_a_declared_class_count_that_does_not_fit_is_a_shape_error(tmp_path: Path) -> None:
    path = _small_cnn_file(tmp_path)
    with pytest.raises(InvalidModelFile, match=r"classifier\.3\.weight: expected shape \[7, 64\], found \[10, 64\]"):
        load_model_file(path, "small-cnn", num_classes=7, in_channels=1, image_size=8)


# --- RobustBench (offline) -----------------------------------------------------------------------

def _rb_path(model_dir: Path, name: str = RB_NAME) -> Path:
    path = model_dir / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_import_robustbench_aliases_pyautoattack() -> None:
    robustbench = import_robustbench()
    import pyautoattack.state

    assert robustbench.__name__ == "robustbench"
    assert sys.modules["autoattack"] is sys.modules["pyautoattack"]
    assert sys.modules["autoattack.state"] is pyautoattack.state


def test_robustbench_file_loads_offline_with_its_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = create_model(f"robustbench:{RB_NAME}", num_classes=10)
    # Fresh random weights, distinct from any initialisation; running variances stay positive.
    saved = {k: (v.abs() * (1 + torch.rand_like(v)) if "running_var" in k else v + 0.05 * torch.randn_like(v))
             if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}}, _rb_path(tmp_path))
    del reference

    model = load_robustbench_model(RB_NAME, dataset="cifar10", threat_model="Linf", model_dir=tmp_path,
                                   allow_download=False)
    assert not model.training
    loaded = model.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_html_in_place_of_weights_is_a_download_failure(tmp_path: Path) -> None:
    _rb_path(tmp_path).write_bytes(b"\n  <!DOCTYPE html><html><title>Google Drive - Quota exceeded</title></html>")
    with pytest.raises(ModelDownloadFailed, match="HTML") as info:
        load_robustbench_model(RB_NAME, model_dir=tmp_path)
    assert "delete it" in info.value.message and info.value.code == "model_download_failed"


def test_corrupt_weights_file_is_a_download_failure(tmp_path: Path) -> None:
    _rb_path(tmp_path).write_bytes(b"PK\x03\x04" + os.urandom(200))
    with pytest.raises(ModelDownloadFailed, match="corrupt"):
        load_robustbench_model(RB_NAME, model_dir=tmp_path)


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_robustbench_file_with_code_in_it_is_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with open(_rb_path(tmp_path), "wb") as f:
        pickle.dump({"state_dict": _Boom(str(marker))}, f, protocol=2)
    with pytest.raises(ModelDownloadFailed, match="corrupt or not a weights file"):
        load_robustbench_model(RB_NAME, model_dir=tmp_path)
    assert not marker.exists()


def test_missing_weights_with_downloads_disabled(tmp_path: Path) -> None:
    with pytest.raises(ModelDownloadFailed) as info:
        load_robustbench_model(RB_NAME, model_dir=tmp_path, allow_download=False)
    assert str(tmp_path / "cifar10" / "Linf" / f"{RB_NAME}.pt") in info.value.message
    assert "downloads are disabled (ROBUSTIFY_ALLOW_DOWNLOAD)" in info.value.message


def test_a_download_that_brings_html_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Google Drive answers an over-quota file with an HTML page; gdown saves it as if it were the file."""
    import_robustbench()
    import robustbench.utils

    def quota_page(gdrive_id: str, fname_save: str | Path) -> None:
        Path(fname_save).write_text("<html><body>Too many users have viewed or downloaded this file</body></html>")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", quota_page)
    with pytest.raises(ModelDownloadFailed, match="arrived as HTML"):
        load_robustbench_model(RB_NAME, model_dir=tmp_path, allow_download=True)

    def offline(gdrive_id: str, fname_save: str | Path) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(robustbench.utils, "download_gdrive_new", offline)
    other = "Wang2023Better_WRN-70-16"
    with pytest.raises(ModelDownloadFailed, match="ConnectionError: no route to host"):
        load_robustbench_model(other, model_dir=tmp_path, allow_download=True)
    assert list((tmp_path / "cifar10" / "Linf").iterdir()) == [_rb_path(tmp_path)]  # no partial file left


def test_unknown_robustbench_name_suggests_close_matches(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitecture, match=f"Did you mean {RB_NAME}"):
        load_robustbench_model("Wang2023Better_WRN-28-1", model_dir=tmp_path)


def test_robustbench_ensembles_are_not_supported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitecture, match="ensembles are not supported yet"):
        load_robustbench_model("Chen2020Adversarial", model_dir=tmp_path)


def test_robustbench_architecture_needs_its_own_input_shape() -> None:
    with pytest.raises(UnsupportedArchitecture, match="3×32×32"):
        create_model(f"robustbench:{RB_NAME}", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(UnsupportedArchitecture, match="not for the data set 'digits'"):
        create_model(f"robustbench:{RB_NAME}", num_classes=10, dataset="digits")


# --- timm and torchvision families, and the input contract -----------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("architecture, build", [
    ("timm:resnet18", lambda: __import__("timm").create_model("resnet18", num_classes=3)),
    ("torchvision:resnet18", lambda: __import__("torchvision").models.resnet18(num_classes=3)),
])
def test_a_plain_state_dict_of_timm_or_torchvision_loads_as_is(tmp_path: Path, architecture: str, build) -> None:
    """The user's own library writes the file; the zoo loads it unchanged and normalises in front of it."""
    torch.manual_seed(0)
    net = build().eval()
    save_file(net.state_dict(), str(tmp_path / "net.safetensors"))   # exactly what a user would run
    model = load_model_file(tmp_path / "net.safetensors", architecture, num_classes=3, image_size=(32, 48),
                            input_mean=IMAGENET_MEAN, input_std=IMAGENET_STD)
    assert isinstance(model, PixelInputModel) and not model.training
    x = torch.rand(2, 3, 32, 48)
    normalised = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), net(normalised), atol=1e-5)
    # its state dict is the architecture's own: the keys the user saved, no mean/std, no wrapper prefix
    assert list(model.state_dict()) == list(net.state_dict())
    fresh = build()
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_a_224_model_and_a_32_model_take_their_sizes() -> None:
    with torch.no_grad():
        big = create_model("timm:resnet18", num_classes=4, image_size=224).eval()
        assert big(torch.rand(1, 3, 224, 224)).shape == (1, 4)
        vit = create_model("timm:vit_tiny_patch16_224", num_classes=5, in_channels=1, image_size=32).eval()
        assert vit(torch.rand(2, 1, 32, 32)).shape == (2, 5)   # a fixed-size model is built for 32×32
        tv_vit = create_model("torchvision:vit_b_32", num_classes=3, image_size=64).eval()
        assert tv_vit(torch.rand(1, 3, 64, 64)).shape == (1, 3)


def test_torchvision_grayscale_rebuilds_the_first_convolution(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gray = create_model("torchvision:resnet18", num_classes=10, in_channels=1, image_size=28)
    assert tuple(gray.conv1.weight.shape) == (64, 1, 7, 7) and gray.conv1.stride == (2, 2)
    save_model_file(gray, tmp_path / "gray.safetensors")
    loaded = load_model_file(tmp_path / "gray.safetensors", "torchvision:resnet18", num_classes=10, in_channels=1,
                             image_size=28)
    assert torch.equal(loaded.conv1.weight, gray.conv1.weight)
    # an RGB state dict does not fit a grayscale declaration: the error names the layer and both shapes
    save_model_file(create_model("torchvision:resnet18", num_classes=10, image_size=28), tmp_path / "rgb.safetensors")
    with pytest.raises(InvalidModelFile, match=r"conv1.weight: expected shape \[64, 1, 7, 7\], found \[64, 3, 7, 7\]"):
        load_model_file(tmp_path / "rgb.safetensors", "torchvision:resnet18", num_classes=10, in_channels=1,
                        image_size=28)


def test_timm_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = create_model("timm:resnet18", num_classes=3).state_dict()
    del state["fc.bias"]
    state["head.extra"] = torch.zeros(2)
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(InvalidModelFile) as info:
        load_model_file(tmp_path / "m.safetensors", "timm:resnet18", num_classes=3)
    assert "missing keys: fc.bias" in info.value.message and "unexpected keys: head.extra" in info.value.message


@pytest.mark.parametrize("name, suggestion", [
    ("timm:resnet-18", "timm:resnet18"), ("torchvision:resnet_18", "torchvision:resnet18"),
    ("small_cnn", "small-cnn"), ("timm:hf-hub:timm/resnet18.a1_in1k", '"source": "hf-hub"'),
])
def test_unknown_family_names_suggest_close_ones(name: str, suggestion: str) -> None:
    with pytest.raises(UnsupportedArchitecture) as info:
        create_model(name, num_classes=3)
    assert suggestion in info.value.message


def test_identity_statistics_leave_the_network_unwrapped() -> None:
    net = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8)
    assert with_pixel_input(net, [0.0], [1.0]) is net and with_pixel_input(net, None, None) is net
    wrapped = with_pixel_input(net, [0.5], [0.25])
    assert isinstance(wrapped, PixelInputModel) and "normalize.mean" not in wrapped.state_dict()
    with pytest.raises(ValueError, match="std > 0"):
        PixelInputModel(net, [0.5], [0.0])
