"""Sorted runs spilled to disk and merged give exactly ``sorted``, whatever the run size."""

from __future__ import annotations

import random

import pytest

from services.common.external_sort import sorted_names


@pytest.mark.parametrize("count, run", [
    (0, 5),        # nothing
    (4, 5),        # fits in one run: no file
    (5, 5),        # exactly one run: spilled and merged alone
    (103, 7),      # many runs and a short last one
    (1000, 1000),  # one full run
])
def test_spilled_runs_merge_to_the_sorted_names(count, run):
    rng = random.Random(count)
    names = [f"{rng.getrandbits(40):010x}" + rng.choice(["", "-b", ".json", "Ä"]) for _ in range(count)]
    names += names[: count // 10]  # duplicates stay, as a listing never has them but sorted() would
    assert list(sorted_names(iter(names), run=run)) == sorted(names)


def test_names_with_a_line_break_are_no_keys_and_are_dropped():
    assert list(sorted_names(["b", "a\nz", "a"], run=1)) == ["a", "b"]
