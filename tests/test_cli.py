"""The command line's wiring, without a broker: what each command passes on."""
from __future__ import annotations

import json

import pytest

from streams import broker
from streams.cli import build_parser, main
from streams.kafka_config import BrokerRefused


def fake_info(port=29892, client_env=None) -> broker.BrokerInfo:
    return broker.BrokerInfo(pid=1, port=port, bootstrap=f"127.0.0.1:{port}", version="4.3.1",
                             data_dir="/tmp/d", log_file="/tmp/l", client_env=client_env)


@pytest.mark.parametrize("argv, sasl_ssl", [(["broker", "start"], False),
                                            (["broker", "start", "--sasl-ssl"], True),
                                            (["broker", "start", "--sasl-ssl", "--wipe"], True)])
def test_broker_start_passes_sasl_ssl_on(monkeypatch, capsys, argv, sasl_ssl):
    calls = []
    monkeypatch.setattr(broker, "start", lambda **kw: calls.append(kw) or fake_info())
    assert main(argv) == 0
    assert calls == [{"wipe": "--wipe" in argv, "sasl_ssl": sasl_ssl}]
    assert json.loads(capsys.readouterr().out)["bootstrap"] == "127.0.0.1:29892"


def test_broker_start_with_sasl_ssl_names_client_env_and_never_prints_the_password(
        monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("STREAMREC_HOME", str(tmp_path))
    env = {"STREAMREC_SASL_USERNAME": "streamrec", "STREAMREC_SASL_PASSWORD": "hunter2-secret"}
    monkeypatch.setattr(broker, "start", lambda **kw: fake_info(client_env=env))
    assert main(["broker", "start", "--sasl-ssl"]) == 0
    out, err = capsys.readouterr()
    assert "hunter2-secret" not in out + err
    assert json.loads(out)["client_env"] == str(tmp_path / "broker-29892" / "client.env")
    assert "client.env" in err


def test_broker_refusal_to_start_is_a_clear_error(monkeypatch, capsys):
    def refuse(**kw):
        raise broker.BrokerError("the broker on port 9092 runs PLAINTEXT, not SASL_SSL")
    monkeypatch.setattr(broker, "start", refuse)
    assert main(["broker", "start", "--sasl-ssl"]) == 1
    assert "streamrec broker: the broker on port 9092 runs PLAINTEXT" in capsys.readouterr().err


def test_worker_checks_the_broker_before_anything_else(monkeypatch, capsys):
    """A refused password stops `streamrec worker` with check_broker's message, before the
    cluster-id lookup (15 s of librdkafka retries) and before Faust starts."""
    import confluent_kafka.admin

    from streams import producer
    checked = []

    def refuse(bootstrap, timeout=5.0):
        checked.append(bootstrap)
        raise BrokerRefused(f"the broker at {bootstrap} refused the SASL credentials")

    def no_admin(*a, **kw):
        raise AssertionError("AdminClient built before the broker was checked")
    import dataclasses

    import streams.settings
    monkeypatch.setattr(streams.settings, "settings", dataclasses.replace(
        streams.settings.settings, bootstrap="127.0.0.1:29892"))
    monkeypatch.setattr(producer, "check_broker", refuse)
    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", no_admin)
    assert main(["worker"]) == 1
    assert checked == ["127.0.0.1:29892"]
    assert ("streamrec worker: the broker at 127.0.0.1:29892 refused the SASL credentials"
            in capsys.readouterr().err)


def test_worker_with_no_broker_says_so(monkeypatch, capsys):
    from streams import producer
    monkeypatch.setattr(producer, "check_broker", lambda b, timeout=5.0: (_ for _ in ()).throw(
        ConnectionError(f"no Kafka broker answers at {b}")))
    assert main(["worker"]) == 1
    assert "streamrec worker: no Kafka broker answers at" in capsys.readouterr().err


def test_the_parser_knows_the_new_options():
    args = build_parser().parse_args(["broker", "start", "--sasl-ssl"])
    assert args.sasl_ssl is True and args.action == "start"
    assert build_parser().parse_args(["broker", "status"]).sasl_ssl is False


def _registry_records() -> dict:
    def rec(model, version, state, surface=None, type=None, t=0.0):
        return {"model": model, "version": version, "state": state, "tier": "TIER2",
                "owner": "o", "created": t, "history": [[t, state]],
                **({"surface": surface} if surface else {}), **({"type": type} if type else {})}
    records = [rec("ranker", "p1", "live"),
               rec("reels_ranker", "r1", "live", "reels", "reels_mtml", 1.0),
               rec("reels_ranker", "r2", "registered", "reels", "reels_two_tower", 2.0),
               rec("explore_x", "e1", "registered", "explore", "explore_mtml", 3.0)]
    return {f"{r['model']}/{r['version']}": r for r in records}


def test_models_list_filters_by_surface_and_type_and_shows_both(monkeypatch, capsys):
    from stores import model_store
    monkeypatch.setattr(model_store, "read_registry", lambda bootstrap: _registry_records())
    assert main(["models", "list", "--surface", "reels", "--bootstrap", "x:1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:6] == ["MODEL", "VERSION", "STATE", "TIER", "SURFACE", "TYPE"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[1], r[4], r[5]) for r in rows] == [("r1", "reels", "reels_mtml"),
                                                  ("r2", "reels", "reels_two_tower")]
    assert main(["models", "list", "--type", "reels_mtml", "--json", "--bootstrap", "x:1"]) == 0
    assert [r["version"] for r in json.loads(capsys.readouterr().out)] == ["r1"]
    assert main(["models", "list", "--surface", "reels", "--state", "registered",
                 "--bootstrap", "x:1"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]] == ["r2"]
    # A version with no surface or type shows "-" in both columns.
    assert main(["models", "list", "--model", "ranker", "--bootstrap", "x:1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[4:6] == ["-", "-"]
    assert main(["models", "list", "--surface", "clips", "--bootstrap", "x:1"]) == 0
    assert capsys.readouterr().out.strip() == "no versions match"
