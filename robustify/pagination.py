"""Cursor pages: `for job in client.jobs.list():` walks every page; `.data` is this page only."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Page(Generic[T]):
    """One page of a list (`data`, `has_more`, `last_id`); iterating it fetches the next pages."""

    def __init__(self, data: list[T], has_more: bool, last_id: str | int | None,
                 fetch: Callable[[str | int], Page[T]]) -> None:
        self.data, self.has_more, self.last_id = data, has_more, last_id
        self._fetch = fetch

    def next_page(self) -> Page[T] | None:
        if not self.has_more or self.last_id is None:
            return None
        return self._fetch(self.last_id)

    def iter_pages(self) -> Iterator[Page[T]]:
        page: Page[T] | None = self
        while page is not None:
            yield page
            page = page.next_page()

    def __iter__(self) -> Iterator[T]:
        for page in self.iter_pages():
            yield from page.data

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"Page({len(self.data)} items, has_more={self.has_more})"
