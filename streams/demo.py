"""``streamrec demo``: the whole system on one machine, from nothing.

Starts the broker, creates the topics, starts a worker, replays MovieLens-100k
through Kafka with a progress bar, waits until the worker has taken it all in,
prints recommendations for a few users, and says where to look next.
"""
from __future__ import annotations

import time

from streams.settings import home, settings


def run_demo(args) -> int:
    from schemas.topics import catalogue
    from streams import broker
    from streams.admin import create_topics
    from streams.cli import print_reply
    from streams.client import RecommendationClient
    from streams.local import WorkerProcess
    from streams.producer import EventProducer
    from models.movielens import IGNORED_PER_RATING
    from streams.replay import find_dataset, load_authors, load_ratings, replay, to_events

    path = find_dataset(args.dataset)
    port = int(settings.bootstrap.rsplit(":", 1)[1])
    print(f"1/5 broker: Apache Kafka on {settings.bootstrap}")
    broker.start(port=port)
    print("2/5 topics:", create_topics(settings.bootstrap, catalogue(settings.partitions,
                                                                     settings.app_id)))
    # The replay squeezes seven months into an hour of event time, so the label
    # join's attribution window is squeezed alike (5 s here ~ 7 hours of ratings).
    worker = WorkerProcess(settings.bootstrap, settings.data_dir, web_port=settings.web_port,
                           log_file=home() / "demo-worker.log",
                           env={"STREAMREC_LABEL_WINDOW_S": "5"})
    print(f"3/5 worker: starting (log: {worker.log_file})")
    worker.start()
    try:
        ratings = load_ratings(path)
        if args.limit:
            ratings = ratings[:args.limit]
        events = list(to_events(ratings, load_authors(path), end_at=time.time(),
                                time_scale=5000.0, impressions=True,
                                ignored=IGNORED_PER_RATING))
        print(f"4/5 replay: {len(ratings)} MovieLens ratings as {len(events)} events "
              f"(an impression, then the rating's engagement; {IGNORED_PER_RATING} "
              f"impressions per rating of movies the user passed over)")
        before = worker.counter("events_ingested")
        with EventProducer(settings.bootstrap) as producer:
            summary = replay(producer, events)
        print(f"    sent {summary['events']} events in {summary['seconds']} s; waiting for the worker")
        worker.wait_for("events_ingested", before + len(events), timeout=600)
        stats = worker.wait_drained()
        time.sleep(1.5)  # let the last trending snapshot be published
        print(f"    worker: {stats.get('events_applied', 0)} new events applied, "
              f"{stats.get('duplicates_dropped', 0)} duplicates dropped (replayed before), "
              f"{stats.get('dead_letters', 0)} dead letters, "
              f"{stats.get('training_examples', 0)} labelled examples")
        from streams.pregen import run as pregen
        print("    pre-generating long-term sources and item embeddings (streamrec pregen)")
        batch = pregen(settings.bootstrap, progress=True)
        print(f"    batch {batch['version']}: {batch['parts']} parts from {batch['events']} events "
              f"in {batch['seconds']} s")
        deadline = time.time() + 60
        while worker.stats()["shared_view"].get("pregen_version") != batch["version"]:
            if time.time() > deadline:
                raise TimeoutError("the worker did not load the pre-generated batch in 60 s")
            time.sleep(0.5)
        print("    waiting for the online trainer's first model version (published every minute)")
        deadline = time.time() + 150
        while not worker.stats()["shared_view"].get("live_model") and time.time() < deadline:
            time.sleep(1)
        live = worker.stats()["shared_view"].get("live_model")
        print(f"    live model: {live or 'none yet: ranking by blended retrieval scores'}")
        print("5/5 recommendations:")
        with RecommendationClient(settings.bootstrap) as client:
            for user in args.users.split(","):
                t0 = time.perf_counter()
                reply = client.recommend(user.strip(), "explore", 10, timeout=2.0)
                print_reply(reply)
                print(f"    round trip {(time.perf_counter() - t0) * 1000:.1f} ms\n")
        print(f"Where to look:\n"
              f"  dashboard     http://127.0.0.1:{settings.web_port}/dashboard/\n"
              f"  worker stats  http://127.0.0.1:{settings.web_port}/stats/\n"
              f"  worker log    {worker.log_file}\n"
              f"  broker log    streamrec broker logs\n"
              f"  ask yourself  streamrec recommend --user 42 -k 10\n"
              f"  dead letters  kcat -C -b {settings.bootstrap} -t events.dlq -e")
        if args.simulate:
            from streams.simulate import main as simulate
            out = home() / "demo-simulation.json"
            print(f"simulating users for {args.simulate:.0f} s: they ask for recommendations, "
                  f"engage with what they are shown, and the system learns from it")
            simulate(["--bootstrap", settings.bootstrap, "--duration", str(args.simulate),
                      "--shift-at", str(args.simulate / 2), "--out", str(out)])
            print(f"    summary: {out} (plot beside it)")
        if args.exit:
            return 0
        print("\nThe worker keeps running; Ctrl-C stops it (the broker keeps running: "
              "'streamrec broker stop').")
        while worker.proc.poll() is None:
            time.sleep(1)
        print(f"worker exited with {worker.proc.returncode}; see {worker.log_file}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        worker.stop()
