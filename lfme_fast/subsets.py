"""Cardinality-adjacent class subsets (LFME, ECCV 2020, Sec. 3 / 4.1).

Classes are grouped by their training-set count with ``L - 1`` thresholds given as *inclusive lower
bounds in descending order* ``(t1, ..., t_{L-1})``:

* subset 0 (the "many" end): ``count >= t1``
* subset k (0 < k < L-1):    ``t_{k+1} <= count < t_k``
* subset L-1 (the "few" end): ``count < t_{L-1}``

Two published conventions disagree on where the ImageNet-LT boundaries sit, so both are named and
selectable (see REFERENCE.md Sec. 1):

* ``lfme``   (LFME/OLTR code, reproduces LFME Table 1): many >= 100, medium 21..99, few <= 20
* ``strict`` (most later papers): many > 100, medium 20..100, few < 20
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

CONVENTIONS: dict[str, tuple[int, ...]] = {"lfme": (100, 21), "strict": (101, 20)}

__all__ = [
    "CONVENTIONS",
    "Subset",
    "split_classes",
    "resolve_thresholds",
    "subset_names",
    "describe_convention",
    "parse_thresholds",
]


@dataclass(frozen=True)
class Subset:
    """One cardinality-adjacent subset.

    ``classes`` holds the int64 class ids in ascending order (possibly empty). ``lower`` and ``upper``
    are *inclusive* bounds on the per-class count; ``None`` means unbounded on that side (the
    many-end subset has no upper bound, the few-end subset no lower bound).
    """

    name: str
    classes: np.ndarray
    lower: int | None
    upper: int | None

    def __len__(self) -> int:
        return int(self.classes.size)

    def contains_count(self, count: int) -> bool:
        """Whether a class with ``count`` samples falls in this subset's count range."""
        if self.lower is not None and count < self.lower:
            return False
        if self.upper is not None and count > self.upper:
            return False
        return True

    def range_text(self) -> str:
        """Human-readable count range, e.g. ``">= 100"``, ``"21..99"``, ``"<= 20"``."""
        if self.lower is None and self.upper is None:
            return "all"
        if self.upper is None:
            return f">= {self.lower}"
        if self.lower is None:
            return f"<= {self.upper}"
        return f"{self.lower}..{self.upper}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (class ids as plain ints)."""
        return {
            "name": self.name,
            "classes": [int(c) for c in self.classes],
            "num_classes": int(self.classes.size),
            "lower": self.lower,
            "upper": self.upper,
        }


def _validate_thresholds(thresholds: Sequence[int]) -> tuple[int, ...]:
    """Check thresholds are a non-empty, strictly descending sequence of positive ints."""
    if isinstance(thresholds, (str, bytes)):
        raise ValueError(f"thresholds must be a sequence of ints, got the string {thresholds!r}")
    try:
        values = list(thresholds)
    except TypeError:
        raise ValueError(f"thresholds must be a sequence of ints, got {thresholds!r}") from None
    if not values:
        raise ValueError("thresholds must contain at least one value (L >= 2 subsets)")
    out = []
    for t in values:
        # bool is an int subclass but never a meaningful count
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise ValueError(f"threshold {t!r} is not an integer (thresholds={tuple(values)!r})")
        if t <= 0:
            raise ValueError(f"threshold {int(t)} is not positive (thresholds={tuple(values)!r})")
        out.append(int(t))
    for a, b in zip(out, out[1:]):
        if b >= a:
            raise ValueError(
                f"thresholds must be strictly descending inclusive lower bounds, but {a} is followed "
                f"by {b} (thresholds={tuple(out)!r})"
            )
    return tuple(out)


def resolve_thresholds(convention: str = "lfme", thresholds: Sequence[int] | None = None) -> tuple[int, ...]:
    """Return validated thresholds: ``thresholds`` if given, else the named convention's."""
    if thresholds is not None:
        return _validate_thresholds(thresholds)
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; choose one of {sorted(CONVENTIONS)}")
    return CONVENTIONS[convention]


def subset_names(num_subsets: int) -> list[str]:
    """Subset names for ``L`` subsets: many/medium/few for 3, many/few for 2, else subset0..subset{L-1}."""
    if num_subsets < 2:
        raise ValueError(f"need at least 2 subsets, got {num_subsets}")
    if num_subsets == 3:
        return ["many", "medium", "few"]
    if num_subsets == 2:
        return ["many", "few"]
    return [f"subset{k}" for k in range(num_subsets)]


def _as_counts(counts: Any) -> np.ndarray:
    arr = np.asarray(counts)
    if arr.ndim != 1:
        raise ValueError(f"counts must be a 1-D array of per-class counts, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"counts must be numeric, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            bad = int(np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))[0])
            raise ValueError(f"counts must be whole numbers; class {bad} has count {arr[bad]!r}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        bad = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"counts must be non-negative; class {bad} has count {int(arr[bad])}")
    return arr


def split_classes(
    counts: Any, convention: str = "lfme", thresholds: Sequence[int] | None = None
) -> list[Subset]:
    """Split classes into cardinality-adjacent subsets, ordered many -> few.

    ``counts[c]`` is the number of training samples of class ``c``. ``thresholds`` (strictly
    descending inclusive lower bounds) overrides ``convention``. Subsets may be empty.
    """
    arr = _as_counts(counts)
    ts = resolve_thresholds(convention, thresholds)
    names = subset_names(len(ts) + 1)
    # bounds[k] = (inclusive lower, inclusive upper) of subset k
    lowers: list[int | None] = [*ts, None]
    uppers: list[int | None] = [None, *(t - 1 for t in ts)]
    subsets = []
    for name, lo, hi in zip(names, lowers, uppers):
        mask = np.ones(arr.shape, dtype=bool)
        if lo is not None:
            mask &= arr >= lo
        if hi is not None:
            mask &= arr <= hi
        subsets.append(Subset(name=name, classes=np.flatnonzero(mask).astype(np.int64), lower=lo, upper=hi))
    return subsets


def describe_convention(convention: str = "lfme", thresholds: Sequence[int] | None = None) -> str:
    """One-line description naming the convention, e.g. ``"lfme (many >= 100, medium 21..99, few <= 20)"``.

    Explicit ``thresholds`` that differ from the named convention are reported as ``custom``.
    """
    ts = resolve_thresholds(convention, thresholds)
    if thresholds is None or (convention in CONVENTIONS and CONVENTIONS[convention] == ts):
        label = convention
    else:
        label = f"custom thresholds {','.join(str(t) for t in ts)}"
    parts = [f"{s.name} {s.range_text()}" for s in split_classes(np.zeros(0, np.int64), thresholds=ts)]
    return f"{label} ({', '.join(parts)})"


def parse_thresholds(text: str) -> tuple[int, ...]:
    """Parse a CLI threshold list ``"A,B,..."`` (strictly descending positive ints)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"thresholds must be a comma-separated list like '100,21', got {text!r}")
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError(f"threshold {part!r} in {text!r} is not an integer") from None
    return _validate_thresholds(values)
