import pytest

from scheduling.queue_order import Held, aged_shortest_first, decode_order, fifo_order, prefill_order, prefill_weights


def test_prefill_weights_follow_omniinfer_formula():
    items = [Held(1000, 10, arrived=0.0), Held(250, 10, arrived=0.9), Held(500, 10, arrived=0.5)]
    now = 1.0
    # max_len 1000, max_wait 1.0
    expected = [0.8 * 0 + 0.2 * 1.0, 0.8 * 0.75 + 0.2 * 0.1, 0.8 * 0.5 + 0.2 * 0.5]
    assert prefill_weights(items, now) == pytest.approx(expected)
    assert prefill_order(items, now) == [1, 2, 0]


def test_waiting_eventually_beats_length():
    long_old = Held(4000, 1, arrived=0.0)
    short_new = Held(3000, 1, arrived=9.99)
    # weights: long 0.2*1.0 = 0.2; short 0.8*0.25 + 0.2*0.001 ~ 0.2002 -> short first
    assert prefill_order([long_old, short_new], now=10.0) == [1, 0]
    short_new = Held(3500, 1, arrived=9.99)  # 0.8*0.125 = 0.1 < 0.2 -> the old long one first
    assert prefill_order([long_old, short_new], now=10.0) == [0, 1]


def test_wait_normaliser_floor_of_50ms():
    items = [Held(100, 1, arrived=0.0), Held(100, 1, arrived=0.01)]
    assert prefill_weights(items, now=0.01) == pytest.approx([0.2 * 0.01 / 0.05, 0.0])


def test_decode_longest_first_and_fifo():
    items = [Held(100, 100, 0.0), Held(500, 10, 1.0), Held(100, 100, -1.0)]
    assert decode_order(items) == [1, 2, 0]
    assert fifo_order(items) == [2, 0, 1]
    assert prefill_order([], 0.0) == []


def test_aged_shortest_first_by_hand():
    items = [Held(10, 1, arrived=0.0, service_s=0.9),    # key 0.9 - 1.0 * 1.0 = -0.1
             Held(10, 1, arrived=0.75, service_s=0.1),   # key 0.1 - 0.25 = -0.15
             Held(10, 1, arrived=0.9, service_s=0.04),   # key 0.04 - 0.1 = -0.06
             Held(10, 1, arrived=1.0, service_s=0.5)]    # key 0.5
    assert aged_shortest_first(items, now=1.0, aging=1.0) == [1, 0, 2, 3]
    # half the aging: keys 0.4, -0.025, -0.01, 0.5
    assert aged_shortest_first(items, now=1.0, aging=0.5) == [1, 2, 0, 3]
    assert aged_shortest_first(items, now=1.0, aging=0.0) == [2, 1, 3, 0]  # pure shortest first
    ties = [Held(1, 1, arrived=0.5, service_s=0.0), Held(1, 1, arrived=0.25, service_s=0.25)]
    assert aged_shortest_first(ties, now=1.0) == [1, 0]  # keys -0.5 and -0.5: earlier arrival first
    with pytest.raises(ValueError, match="aging"):
        aged_shortest_first(items, 1.0, aging=-1)


def _serve(jobs, order, servers=1):
    """Single queue, ``servers`` servers, each job takes its service_s; returns the serving
    order (job indices) with the queue ordered by ``order(held, now)`` at each free server."""
    events, waiting, served, busy_until = sorted(range(len(jobs)), key=lambda k: jobs[k].arrived), [], [], [0.0] * servers
    now, k = 0.0, 0
    while k < len(events) or waiting:
        free = min(range(servers), key=lambda s: busy_until[s])
        now = max(now, busy_until[free])
        while k < len(events) and jobs[events[k]].arrived <= now:
            waiting.append(events[k])
            k += 1
        if not waiting:
            now = jobs[events[k]].arrived
            continue
        pick = waiting.pop(order([jobs[j] for j in waiting], now)[0])
        served.append(pick)
        busy_until[free] = now + jobs[pick].service_s
    return served


@pytest.mark.parametrize("aging", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("seed", range(5))
def test_starvation_bound_holds_on_overloaded_random_queues(seed, aging):
    import random

    rng = random.Random(seed)
    t, jobs = 0.0, []
    for _ in range(400):  # 30 % more work arrives than one server does: the queue only grows
        t += rng.expovariate(1.3 / 0.3)
        jobs.append(Held(1, 1, arrived=t, service_s=rng.choice([0.01, 0.05, 0.3, 1.0, 2.0])))
    served = _serve(jobs, lambda items, now: aged_shortest_first(items, now, aging))
    position = {j: p for p, j in enumerate(served)}
    for r, jr in enumerate(jobs):
        for x, jx in enumerate(jobs):
            if jx.arrived > jr.arrived and position[x] < position[r]:
                # x overtook r: only possible if it arrived within service_r / aging after r
                assert jx.arrived - jr.arrived < jr.service_s / aging


def test_omniinfer_weights_have_no_such_bound():
    # the longest request waits while shorter ones keep arriving, however long it has waited
    long_old = Held(1000, 1, arrived=0.0)
    for now in (1.0, 10.0, 1000.0):
        newcomer = Held(100, 1, arrived=now)  # just arrived: 0.8 * 0.9 = 0.72 > the old one's 0.2
        assert prefill_order([long_old, newcomer], now) == [1, 0]
    # the aged order serves it once it has waited service / aging
    old, new = Held(1000, 1, 0.0, service_s=1.0), Held(100, 1, 10.0, service_s=0.1)
    assert aged_shortest_first([old, new], now=10.0) == [0, 1]
