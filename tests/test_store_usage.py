"""IUsageStore contract: every backend (see tests/stores.py). The time series with its percentiles."""

import pytest_twisted
from zope.interface.verify import verifyObject

from gomodel.store import IUsageStore
from gomodel.store.records import USAGE_FIELDS
from tests.stores import backend, store  # noqa: F401 (fixtures)


def row(timestamp, *, status=200, tokens=(10, 5), duration=None, ttft=None, request_id="r"):
    values = dict.fromkeys(USAGE_FIELDS)
    values.update(request_id=request_id, timestamp=timestamp, provider="vllm", provider_name="vllm",
                  model="vllm/m", endpoint="/v1/chat/completions", status_code=status, stream=ttft is not None,
                  input_tokens=tokens[0], output_tokens=tokens[1], total_tokens=sum(tokens),
                  duration_ms=duration, ttft_ms=ttft, client_gone=False, estimated=False)
    return tuple(values[name] for name in USAGE_FIELDS)


@pytest_twisted.ensureDeferred
async def test_timeseries_buckets_totals_and_nearest_rank_percentiles(store):
    verifyObject(IUsageStore, store.usage)
    # Bucket 0 (1000..1060): 20 requests, durations 1..20 ms, ttft on the even ones; one error.
    rows = [row(1000 + i, duration=float(i + 1), ttft=float(i + 1) if i % 2 else None,
                status=500 if i == 3 else 200) for i in range(20)]
    # Bucket 2 (1120..1180): one request without a duration; bucket 1 has none.
    rows.append(row(1150.5, tokens=(7, 0)))
    rows.append(row(999.9))  # before the window
    rows.append(row(1180.0))  # at its end: outside
    assert await store.usage.add(rows) == 23

    series = await store.usage.timeseries(1000, 1180, 60)
    assert [s["period"] for s in series] == [1000, 1120]
    first, last = series
    assert (first["requests"], first["input_tokens"], first["output_tokens"], first["total_tokens"],
            first["errors"]) == (20, 200, 100, 300, 1)
    # nearest rank: p50 of 20 values is the 10th, p95 the 19th
    assert (first["duration_ms_p50"], first["duration_ms_p95"]) == (10.0, 19.0)
    # ttft values 2, 4, ..., 20 (10 of them): p50 the 5th (10), p95 the 10th (20)
    assert (first["ttft_ms_p50"], first["ttft_ms_p95"]) == (10.0, 20.0)
    assert (last["requests"], last["input_tokens"], last["errors"]) == (1, 7, 0)
    assert last["duration_ms_p50"] is None and last["ttft_ms_p95"] is None

    # The whole window in one bucket.
    (whole,) = await store.usage.timeseries(1000, 1180, 180)
    assert (whole["period"], whole["requests"], whole["duration_ms_p50"], whole["duration_ms_p95"]) == (
        1000, 21, 10.0, 19.0)
    # One value: it is every percentile.
    (single,) = await store.usage.timeseries(1005, 1006, 1)
    assert (single["duration_ms_p50"], single["duration_ms_p95"]) == (6.0, 6.0)
    assert await store.usage.timeseries(2000, 3000, 60) == []
