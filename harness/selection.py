"""Selection on dev data: per suite, task and method entry, the sweep point whose mean dev score over its seeds is
best. The eval split never selects (its scores are what reports show), so a method's reported score is not the
luckiest of its points on the data it is reported on.

- A point's score is the mean of the primary metric on dev over its seeds that ended `ok`; a point with none is
  not a candidate. Ties go to the point whose label sorts first.
- An entry that was not swept has one point, selected whatever its records hold.
- `grid_edge` names each swept key whose selected value is the smallest or largest of the entry's values for it
  (numbers only): the best may lie beyond the grid.
"""

import json

import pandas as pd

GROUP = ["suite", "task", "entry"]


def mark(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with a boolean `selected` column (every seed's row of each entry's selected point) and `grid_edge`
    (comma-separated swept keys at the edge of their grid; empty where none or not selected)."""
    frame = frame.copy()
    frame["selected"] = False
    frame["grid_edge"] = ""
    if frame.empty:
        return frame
    for _, group in frame.groupby(GROUP, sort=False, dropna=False):
        best = best_point(group)
        if best is None:
            continue
        chosen = group.index[group["method"] == best]
        frame.loc[chosen, "selected"] = True
        frame.loc[chosen, "grid_edge"] = ",".join(edges(group, best))
    return frame


def best_point(group: pd.DataFrame) -> str | None:
    """The label of the entry's selected point, or None when no point has a dev score to compare."""
    points = sorted(group["method"].unique())
    if len(points) == 1:
        return points[0]
    scored = group[(group["status"] == "ok") & group["dev_metric"].notna()]
    if scored.empty:
        return None
    means = scored.groupby("method")["dev_metric"].mean()
    higher = scored["higher_is_better"].dropna()
    sign = -1.0 if len(higher) and not bool(higher.iloc[0]) else 1.0
    return max(sorted(means.index), key=lambda label: sign * means[label])


def edges(group: pd.DataFrame, best: str) -> list[str]:
    """The swept keys whose value at `best` is the smallest or largest number the entry sweeps them over."""
    chosen = json.loads(group.loc[group["method"] == best, "point"].iloc[0])
    at_edge = []
    for key, value in chosen.items():
        values = {json.loads(p).get(key) for p in group["point"].unique()}
        numbers = {v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if len(numbers) > 1 and value in numbers and value in (min(numbers), max(numbers)):
            at_edge.append(key)
    return at_edge
