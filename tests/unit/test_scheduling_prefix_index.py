import pytest

from scheduling.prefix_index import PrefixIndex


def test_match_counts_leading_blocks_per_instance():
    index = PrefixIndex()
    index.insert_approx("a", [1, 2, 3], now=0.0)
    index.insert_approx("b", [1, 2], now=0.0)
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 2}
    assert index.match([9, 1, 2]) == {"a": 0, "b": 0}
    assert index.match([1, 2, 3], instances=["b", "c"]) == {"b": 2, "c": 0}


def test_gap_stops_the_match():
    index = PrefixIndex()
    index.stored("a", [1, 3])  # block 2 missing (evicted in the middle)
    assert index.match([1, 2, 3]) == {"a": 1}


def test_events_confirm_remove_and_clear():
    index = PrefixIndex(approx_ttl_s=5.0)
    index.add_instance("a", events=True)
    index.insert_approx("a", [1, 2, 3], now=0.0)
    index.stored("a", [1, 2])  # engine confirmed two of the three
    assert index.expire(now=4.9) == 0
    assert index.expire(now=5.0) == 1  # block 3 was a guess that no event confirmed
    assert index.match([1, 2, 3]) == {"a": 2}
    index.removed("a", [2])
    assert index.match([1, 2, 3]) == {"a": 1}
    index.cleared("a")
    assert index.match([1]) == {"a": 0}
    assert index.size("a") == 0


def test_approx_insert_never_downgrades_confirmed_entries():
    index = PrefixIndex(approx_ttl_s=1.0)
    index.add_instance("a", events=True)
    index.stored("a", [7])
    index.insert_approx("a", [7], now=100.0)
    index.expire(now=1e9)
    assert index.contains("a", 7)


def test_refreshed_guess_outlives_its_first_expiry():
    index = PrefixIndex(approx_ttl_s=10.0)
    index.add_instance("a", events=True)
    index.insert_approx("a", [1], now=0.0)
    index.insert_approx("a", [1], now=8.0)
    assert index.expire(now=10.0) == 0
    assert index.expire(now=18.0) == 1


def test_without_events_guesses_do_not_expire():
    index = PrefixIndex(approx_ttl_s=1.0)
    index.insert_approx("a", [1, 2], now=0.0)
    assert index.expire(now=1e9) == 0
    assert index.match([1, 2]) == {"a": 2}


def test_capacity_evicts_least_recently_touched():
    index = PrefixIndex(capacity_blocks=3)
    index.insert_approx("a", [1, 2, 3], now=0.0)
    index.insert_approx("a", [1], now=1.0)  # touch 1
    index.insert_approx("a", [4], now=2.0)  # evicts 2, the oldest
    assert not index.contains("a", 2)
    assert [index.contains("a", k) for k in (1, 3, 4)] == [True, True, True]
    assert index.match([1, 2]) == {"a": 1}


def test_remove_instance_forgets_everything():
    index = PrefixIndex()
    index.stored("a", [1])
    index.stored("b", [1])
    index.remove_instance("a")
    assert index.match([1]) == {"b": 1}
    assert index.instances() == ["b"]


def test_bad_capacity():
    with pytest.raises(ValueError, match="capacity_blocks"):
        PrefixIndex(capacity_blocks=0)
