"""``streamrec``: the command line for the broker, topics, worker, clients and demo."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _settings():
    from streams.settings import settings
    return settings


def cmd_broker(args) -> int:
    from streams import broker
    if args.action == "start":
        info = broker.start(wipe=args.wipe, sasl_ssl=args.sasl_ssl)
        out = dict(info.__dict__)
        if out.get("client_env"):
            # The password stays in client.env (mode 600), out of terminals and logs.
            out["client_env"] = str(broker.broker_dir(info.port) / "client.env")
            print(f"SASL_SSL: clients connect with the settings in {out['client_env']} "
                  f"(`set -a; . {out['client_env']}; set +a`)", file=sys.stderr)
        print(json.dumps(out, default=str))
    elif args.action == "stop":
        broker.stop(wipe=args.wipe)
    elif args.action == "status":
        print(json.dumps(broker.status(), default=str, indent=2))
    elif args.action == "logs":
        print(broker.logs(args.lines))
    return 0


def cmd_topics(args) -> int:
    from schemas.topics import catalogue, format_topic_map, topic_map
    from streams.admin import create_topics
    s = _settings()
    specs = catalogue(s.partitions, s.app_id)
    if args.action == "create":
        print(json.dumps(create_topics(args.bootstrap or s.bootstrap, specs)))
    elif args.json:
        print(json.dumps(topic_map(specs), indent=2))
    else:
        print(format_topic_map(specs))
    return 0


def cmd_worker(args) -> int:
    import dataclasses
    from confluent_kafka.admin import AdminClient
    from streams.kafka_config import client_config
    import streams.settings
    from streams.producer import check_broker
    s = _settings()
    # A wrong password, CA or address is said plainly within seconds, not by librdkafka
    # after Faust's 15 s of retries.
    check_broker(s.bootstrap)
    # Local RocksDB state belongs to one Kafka cluster: a wiped or different broker
    # must not meet offsets persisted for another one, so key the dir by cluster id.
    cluster = AdminClient(client_config(s.bootstrap)).list_topics(timeout=15).cluster_id
    data_dir = s.data_dir / f"cluster-{cluster}" / s.app_id
    data_dir.mkdir(parents=True, exist_ok=True)
    s = dataclasses.replace(s, data_dir=data_dir)
    # A session shorter than the broker allows would be refused at the first join.
    from streams.admin import min_session_timeout_s
    floor = min_session_timeout_s(s.bootstrap)
    if floor is not None and floor > s.session_timeout_s:
        print(f"streamrec worker: session timeout {s.session_timeout_s} s raised to the "
              f"broker's minimum {floor} s", file=sys.stderr)
        s = dataclasses.replace(s, session_timeout_s=floor,
                                heartbeat_interval_s=max(s.heartbeat_interval_s, floor / 4))
    streams.settings.settings = s
    from streams.app import app
    sys.argv = ["streamrec-worker", "worker", "-l", args.loglevel]
    app.main()
    return 0


def cmd_produce(args) -> int:
    import orjson
    from schemas.events import SchemaError
    from streams.producer import EventProducer
    stream = open(args.file, "rb") if args.file and args.file != "-" else sys.stdin.buffer
    sent = skipped = 0
    with EventProducer(args.bootstrap or _settings().bootstrap) as producer:
        for lineno, line in enumerate(stream, 1):
            line = line.strip()
            if not line:
                continue
            key = None
            try:
                record = orjson.loads(line)
                if isinstance(record, dict) and record.get("user_id") is not None:
                    key = str(record["user_id"]).encode()
            except orjson.JSONDecodeError as exc:
                if args.strict:
                    raise SchemaError(f"line {lineno}: not valid JSON: {exc}") from None
                print(f"line {lineno}: not valid JSON, sent anyway for the dead-letter topic",
                      file=sys.stderr)
                skipped += 1
            producer.send_raw(key, line)
            sent += 1
    print(json.dumps({"sent": sent, "invalid_json": skipped}))
    return 0


def cmd_replay(args) -> int:
    from streams.producer import EventProducer, check_broker
    from streams.replay import find_dataset, load_authors, load_ratings, replay, to_events
    bootstrap = args.bootstrap or _settings().bootstrap
    check_broker(bootstrap)
    path = find_dataset(args.dataset)
    ratings = load_ratings(path)
    if args.limit:
        ratings = ratings[:args.limit]
    from models.movielens import IGNORED_PER_RATING
    if args.ignored is None:
        args.ignored = 0 if args.no_impressions else IGNORED_PER_RATING
    events = list(to_events(ratings, load_authors(path), end_at=time.time(),
                            time_scale=args.time_scale, impressions=not args.no_impressions,
                            ignored=args.ignored))
    with EventProducer(bootstrap) as producer:
        summary = replay(producer, events, speed=args.speed, progress=not args.quiet)
    print(json.dumps(summary))
    return 0


def print_reply(reply) -> None:
    tag = f"fallback: {reply.fallback_reason}" if reply.fallback else "funnel"
    print(f"user {reply.user_id} on {reply.surface}: {len(reply.items)} items "
          f"({tag}, ranker {reply.model_versions.get('ranker')}, "
          f"server {reply.server_latency_ms:.1f} ms, stages {reply.stage_counts})")
    for rank, item in enumerate(reply.items, 1):
        reasons = item.why or {}
        why = next((reasons[s] for s in item.sources if s in reasons), "")
        print(f"  {rank:2d}. item {item.item_id:>6s}  score {item.score:6.3f}  "
              f"author {item.author_id or '-':18s} via {', '.join(item.sources)}"
              + (f"  ({why})" if why else ""))


def cmd_recommend(args) -> int:
    from streams.client import RecommendationClient
    with RecommendationClient(args.bootstrap or _settings().bootstrap) as client:
        t0 = time.perf_counter()
        reply = client.recommend(args.user, args.surface, args.k, timeout=args.timeout)
        rtt = (time.perf_counter() - t0) * 1000
    if args.json:
        print(json.dumps(reply.to_dict()))
    else:
        print_reply(reply)
        print(f"round trip {rtt:.1f} ms")
    return 0 if not reply.error else 1


def cmd_pregen(args) -> int:
    from streams.pregen import run
    print(json.dumps(run(args.bootstrap or _settings().bootstrap, window_days=args.window_days,
                         dim=args.dim, progress=not args.quiet)))
    return 0


def cmd_config(args) -> int:
    import orjson
    from streams.pregen import set_funnel_config
    config = None if args.reset else orjson.loads(open(args.file, "rb").read())
    set_funnel_config(args.bootstrap or _settings().bootstrap, args.surface, config)
    print(f"funnel config for {args.surface!r} {'removed' if args.reset else 'published'}")
    return 0


def cmd_train(args) -> int:
    from streams.trainer import bootstrap
    record = bootstrap(args.bootstrap or _settings().bootstrap, epochs=args.epochs,
                       progress=not args.quiet)
    print(json.dumps(record))
    return 0


def _one_model(records: list[dict], model) -> str:
    """The model an action names, or the only one in the registry."""
    if model:
        if not any(r["model"] == model for r in records):
            raise RuntimeError(f"no model {model!r} in the registry")
        return model
    models = sorted({r["model"] for r in records})
    if len(models) != 1:
        raise RuntimeError("name the model with --model (registry has: "
                           f"{', '.join(models) or 'none'})")
    return models[0]


def _one_version(records: list[dict], model, version: str) -> dict:
    match = [r for r in records if r["version"] == version and (model is None or r["model"] == model)]
    if not match:
        raise RuntimeError(f"no version {version!r}" + (f" of {model!r}" if model else "")
                           + " in the registry")
    if len(match) > 1:
        raise RuntimeError(f"version {version!r} exists for several models "
                           f"({', '.join(r['model'] for r in match)}): name one with --model")
    return match[0]


def _promote(bootstrap: str, records: list[dict], args) -> tuple[dict, str]:
    """One step of a launch: registered -> shadow -> canary -> live (``--to``, default
    live), with what the step means for traffic and the next step."""
    from models import registry
    from models.launch import share_text, stability_text
    from stores import model_store
    to = registry.state_name(args.to or "live")
    if args.share is not None and to != registry.CANARY:
        raise ValueError("--share is for --to canary only")
    if to not in (registry.SHADOW, registry.CANARY, registry.LIVE):
        raise ValueError(f"--to {args.to}: promote steps to shadow, canary or production; "
                         f"use retire or rollback to take a version out")
    before = _one_version(records, args.model, args.version)
    live_before = [r["version"] for r in records
                   if r["model"] == before["model"] and r["state"] == registry.LIVE
                   and r["version"] != before["version"]]
    new = model_store.promote(bootstrap, before, to=to, traffic_share=args.share,
                              force=args.force)
    name = f"{new['model']} {new['version']}"
    cmd = f"streamrec models promote --model {new['model']} --version {new['version']}"
    production = ", ".join(live_before) or "no live version: nothing is tried on traffic"
    if to == registry.SHADOW:
        lines = [f"{name}: {before['state']} -> shadow",
                 f"  scores every request beside production ({production}); its predictions "
                 f"are logged tagged shadow, never served",
                 f"  next: {cmd} --to canary --share 0.05"]
    elif to == registry.CANARY:
        share = share_text(registry.traffic_share(new))
        lines = [f"{name}: {before['state']} -> canary ({share} of users)",
                 f"  serves {share} of users, chosen by a hash of the user id; everyone else "
                 f"gets production ({production})",
                 f"  next: {cmd}   (to production)"]
    else:
        lines = [f"{name}: {before['state']} -> live ({new['reason']})",
                 f"{name} is live" + (f"; {', '.join(live_before)} retired"
                                      if live_before and before["state"] != registry.LIVE else "")]
    if before["state"] in (registry.SHADOW, registry.CANARY) and before.get("stability"):
        lines.insert(1, f"  judged in {before['state']}: {stability_text(before)}")
    if to != registry.LIVE or new.get("promoted"):
        lines.append(f"  the stability monitor rolls it back if it breaks its {new['tier']} SLO"
                     + ("" if to != registry.LIVE else " within its probation"))
    return new, "\n".join(lines)


def _register(bootstrap: str, records: list[dict], args) -> tuple[dict, str]:
    """A new version in state ``registered``, its weights from ``--checkpoint`` (a file
    :meth:`models.training.Trainer.save` wrote) or copied from ``--parent``; type,
    surface, tier and owner from the options, else the parent's."""
    import hashlib
    from pathlib import Path

    from models import registry
    from stores import model_store
    parent = None
    if args.parent:
        match = [r for r in records if r["model"] == args.model and r["version"] == args.parent]
        if not match:
            raise RuntimeError(f"unknown parent: no version {args.parent!r} of {args.model!r} "
                               f"in the registry")
        parent = match[0]
    fields = {f: getattr(args, f) or (parent or {}).get(f)
              for f in ("type", "surface", "tier", "owner")}
    missing = [f"--{f}" for f, v in fields.items() if not v]
    if missing:
        raise ValueError(f"register needs {', '.join(missing)}" + (
            "" if parent is None else f" (the parent {parent['version']} has none)"))
    registry.tier_of(fields["tier"])
    if args.checkpoint:
        from models.training import Trainer
        path = Path(args.checkpoint).resolve()
        data = path.read_bytes()
        try:
            trainer = Trainer.load(path)
        except Exception as exc:  # torch raises many kinds for a file that is not one
            raise ValueError(f"{path}: not a streamrec checkpoint ({exc})") from None
        blob = model_store.serving_bytes(trainer)
        lineage = {"source": "checkpoint", "checkpoint": str(path),
                   "sha256": hashlib.sha256(data).hexdigest(),
                   "examples_seen": trainer.examples_seen, "step": trainer.step}
        source = f"checkpoint {path.name}"
    else:
        blob = model_store.version_blobs(bootstrap, args.model, [parent["version"]])[
            parent["version"]]
        # The same weights: trained on exactly what the parent trained on.
        lineage = {**(parent.get("lineage") or {}), "copied_from": parent["version"]}
        source = f"a copy of {parent['version']}"
    version = args.version or (time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-r"
                               + hashlib.sha256(blob).hexdigest()[:7])
    record = registry.registration(args.model, version, parent=args.parent, lineage=lineage,
                                   source=source, **fields)
    new = model_store.register(bootstrap, record, blob)
    name = f"{args.model}@{version}"
    message = "\n".join([
        f"{args.model} {version}: registered ({fields['tier']}, {fields['type']} on "
        f"{fields['surface']}, owner {fields['owner']}) from {source}",
        f"  not served; next: streamrec launch evaluate {name}",
        f"  then: streamrec models promote --model {args.model} --version {version} --to shadow"])
    return new, message


def cmd_models(args) -> int:
    from models import registry
    from stores import model_store
    bootstrap = args.bootstrap or _settings().bootstrap
    if args.action == "register" and (not args.model or not (args.checkpoint or args.parent)):
        print("streamrec models register: needs --model and --checkpoint FILE or --parent "
              "VERSION (whose weights it copies)", file=sys.stderr)
        return 2
    records = list(model_store.read_registry(bootstrap).values())
    needs_version = ("promote", "retire")
    if args.action in needs_version and not args.version:
        print(f"streamrec models {args.action}: --version is required", file=sys.stderr)
        return 2
    if args.action == "list":
        chosen = registry.filter_records(records, model=args.model, tier=args.tier,
                                         state=args.state, surface=args.surface,
                                         type=args.type)
        print(json.dumps(chosen, indent=2) if args.json else registry.format_table(chosen))
        return 0
    if args.action == "show":
        if args.version:
            record = _one_version(records, args.model, args.version)
            print(json.dumps(record, indent=2) if args.json else registry.format_detail(record))
            return 0
        chosen = registry.filter_records(records, model=_one_model(records, args.model),
                                         tier=args.tier, state=args.state)
        print(json.dumps(chosen, indent=2) if args.json else registry.format_table(chosen))
        return 0
    if args.action == "rollback":
        gone, back = model_store.rollback(bootstrap, _one_model(records, args.model))
        result = {"rolled_back": gone, "live": back}
        message = (f"{gone['model']} {gone['version']} rolled back; serving {back['version']}, "
                   f"held: the trainer registers new versions until one is promoted")
    elif args.action == "promote":
        result, message = _promote(bootstrap, records, args)
    elif args.action == "register":
        result, message = _register(bootstrap, records, args)
    else:  # retire
        new = model_store.retire(bootstrap, _one_version(records, args.model, args.version))
        result, message = new, f"{new['model']} {new['version']} is retired"
    print(json.dumps(result, indent=2) if args.json else message)
    return 0


def cmd_launch(args) -> int:
    """``launch evaluate``: exit 0 pass, 1 fail, 2 a usage or data error (no broker, an
    unknown version, no recorded traffic, too few labels to judge)."""
    import os

    from models import evaluation
    from streams import evaluate
    try:
        model, version = evaluate.parse_candidate(args.candidate, args.model, args.version)
        since = evaluate.parse_since(args.since, time.time()) if args.since else None
        last = args.last if args.last is not None else (
            None if since is not None else evaluation.DEFAULT_LAST)
        min_examples = args.min_examples or int(os.environ.get(
            "STREAMREC_LAUNCH_MIN_EXAMPLES", evaluation.MIN_EXAMPLES))
        report = evaluate.evaluate(args.bootstrap or _settings().bootstrap, model, version,
                                   last=last or None, since=since, k=args.k,
                                   min_examples=min_examples, progress=not args.quiet)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as exc:
        print(f"streamrec launch evaluate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else evaluation.format_report(report))
    return evaluation.EXIT_STATUS[report["verdict"]["verdict"]]


def cmd_deadletters(args) -> int:
    from streams.deadletters import redrive
    print(json.dumps(redrive(args.bootstrap or _settings().bootstrap,
                             reason_contains=args.reason_contains, dry_run=args.dry_run)))
    return 0


def cmd_dashboard(args) -> int:
    from streams.dashboard_server import DEFAULT_PORT, serve
    s = _settings()
    serve(args.bootstrap or s.bootstrap, port=args.port or DEFAULT_PORT,
          bind=args.bind or s.web_bind, token=s.web_token if args.token is None else args.token)
    return 0


def cmd_demo(args) -> int:
    from streams.demo import run_demo
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamrec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run a local Apache Kafka broker (KRaft)")
    b.add_argument("action", choices=["start", "stop", "status", "logs"])
    b.add_argument("--wipe", action="store_true", help="start/stop with an empty data dir")
    b.add_argument("--sasl-ssl", action="store_true",
                   help="with start: serve SASL_SSL (TLS + SCRAM) instead of PLAINTEXT; the "
                        "clients' settings go to client.env beside the data dir")
    b.add_argument("-n", "--lines", type=int, default=50)
    b.set_defaults(func=cmd_broker)

    t = sub.add_parser("topics", help="create the catalogue's topics, or list them with "
                                       "who writes and who reads each")
    t.add_argument("action", choices=["create", "list"])
    t.add_argument("--json", action="store_true", help="with list: the map as JSON")
    t.add_argument("--bootstrap")
    t.set_defaults(func=cmd_topics)

    w = sub.add_parser("worker", help="run the Faust worker")
    w.add_argument("-l", "--loglevel", default="info")
    w.set_defaults(func=cmd_worker)

    pr = sub.add_parser("produce", help="send JSON lines (a file or stdin) as events")
    pr.add_argument("file", nargs="?", default="-")
    pr.add_argument("--bootstrap")
    pr.add_argument("--strict", action="store_true", help="stop at the first non-JSON line")
    pr.set_defaults(func=cmd_produce)

    r = sub.add_parser("replay", help="replay MovieLens-100k as time-ordered events")
    r.add_argument("--dataset", help="folder with u.data (default ../shared/datasets/movielens-100k)")
    r.add_argument("--limit", type=int, default=0, help="only the first N ratings in time order")
    r.add_argument("--speed", type=float, default=0.0,
                   help="pace by event time x SPEED; 0 = as fast as possible")
    r.add_argument("--time-scale", type=float, default=5000.0,
                   help="divide the dataset's time gaps by this (5000: 7 months -> ~1 hour)")
    r.add_argument("--no-impressions", action="store_true",
                   help="send only the rating's engagement, no impression before it")
    r.add_argument("--ignored", type=int, default=None,
                   help="impressions per rating of movies the user never rated, the negatives "
                        "MovieLens lacks (default models.movielens.IGNORED_PER_RATING; "
                        "0 with --no-impressions)")
    r.add_argument("--bootstrap")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=cmd_replay)

    rc = sub.add_parser("recommend", help="ask for recommendations and print the reply")
    rc.add_argument("--user", required=True)
    rc.add_argument("--surface", default="explore")
    rc.add_argument("-k", type=int, default=10)
    rc.add_argument("--timeout", type=float, default=2.0, help="seconds")
    rc.add_argument("--json", action="store_true")
    rc.add_argument("--bootstrap")
    rc.set_defaults(func=cmd_recommend)

    pg = sub.add_parser("pregen", help="batch job: pre-generated sources and item embeddings")
    pg.add_argument("--window-days", type=float, default=7.0)
    pg.add_argument("--dim", type=int, default=32, help="item embedding size")
    pg.add_argument("--bootstrap")
    pg.add_argument("-q", "--quiet", action="store_true")
    pg.set_defaults(func=cmd_pregen)

    cf = sub.add_parser("config", help="set a surface's funnel (sources, fetch, weights) live")
    cf.add_argument("--surface", required=True)
    group = cf.add_mutually_exclusive_group(required=True)
    group.add_argument("--file", help='JSON: {"sources": {"trending": {"weight": 1, "fetch": 300}}}')
    group.add_argument("--reset", action="store_true", help="back to the built-in default")
    cf.add_argument("--bootstrap")
    cf.set_defaults(func=cmd_config)

    tr = sub.add_parser("train", help="bootstrap: train initial weights from recorded examples")
    tr.add_argument("--epochs", type=int, default=2)
    tr.add_argument("--bootstrap")
    tr.add_argument("-q", "--quiet", action="store_true")
    tr.set_defaults(func=cmd_train)

    md = sub.add_parser("models", help="the model registry: list, show, register, promote, "
                                        "rollback, retire")
    md.add_argument("action", choices=["list", "show", "register", "promote", "rollback",
                                       "retire"],
                    help="list: versions as a table; show: a model's versions, or with "
                         "--version one version in full; register: a new version from "
                         "--checkpoint or a copy of --parent, not served; promote: make "
                         "--version live (clears "
                         "a rollback's hold), or with --to shadow|canary a launch step; "
                         "rollback: back to the version live before, held "
                         "until a promote; retire: take --version out of use")
    md.add_argument("--version", help="the version to show, promote or retire; register: "
                                      "its name (default: the time and a hash of the weights)")
    md.add_argument("--checkpoint", help="register: a checkpoint file (Trainer.save)")
    md.add_argument("--parent", help="register: the version it derives from; without "
                                     "--checkpoint its weights are copied")
    md.add_argument("--type", help="list: only this model type; register: the model type, "
                                   "e.g. explore_mtml (default: the parent's)")
    md.add_argument("--surface", help="list: only versions for this surface; register: the "
                                      "surface it ranks for (default: the parent's)")
    md.add_argument("--owner", help="register: who owns it (default: the parent's)")
    md.add_argument("--model", help="only this model (needed when the registry has several)")
    md.add_argument("--tier", help="only this tier (TIER0 most critical .. TIER4); register: "
                                   "its tier (default: the parent's)")
    md.add_argument("--state", help="only this state (registered, shadow, canary, live or "
                                    "production, retired, rolled_back)")
    md.add_argument("--to", help="promote: the step, shadow, canary or production (default)")
    md.add_argument("--share", type=float, help="promote --to canary: the share of users it "
                                                "serves, in (0, 1] (default 0.05)")
    md.add_argument("--force", action="store_true", help="promote: step out of shadow or "
                                                         "canary without passing its stability")
    md.add_argument("--json", action="store_true", help="records as JSON")
    md.add_argument("--bootstrap")
    md.set_defaults(func=cmd_models)

    la = sub.add_parser("launch", help="launch tooling: evaluate a candidate on recorded "
                                        "traffic beside production")
    la.add_argument("action", choices=["evaluate"],
                    help="evaluate: replay recorded labelled traffic against CANDIDATE and "
                         "the production version; NE, calibration, AUC, HitRate@10, cost and "
                         "a verdict against its tier's SLO (exit 0 pass, 1 fail, 2 error)")
    la.add_argument("candidate", nargs="?", help="MODEL@VERSION (or --model and --version)")
    la.add_argument("--model")
    la.add_argument("--version")
    la.add_argument("--last", type=int, help="the newest N labelled examples neither version "
                                             "trained on (default 5000; all with --since)")
    la.add_argument("--since", help="only examples since then: 30m, 2h, 1d, Unix seconds or "
                                    "a UTC time 2026-11-23T19:00:00")
    la.add_argument("-k", type=int, default=10, help="HitRate@K (default 10)")
    la.add_argument("--min-examples", type=int,
                    help="labels a head needs to be judged (default the launch's 200, "
                         "$STREAMREC_LAUNCH_MIN_EXAMPLES)")
    la.add_argument("--json", action="store_true", help="the report as JSON")
    la.add_argument("--bootstrap")
    la.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    la.set_defaults(func=cmd_launch)

    dl = sub.add_parser("deadletters", help="re-drive dead letters to their source topic "
                                             "(safe with the event-id dedupe)")
    dl.add_argument("action", choices=["redrive"])
    dl.add_argument("--reason-contains", default="", help="only records whose reason has this")
    dl.add_argument("--dry-run", action="store_true", help="count what would be re-driven")
    dl.add_argument("--bootstrap")
    dl.set_defaults(func=cmd_deadletters)

    db = sub.add_parser("dashboard", help="serve the whole cluster's dashboard from the figures "
                                           "workers publish (no worker needed)")
    db.add_argument("--port", type=int, help="web port (default 6060)")
    db.add_argument("--bind", help="address to listen on (default $STREAMREC_WEB_BIND or "
                                   "127.0.0.1); beyond loopback a token is required")
    db.add_argument("--token", help="every request must carry it (Authorization: Bearer, or "
                                    "?token=, which the page passes on); default "
                                    "$STREAMREC_WEB_TOKEN")
    db.add_argument("--bootstrap")
    db.set_defaults(func=cmd_dashboard)

    sub.add_parser("simulate", add_help=False,
                   help="closed-loop simulated users over the real request/reply topics "
                        "(streamrec simulate --help)")

    d = sub.add_parser("demo", help="broker + topics + worker + replay + sample recommendations")
    d.add_argument("--limit", type=int, default=0, help="ratings to replay (0 = all 100k)")
    d.add_argument("--users", default="1,42,500", help="users to show recommendations for")
    d.add_argument("--exit", action="store_true", help="stop everything at the end")
    d.add_argument("--dataset")
    d.add_argument("--simulate", type=float, default=0.0, metavar="SECONDS",
                   help="then run the closed-loop simulator this long (e.g. 60)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:
        # The simulator owns its options (streams/simulate.py).
        from streams.simulate import main as simulate
        return simulate(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ConnectionError, FileNotFoundError, RuntimeError, TimeoutError, ValueError) as exc:
        print(f"streamrec {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
