"""The CI order names real files: a renamed long file would otherwise start last again."""
from pathlib import Path

from tests.conftest import FILE_ORDER, LONGEST_FIRST

ROOT = Path(__file__).resolve().parents[1]


def test_every_longest_first_file_exists_once_and_every_group_is_a_folder() -> None:
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert [p for p in LONGEST_FIRST if not (ROOT / p).is_file()] == []
    assert all((ROOT / g).is_dir() for g in FILE_ORDER)
