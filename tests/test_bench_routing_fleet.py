"""The routing benchmark's simulated fleet (bench/routing/fleet.py): what gomodel reads of it, and its prefix cache.

The benchmark's verdicts rest on these: gomodel's `load` strategy sees the
fleet only through its /metrics page, and every prefix-hit figure comes from
the fleet's block cache.
"""

import argparse
import asyncio
import os
import sys

import pytest

from gomodel.routing.vllm_metrics import parse_metrics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "routing"))
import fleet  # noqa: E402


def _replica(slots=2, cache_tokens=64, speed=1.0):
    args = argparse.Namespace(slots=slots, tpot=0.02, batch_cost=0.05, prefill_base=0.01, prefill_per_token=0.001,
                              cache_tokens=cache_tokens, kv_tokens=4096, chunk_tokens=4)
    return fleet.Replica(0, args, speed)


def _job(prompt):
    return fleet.Job("r", prompt, 8, True, True, "seed")


def _submit(replica, job):
    async def go():
        return replica.submit(job)
    return asyncio.run(go())


def test_metrics_page_is_read_by_gomodel():
    replica = _replica(slots=1)
    running = _job("a" * 256)
    queued = _job("b" * 256)
    _submit(replica, running)
    _submit(replica, queued)
    sample = parse_metrics(replica.metrics())
    assert sample.running == 1.0
    assert sample.waiting == 1.0
    assert 0.0 < sample.kv_cache_usage <= 1.0
    assert sample.start_time == replica.start_time
    replica.done(running)  # the queued one takes the slot
    sample = parse_metrics(replica.metrics())
    assert (sample.running, sample.waiting) == (1.0, 0.0)


def test_prefix_cache_hits_whole_leading_blocks_only():
    replica = _replica(slots=4, cache_tokens=1000)
    base = "x" * (4 * fleet.BLOCK_CHARS)
    first = _job(base)
    _submit(replica, first)
    assert first.cached_tokens == 0
    again = _job(base + "y" * fleet.BLOCK_CHARS)
    _submit(replica, again)
    assert again.cached_tokens == 4 * fleet.BLOCK_CHARS // fleet.CHARS_PER_TOKEN
    assert again.prefill_s < first.prefill_s
    # the same text after a different first block hits nothing: hashes are chained
    other = _job("z" * fleet.BLOCK_CHARS + base)
    _submit(replica, other)
    assert other.cached_tokens == 0
    page = replica.metrics().decode()
    assert "vllm:prefix_cache_hits_total{" in page and "vllm:prefix_cache_queries_total{" in page


def test_prefix_cache_evicts_least_recently_used_blocks():
    replica = _replica(slots=8, cache_tokens=2 * fleet.BLOCK_CHARS // fleet.CHARS_PER_TOKEN)  # two blocks
    a, b = "a" * fleet.BLOCK_CHARS, "b" * fleet.BLOCK_CHARS
    _submit(replica, _job(a))
    _submit(replica, _job(b))
    _submit(replica, _job(a))  # a is the most recently used now
    _submit(replica, _job("c" * fleet.BLOCK_CHARS))  # evicts b
    hit_a, hit_b = _job(a), _job(b)
    _submit(replica, hit_a)
    _submit(replica, hit_b)
    assert hit_a.cached_tokens > 0
    assert hit_b.cached_tokens == 0


def test_slow_replica_prefills_slower():
    fast, slow = _replica(), _replica(speed=3.0)
    jf, js = _job("q" * 400), _job("q" * 400)
    _submit(fast, jf)
    _submit(slow, js)
    assert js.prefill_s == pytest.approx(3 * jf.prefill_s)
    assert slow.step_s() == pytest.approx(3 * fast.step_s())
