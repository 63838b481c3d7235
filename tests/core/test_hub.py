"""Hugging Face Hub timm models from a local cache the test writes in the Hub's on-disk layout,
with no network: models--<org>--<name>/{blobs/<sha>, refs/main, snapshots/<commit>/<file> → blob}."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.engine.hub import hub_architecture, hub_cache_dir, load_hub_model, parse_hub_architecture, read_hub_config
from core.errors import InvalidModelFile, ModelDownloadFailed, UnsupportedArchitecture

REPO = "acme/tiny-resnet"
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def write_hub_cache(hf_home: Path, repo: str, files: dict[str, bytes], commit: str = "a1b2c3d4" * 5) -> Path:
    """Files of `repo` at revision main, as huggingface_hub caches them (blobs, a ref, snapshot links)."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    for name, content in files.items():
        blob = root / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def timm_config(**over: object) -> bytes:
    config = {"architecture": "resnet18", "num_classes": 3, "num_features": 512, "global_pool": "avg",
              "pretrained_cfg": {"tag": "test", "input_size": [3, 32, 32], "mean": MEAN, "std": STD,
                                 "num_classes": 3, "first_conv": "conv1", "classifier": "fc"}}
    config.update(over)
    return json.dumps(config).encode()


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, torch.Tensor]]:
    import timm

    torch.manual_seed(0)
    state = timm.create_model("resnet18", num_classes=3).state_dict()
    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    save_file(state, str(path))
    return path.read_bytes(), state


def test_a_cached_hub_model_loads_offline_with_its_config(hf_home: Path, weights) -> None:
    content, state = weights
    write_hub_cache(hf_home, REPO, {"config.json": timm_config(), "model.safetensors": content})
    assert hub_cache_dir() == hf_home / "hub"
    model, resolved = load_hub_model(REPO, num_classes=3, input_size=None, input_mean=None, input_std=None,
                                     dataset="cifar10", allow_download=False)
    assert resolved.architecture == "timm:resnet18" and resolved.input_size == [3, 32, 32]
    assert resolved.mean == MEAN and resolved.std == STD
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    import timm

    net = timm.create_model("resnet18", num_classes=3).eval()
    net.load_state_dict(state)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():   # the config's mean and std are applied in front of the network
        expected = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
        assert torch.allclose(model(x), expected, atol=1e-5)
    # a stated input contract wins over the config's
    _, stated = load_hub_model(REPO, num_classes=3, input_size=[3, 64, 64], input_mean=[0.0] * 3, input_std=[1.0] * 3,
                               dataset="cifar10")
    assert stated.input_size == [3, 64, 64] and stated.mean == [0.0] * 3


def test_not_cached_and_downloads_disabled_names_the_cache(hf_home: Path) -> None:
    with pytest.raises(ModelDownloadFailed) as info:
        read_hub_config("acme/absent", allow_download=False)
    assert str(hf_home / "hub") in info.value.message and "ROBUSTIFY_ALLOW_DOWNLOAD" in info.value.message
    assert info.value.code == "model_download_failed"


def test_a_pickle_only_repository_is_refused(hf_home: Path) -> None:
    write_hub_cache(hf_home, REPO, {"config.json": timm_config(), "pytorch_model.bin": b"\x80\x04pickle"})
    with pytest.raises(InvalidModelFile, match=r"pytorch_model\.bin.*pickle"):
        load_hub_model(REPO, num_classes=3, input_size=None, input_mean=None, input_std=None, dataset="x")


@pytest.mark.parametrize("config, error, words", [
    (timm_config(), InvalidModelFile, "predicts 3 classes"),
    (timm_config(model_args={"drop_rate": 0.1}), UnsupportedArchitecture, "model_args"),
    (json.dumps({"model_type": "vit", "architectures": ["ViTForImageClassification"]}).encode(),
     UnsupportedArchitecture, "need their own code"),
    (timm_config(architecture="resnet-18"), UnsupportedArchitecture, "Did you mean timm:resnet18"),
    (b"{not json", InvalidModelFile, "not readable JSON"),
])
def test_configs_that_cannot_be_used_say_why(hf_home: Path, weights, config: bytes, error: type, words: str) -> None:
    write_hub_cache(hf_home, REPO, {"config.json": config, "model.safetensors": weights[0]})
    with pytest.raises(error, match=words):
        load_hub_model(REPO, num_classes=10, input_size=None, input_mean=None, input_std=None, dataset="x")


def test_hub_architecture_names_carry_the_revision() -> None:
    assert parse_hub_architecture("timm:hf-hub:acme/tiny") == ("acme/tiny", "main")
    assert parse_hub_architecture("timm:hf-hub:acme/tiny@v1.0") == ("acme/tiny", "v1.0")


@pytest.mark.parametrize("name", ["timm/resnet18\n", "timm/resnet18.", "a--b", "x/../y", "timm/", "timm/x-", ""])
def test_repository_ids_with_a_trailing_newline_dot_or_traversal_are_refused(name: str) -> None:
    from core.engine.hub import is_repo_id

    assert not is_repo_id(name)
    with pytest.raises(UnsupportedArchitecture):
        parse_hub_architecture(hub_architecture(name or "x/y", None if name else "../../etc"))


@pytest.mark.parametrize("revision", ["../../etc", "/etc", "a//b", "main\n", ".hidden", "a/.b", "a/"])
def test_revisions_that_leave_the_cache_are_refused(revision: str) -> None:
    from core.engine.hub import is_revision

    assert not is_revision(revision)
    assert all(is_revision(ok) for ok in ("main", "v1.0", "refs/pr/1", "0123abcd"))
    with pytest.raises(UnsupportedArchitecture, match="revision"):
        parse_hub_architecture(hub_architecture("timm/resnet18.a1_in1k", revision))
