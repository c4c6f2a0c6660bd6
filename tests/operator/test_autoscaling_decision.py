"""The autoscaling decision alone: bounds, monotonicity, stabilisation, missing replicas, capacity."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parallama_operator.autoscaling import (
    Decision,
    LimitedBy,
    Observation,
    Policy,
    Recommendation,
    decide,
    recommend,
)

policies = st.builds(
    lambda low, extra, target, up, down: Policy(low, low + extra, target, up, max(up, down)),
    st.integers(1, 5),
    st.integers(0, 10),
    st.floats(0.1, 1.0),
    st.floats(0, 120),
    st.floats(0, 900),
)
observations = st.builds(
    Observation,
    slots_per_replica=st.integers(1, 16),
    busy=st.integers(0, 200).map(float),
    queued=st.integers(0, 200).map(float),
    reporting=st.integers(0, 20),
    missing=st.integers(0, 5),
)


def _history(observations: list[Observation], policy: Policy, step: float) -> list[Recommendation]:
    return [recommend(o, policy, at=i * step) for i, o in enumerate(observations)]


def test_the_formula() -> None:
    policy = Policy(1, 10, target_utilization=0.8)
    # 4 slots at 80 % serve 3.2 requests; 7 busy + 3 queued need ceil(10 / 3.2) = 4 replicas
    assert recommend(Observation(4, busy=7, queued=3, reporting=3), policy, 0).up == 4
    # exactly 2 x 3.2 must not round up to 3 on float noise
    assert recommend(Observation(4, busy=6.4, reporting=2), policy, 0).up == 2
    assert recommend(Observation(4, reporting=2), policy, 0).up == 0


@settings(max_examples=300)
@given(policies, st.lists(observations, min_size=1, max_size=12), st.integers(1, 20), st.integers(0, 30))
def test_never_above_max_or_below_min(
    policy: Policy, seen: list[Observation], current: int, capacity: int
) -> None:
    history = _history(seen, policy, step=15)
    now = history[-1].at
    unlimited = decide(history, policy, current, now)
    assert policy.min_replicas <= unlimited.replicas <= policy.max_replicas
    limited = decide(history, policy, current, now, capacity=capacity)
    assert limited.replicas >= policy.min_replicas
    assert limited.replicas <= max(capacity, current, policy.min_replicas)
    assert limited.replicas <= unlimited.replicas


@settings(max_examples=300)
@given(
    policies,
    st.lists(observations, min_size=1, max_size=10),
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=10, max_size=10),
    st.integers(1, 20),
)
def test_monotone_in_load(
    policy: Policy, seen: list[Observation], extra: list[tuple[int, int]], current: int
) -> None:
    """More load at every observation never gives fewer replicas."""
    heavier = [
        Observation(o.slots_per_replica, o.busy + b, o.queued + q, o.reporting, o.missing)
        for o, (b, q) in zip(seen, extra, strict=False)
    ]
    light = _history(seen, policy, step=10)
    heavy = _history(heavier, policy, step=10)
    now = light[-1].at
    assert decide(heavy, policy, current, now).replicas >= decide(light, policy, current, now).replicas


@settings(max_examples=200)
@given(policies, observations, st.integers(1, 20), st.floats(1, 60))
def test_a_steady_load_converges_without_flapping(
    policy: Policy, observation: Observation, start: int, period: float
) -> None:
    """Under a constant load the replica count moves one way only and settles on the target."""
    history: list[Recommendation] = []
    current = start
    sizes = []
    for tick in range(int((policy.scale_down_window_s + policy.scale_up_window_s) / period) + 4):
        now = tick * period
        history.append(recommend(observation, policy, now))
        current = decide(history, policy, current, now).replicas
        sizes.append(current)
    changes = [b - a for a, b in itertools.pairwise(sizes) if b != a]
    assert all(c > 0 for c in changes) or all(c < 0 for c in changes)
    settled = recommend(observation, policy, 0)
    assert settled.up <= settled.down
    low, high = policy.min_replicas, policy.max_replicas
    assert min(max(settled.up, low), high) <= sizes[-1] <= min(max(settled.down, low), high)


def test_a_short_lull_does_not_scale_down() -> None:
    policy = Policy(1, 10, 1.0, scale_up_window_s=0, scale_down_window_s=300)
    busy = Observation(4, busy=16, reporting=4)
    idle = Observation(4, busy=0, reporting=4)
    history = [recommend(busy, policy, t) for t in range(0, 300, 30)]
    history += [recommend(idle, policy, t) for t in range(300, 570, 30)]
    assert decide(history, policy, current=4, now=540).replicas == 4  # busy at 270 is within 300 s
    history += [recommend(idle, policy, t) for t in range(570, 660, 30)]
    assert decide(history, policy, current=4, now=630).replicas == 1


def test_a_spike_must_last_the_scale_up_window() -> None:
    policy = Policy(1, 10, 1.0, scale_up_window_s=60, scale_down_window_s=300)
    history = [recommend(Observation(4, busy=4, reporting=1), policy, t) for t in (0, 15, 30)]
    history.append(recommend(Observation(4, busy=4, queued=12, reporting=1), policy, 45))
    assert decide(history, policy, current=1, now=45).replicas == 1
    history += [recommend(Observation(4, busy=4, queued=12, reporting=1), policy, t) for t in (60, 90, 105)]
    assert decide(history, policy, current=1, now=105).replicas == 4


def test_unreachable_replicas_do_not_trigger_a_scale_down() -> None:
    """Three of four replicas cannot be read and the one that can is idle: counting the missing
    ones as busy keeps all four; counting them as idle would have scaled down to one."""
    policy = Policy(1, 8, 1.0, scale_down_window_s=0)
    history = [recommend(Observation(4, busy=0, reporting=1, missing=3), policy, 0)]
    assert decide(history, policy, current=4, now=0).replicas >= 3
    # and they do not count as load for a scale-up either
    assert decide(history, policy, current=1, now=0).replicas == 1


@pytest.mark.parametrize(
    ("capacity", "expected"),
    [
        (None, Decision(6, 10, LimitedBy.MAX)),
        (8, Decision(6, 10, LimitedBy.MAX)),
        (4, Decision(4, 10, LimitedBy.CAPACITY)),
        (1, Decision(2, 10, LimitedBy.CAPACITY)),  # never below what runs: full clusters stop growth
    ],
)
def test_max_and_capacity_limit_and_say_so(capacity: int | None, expected: Decision) -> None:
    policy = Policy(1, 6, 1.0)
    history = [recommend(Observation(4, busy=8, queued=32, reporting=2), policy, 0)]
    assert decide(history, policy, current=2, now=0, capacity=capacity) == expected


@pytest.mark.parametrize(
    "bad",
    [
        {"min_replicas": 0},
        {"min_replicas": 3, "max_replicas": 2},
        {"target_utilization": 0},
        {"target_utilization": 1.5},
        {"scale_down_window_s": -1},
    ],
)
def test_policy_refuses_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Policy(**{"min_replicas": 1, "max_replicas": 4, **bad})  # type: ignore[arg-type]
