"""Pareto frontier of (metric, cost) points: the methods worth their cost.

Conventions (one place, so the table and the plots agree):
- The metric is maximised and the cost minimised. Callers with a metric where
  lower is better, or a "cost" where more is better (throughput), negate it.
- A point is dominated when another point is at least as good on both axes and
  strictly better on one. The frontier is every point that is not dominated.
- Ties are kept: points with exactly the same metric and cost do not dominate
  each other, so all of them are on the frontier (neither is a worse choice).
  A point with the same metric as another but a higher cost is dominated, and so
  is one with the same cost but a lower metric. Comparison is exact: rounding
  is the caller's decision, not hidden here.
- A point with a missing (None or NaN) metric or cost is on no frontier and
  dominates nothing: a failed cell is not a choice.
"""

from collections.abc import Sequence

from harness.formatting import is_missing


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True if a = (metric, cost) is at least as good as b on both axes and better on one."""
    (ma, ca), (mb, cb) = a, b
    return ma >= mb and ca <= cb and (ma > mb or ca < cb)


def frontier_mask(metrics: Sequence, costs: Sequence) -> list[bool]:
    """For each point, whether it is on the frontier (maximise metric, minimise cost)."""
    if len(metrics) != len(costs):
        raise ValueError(f"{len(metrics)} metrics but {len(costs)} costs")
    points = [(float(m), float(c)) if not (is_missing(m) or is_missing(c)) else None for m, c in zip(metrics, costs)]
    # Sorted by cost, then best metric first: a point is dominated exactly when some earlier
    # point (cheaper, or as cheap and better) has a metric at least as high and is not its twin.
    order = sorted((i for i, p in enumerate(points) if p is not None), key=lambda i: (points[i][1], -points[i][0]))
    mask = [False] * len(points)
    best = None  # (metric, cost) of the best point seen so far in cost order
    for i in order:
        point = points[i]
        if best is None or not dominates(best, point):
            mask[i] = True
        if best is None or point[0] > best[0]:
            best = point
    return mask


def frontier_steps(metrics: Sequence, costs: Sequence) -> list[tuple[float, float]]:
    """The frontier as (cost, metric) corners sorted by cost, for drawing a staircase."""
    mask = frontier_mask(metrics, costs)
    corners = sorted({(float(c), float(m)) for m, c, on in zip(metrics, costs, mask) if on})
    return corners
