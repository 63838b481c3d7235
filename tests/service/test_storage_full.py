"""A disk that fills while a checkpoint is written is `storage_full`, never `internal_error`:
safetensors reports ENOSPC as a SafetensorError whose text ends in "(os error 28)"."""
import errno

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from core.errors import is_storage_full
from tests.tmpfs import tmpfs
from worker.finish import error_of


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a real filesystem that runs out of room (mounting needs root, as CI runs)."""
    with tmpfs(tmp_path / "small", "64k") as mount:
        yield mount


def test_a_checkpoint_that_fills_the_disk_is_storage_full(full_disk):
    with pytest.raises(SafetensorError) as caught:
        save_file({"w": torch.zeros(100_000)}, str(full_disk / "checkpoint.safetensors"))
    assert type(caught.value).__name__ == "SafetensorError"      # not an OSError: errno is in the text only
    assert is_storage_full(caught.value)
    error = error_of(caught.value)
    assert error["code"] == "storage_full" and "No space left on device" in error["message"]


def test_storage_full_is_found_in_the_causes_and_nowhere_else():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not write the report") from inner
    except RuntimeError as outer:
        assert is_storage_full(outer)
    assert is_storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_storage_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_storage_full(ValueError("I/O error: Permission denied (os error 13)"))
    assert error_of(ValueError("boom"))["code"] == "internal_error"


def test_the_free_space_readyz_asks_for_scales_with_the_disk():
    from core.service.settings import Settings

    gib = 1024**3
    assert Settings().required_free_bytes(4 * gib) == 256 * 1024**2       # a small disk: the floor
    assert Settings().required_free_bytes(100 * gib) == 2 * gib            # 2 % of the disk
    assert Settings().required_free_bytes(10_000 * gib) == 10 * gib        # a large disk: the cap
    assert Settings(min_free_bytes=5).required_free_bytes(100 * gib) == 5  # the operator's number wins
