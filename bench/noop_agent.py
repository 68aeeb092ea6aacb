"""A Faust agent that does nothing: the floor under the worker's ingest rate.

Run by ``bench/ingest.py`` (not meant to be run by hand).  It builds the same
Faust app as the worker (:class:`streams.tuning.StreamrecApp`, the same fetch
wait, producer and consumer settings) in a group of its own, with one agent on
``events`` that takes batches exactly as ingest does
(``take_events(settings.ingest_batch, within=settings.ingest_within_s)``) and
only counts them: no decoding, no tables, nothing sent.  What it measures is
Faust's own cost per message; the worker's rate over it says what processing adds.

When it has seen ``--messages`` messages it writes one JSON object to ``--out``
and exits (Faust takes over stdout for its log).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(prog="bench/noop_agent.py")
    ap.add_argument("--messages", type=int, required=True)
    ap.add_argument("--events-per-message", type=float, default=1.0)
    ap.add_argument("--out", required=True, help="the result's JSON goes here")
    # The topic comes from bench/ingest.py, the reader the topic catalogue names.
    ap.add_argument("--topic", required=True)
    args = ap.parse_args()

    from streams.settings import settings
    from streams.tuning import StreamrecApp, kafka_options

    app = StreamrecApp(
        f"bench-noop-{uuid.uuid4().hex[:8]}",
        **kafka_options(settings),
        store="memory://",
        datadir=tempfile.mkdtemp(prefix="streamrec-noop-"),
        web_enabled=False,
    )
    t_start = time.monotonic()
    state = {"n": 0, "n_first": 0, "t_first": None, "t_last": None}

    @app.agent(app.topic(args.topic))
    async def noop(stream):
        async for batch in stream.take_events(settings.ingest_batch,
                                              within=settings.ingest_within_s):
            state["n"] += len(batch)
            now = time.monotonic()
            if state["t_first"] is None:
                # like the worker's rate, the steady rate counts what came after
                # the first batch
                state["t_first"], state["n_first"] = now, state["n"]
            state["t_last"] = now
            if state["n"] >= args.messages:
                report(state, args, t_start)

    sys.argv = ["bench-noop", "worker", "-l", "warn", "--without-web"]
    app.main()


def report(state: dict, args, t_start: float) -> None:
    import orjson
    n, n_first = state["n"], state["n_first"]
    span = state["t_last"] - state["t_first"]
    per = args.events_per_message
    out = {
        "messages": n,
        "time_to_first_message_s": round(state["t_first"] - t_start, 2),
        "first_batch_messages": n_first,
        "seconds": round(span, 3),
        "messages_per_s": round((n - n_first) / span, 1) if span > 0 else None,
        "events_per_s": round((n - n_first) * per / span, 1) if span > 0 else None,
    }
    Path(args.out).write_bytes(orjson.dumps(out))
    # Done: no need for Faust's orderly stop (it commits nothing anyone reads).
    os._exit(0)


if __name__ == "__main__":
    main()
