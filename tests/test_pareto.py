"""The Pareto frontier on constructed points: maximise the metric, minimise the cost."""

import itertools
import math
import random

from harness.pareto import dominates, frontier_mask, frontier_steps


def brute_force(metrics, costs):
    """The definition, checked pair by pair: on the frontier unless some point dominates it."""
    points = list(zip(metrics, costs))
    usable = [not any(v is None or (isinstance(v, float) and math.isnan(v)) for v in p) for p in points]
    return [
        usable[i] and not any(usable[j] and dominates(points[j], points[i]) for j in range(len(points)))
        for i in range(len(points))
    ]


def test_dominated_points_are_excluded():
    #          cheap+weak  mid+best  dear+worse  dear+best  mid+weak
    metrics = [0.70, 0.85, 0.80, 0.85, 0.60]
    costs = [100, 200, 300, 300, 200]
    assert frontier_mask(metrics, costs) == [True, True, False, False, False]


def test_strictly_better_on_one_axis_is_enough():
    assert frontier_mask([0.8, 0.8], [100, 101]) == [True, False]  # same metric, one cheaper
    assert frontier_mask([0.8, 0.9], [100, 100]) == [False, True]  # same cost, one better


def test_exact_ties_are_all_kept():
    # Neither of two identical points is a worse choice, so both stay on the frontier.
    assert frontier_mask([0.8, 0.8, 0.7], [100, 100, 150]) == [True, True, False]
    # A twin of a dominated point is dominated too.
    assert frontier_mask([0.9, 0.8, 0.8], [50, 100, 100]) == [True, False, False]


def test_single_point_and_empty():
    assert frontier_mask([0.5], [10]) == [True]
    assert frontier_mask([], []) == []


def test_all_points_equal():
    assert frontier_mask([0.5] * 4, [10] * 4) == [True] * 4


def test_missing_values_are_on_no_frontier_and_dominate_nothing():
    nan = float("nan")
    assert frontier_mask([0.9, None, nan, 0.5], [10, 1, 1, nan]) == [True, False, False, False]
    assert frontier_mask([None], [None]) == [False]


def test_a_strict_tradeoff_keeps_every_point():
    assert frontier_mask([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4]) == [True] * 4
    assert frontier_mask([0.4, 0.3, 0.2, 0.1], [1, 2, 3, 4]) == [True, False, False, False]


def test_negating_turns_a_benefit_into_a_cost():
    # Throughput is maximised: pass it negated as the cost.
    throughput, metric = [50, 100, 80], [0.9, 0.8, 0.7]
    assert frontier_mask(metric, [-t for t in throughput]) == [True, True, False]


def test_matches_the_definition_on_random_points_with_many_ties():
    rng = random.Random(0)
    for n in itertools.chain(range(1, 9), [30, 60]):
        for _ in range(40):
            metrics = [
                rng.choice([0.5, 0.6, 0.7, float("nan")]) if rng.random() < 0.1 else rng.choice([0.5, 0.6, 0.7])
                for _ in range(n)
            ]
            costs = [rng.choice([1, 2, 3, 4]) for _ in range(n)]
            assert frontier_mask(metrics, costs) == brute_force(metrics, costs), (metrics, costs)


def test_steps_are_the_frontier_sorted_by_cost_and_rising():
    steps = frontier_steps([0.7, 0.85, 0.8, 0.85, 0.6, 0.7], [100, 200, 300, 300, 200, 100])
    assert steps == [(100.0, 0.7), (200.0, 0.85)]  # the twin at (100, 0.7) is one corner
    assert all(b[1] > a[1] for a, b in zip(steps, steps[1:]))


def test_the_figure_draws_this_staircase_in_its_own_units():
    """plots.py draws pareto's staircase, here for a lower-is-better metric: x in MiB, y as recorded."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from harness import plots

    frame = pd.DataFrame(
        {
            "method": list("abcd"),
            "family": "PETL",
            "status": "ok",
            "metric_name": "mse",
            "higher_is_better": False,
            "peak_source": "modelled",
            "metric_std": float("nan"),
            "metric_mean": [0.30, 0.20, 0.25, 0.10],
            "peak_bytes": [2**20, 2 * 2**20, 3 * 2**20, 4 * 2**20],
        }
    )
    fig, ax = plt.subplots()
    plots.scatter_panel(ax, "toy", frame, "peak_bytes", "peak memory", True, False)
    [stairs] = [line for line in ax.lines if line.get_linestyle() == "--"]
    # c (3 MiB, 0.25) is beaten by b (2 MiB, 0.20); the others are each the cheapest at their error
    assert list(stairs.get_xdata()) == [1.0, 2.0, 4.0] and list(stairs.get_ydata()) == [0.30, 0.20, 0.10]
    plt.close(fig)
