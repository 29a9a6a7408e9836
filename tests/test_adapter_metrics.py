"""Label values of the per-adapter metric series stay bounded (adapter_metrics.py)."""

from __future__ import annotations

import threading

import pytest
from multiadapter.adapter_metrics import OTHER, AdapterLabels, AdapterTally, RequestRecord


def test_served_adapters_get_series_up_to_the_bound_and_the_rest_are_other():
    labels = AdapterLabels(max_series=2)
    assert labels.served("") == ""  # the base always has its own series
    assert [labels.served(a) for a in ("a", "b", "c", "a", "")] == ["a", "b", OTHER, "a", ""]
    assert labels.served("c") == OTHER  # past the bound it stays "other"


def test_refused_requests_never_mint_a_series():
    labels = AdapterLabels(max_series=8)
    assert labels.refused("made-up") == OTHER
    assert labels.refused(None) == OTHER
    assert labels.refused("") == ""
    assert labels.served("made-up") == "made-up"  # once it served a request, its errors count under it
    assert labels.refused("made-up") == "made-up"
    assert AdapterLabels(max_series=0).served("x") == OTHER
    with pytest.raises(ValueError, match="max_series"):
        AdapterLabels(max_series=-1)


def test_tally_loses_nothing_under_concurrent_adds():
    tally = AdapterTally()
    drained: list[RequestRecord] = []

    def add(n: int) -> None:
        for i in range(500):
            tally.add(RequestRecord(f"a{n}", "ok", i, 1, 0.1, None))
            if i % 50 == 0:
                drained.extend(tally.drain())

    threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    drained.extend(tally.drain())
    assert len(drained) == 2000
