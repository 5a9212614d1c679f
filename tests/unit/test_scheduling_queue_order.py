import pytest

from scheduling.queue_order import Held, decode_order, fifo_order, prefill_order, prefill_weights


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
