"""bench/loop_local.py: the in-process closed loop runs the world against the funnel and learns."""
import math

import pytest

from tests.test_item_state import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("loop_local")


def test_short_loop_learns_publishes_and_reports(bench):
    args = bench.parser().parse_args(["--duration", "60", "--rate", "5", "--shift-at", "40",
                                      "--publish-every", "10", "--label-delay", "5",
                                      "--train-batch", "64", "--quality-from", "20",
                                      "--interval", "20", "--no-progress"])
    loop = bench.Loop(args)
    result = loop.run()
    assert len(loop.records) == 300
    assert result["counts"]["steps"] > 0 and result["counts"]["published"] == 5
    # Every published version was judged by the gate, live or not.
    assert len(loop.versions) == 5 and all(v["reason"] for v in loop.versions)
    assert [t for t, _ in result["over_time"]] == [0.0, 20.0, 40.0]
    assert -1.0 <= result["share_of_oracle"] <= 1.0
    assert result["probes"]["probes"] > 0
    assert result["adaptation"]["spans_shift"] is True
    # The learner saw the label join's examples: every served impression, every organic one.
    impressions = sum(r["stats"]["system"]["impressions"] for r in loop.records)
    assert result["counts"]["examples"] + len(loop.ready) + len(loop.pending_examples) >= impressions


def test_same_seeds_same_run(bench):
    args = bench.parser().parse_args(["--duration", "20", "--rate", "5", "--publish-every", "5",
                                      "--label-delay", "2", "--train-batch", "32",
                                      "--quality-from", "0", "--no-progress"])
    a, b = bench.Loop(args).run(), bench.Loop(args).run()
    assert a["share_of_oracle"] == b["share_of_oracle"] and not math.isnan(a["share_of_oracle"])
    assert a["counts"] == b["counts"]
