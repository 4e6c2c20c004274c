"""The concept vocabulary of a Broden dataset: label numbers, names and categories."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

from dissect.errors import OptionError


@dataclass(frozen=True)
class Concept:
    """One concept: a global label number, its name and its primary category name."""

    number: int
    name: str
    category: str


class Vocabulary:
    """Label names and categories of a dataset.

    Parameters
    ----------
    categories:
        Category names in use, in category.csv order. Tally columns and tie-breaks follow it.
    names:
        ``names[n]`` is the name of label number ``n``; ``''`` for numbers label.csv does not list
        (label 0 too, unless it has a row), as NetDissect-Lite names them.
    primary:
        int64 array (L,): index into ``categories`` of each label's primary category, -1 for label
        0 and for labels that belong to none of ``categories``.
    memberships:
        For each label number, the categories it belongs to (any order).
    """

    def __init__(
        self,
        categories: tuple[str, ...],
        names: list[str],
        primary: np.ndarray,
        memberships: list[tuple[str, ...]] | None = None,
    ) -> None:
        if len(names) != len(primary):
            raise ValueError("names and primary must have the same length")
        self.categories = tuple(categories)
        self.names = list(names)
        self.primary = np.asarray(primary, dtype=np.int64)
        self.memberships = memberships or [() for _ in names]
        self._by_name: dict[str, int] = {}
        for number, name in enumerate(self.names):
            if number > 0 and name:
                self._by_name.setdefault(name, number)

    @property
    def num_labels(self) -> int:
        """L: one more than the largest label number."""
        return len(self.names)

    def number(self, name: str) -> int:
        """Label number of ``name``; :class:`OptionError` listing close names when unknown."""
        if name in self._by_name:
            return self._by_name[name]
        close = difflib.get_close_matches(name, list(self._by_name), n=5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise OptionError(f"unknown concept {name!r}{hint}")

    def name(self, number: int) -> str:
        """Name of label ``number``."""
        return self.names[number]

    def category_of(self, number: int) -> str | None:
        """Primary category name of label ``number``, or None when it has none."""
        index = int(self.primary[number])
        return self.categories[index] if index >= 0 else None

    def concept(self, number: int) -> Concept:
        """The :class:`Concept` of label ``number`` (category '' when it has none)."""
        return Concept(int(number), self.names[number], self.category_of(number) or "")

    def labels_in(self, category: str) -> np.ndarray:
        """int64 array of the label numbers whose primary category is ``category``."""
        if category not in self.categories:
            raise OptionError(
                f"unknown category {category!r}; categories: {', '.join(self.categories)}"
            )
        return np.flatnonzero(self.primary == self.categories.index(category)).astype(np.int64)


def primary_categories(
    categories: tuple[str, ...], coverage: dict[str, dict[int, float]], num_labels: int
) -> np.ndarray:
    """Primary category of every label number.

    Parameters
    ----------
    categories:
        Category names in order.
    coverage:
        ``coverage[category][number]``: the label's coverage in that category's c_<category>.csv.
    num_labels:
        L.

    Returns
    -------
    int64 array (L,): index of the category with the largest coverage among those the label
    belongs to; ties go to the later category; -1 for labels of no category and for label 0.
    """
    primary = np.full(num_labels, -1, dtype=np.int64)
    best = np.full(num_labels, -np.inf)
    for index, category in enumerate(categories):
        for number, value in coverage.get(category, {}).items():
            if number <= 0 or number >= num_labels:
                continue
            if value >= best[number]:
                best[number] = value
                primary[number] = index
    return primary
