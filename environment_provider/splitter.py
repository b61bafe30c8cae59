"""IUT assignment to test runners and round-robin recipe splitting. Pure computation."""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def assign_counts(recipe_counts: dict[str, int], iut_count: int) -> dict[str, int]:
    """Return how many IUTs each test runner gets out of `iut_count`.

    Every runner gets at least one IUT and never more than its number of
    recipes; the rest is shared in proportion to each runner's recipe count
    (largest remainder first, ties in runner order). Raises ValueError when
    there are fewer IUTs than runners.
    """
    runners = list(recipe_counts)
    if iut_count < len(runners):
        raise ValueError(f"{iut_count} IUTs cannot serve {len(runners)} test runners; at least one each is needed")

    total_recipes = sum(recipe_counts.values())
    usable = min(iut_count, total_recipes)
    counts = {runner: 1 for runner in runners}
    spare = usable - len(runners)
    if spare <= 0:
        return counts

    # Proportional share of the spare IUTs, capped by what each runner can use.
    room = {runner: recipe_counts[runner] - 1 for runner in runners}
    shares = {runner: spare * recipe_counts[runner] / total_recipes for runner in runners}
    for runner in runners:
        whole = min(int(shares[runner]), room[runner])
        counts[runner] += whole
        room[runner] -= whole
        spare -= whole

    # Hand out what is left by largest remainder, skipping runners that are full.
    order = sorted(runners, key=lambda runner: (-(shares[runner] - int(shares[runner])), runners.index(runner)))
    while spare > 0:
        progressed = False
        for runner in order:
            if spare == 0:
                break
            if room[runner] > 0:
                counts[runner] += 1
                room[runner] -= 1
                spare -= 1
                progressed = True
        if not progressed:
            break
    return counts


def split_round_robin(recipes: Sequence[T], parts: int) -> list[list[T]]:
    """Deal `recipes` over `parts` lists in turn: recipe i goes to list i mod parts."""
    if parts < 1:
        raise ValueError("parts must be at least 1")
    return [list(recipes[index::parts]) for index in range(parts)]
