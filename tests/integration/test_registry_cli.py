"""The registry through the real broker: a rollback holds against the trainer's gate
until an operator promotes, tiers that need approval wait, and ``streamrec models``
lists, shows, promotes, rolls back and retires.

The trainer publishes through :func:`stores.model_store.publish_candidate` with the
gate's record; these tests call it with records shaped like the trainer's, on
models of their own (small real weights, so a worker sharing the broker can load
them), and leave none of them live.
"""
from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def weights() -> bytes:
    from models.mtml import RankerConfig
    from models.training import Trainer
    from models.two_tower import TowerConfig
    from stores import model_store
    small = dict(hash_size=2 ** 10, author_size=2 ** 6)
    return model_store.serving_bytes(Trainer(TowerConfig(**small), RankerConfig(**small)))


@pytest.fixture(scope="module")
def kafka_clean(kafka):
    """Later tests check the cold-start path: leave none of these models live."""
    yield kafka
    from stores import model_store
    for record in model_store.read_registry(kafka).values():
        if record["model"].startswith("regtest") and record["state"] == "live":
            model_store.set_state(kafka, record, "retired", reason="test cleanup")


def gate_record(model: str, version: str, *, go_live: bool, tier: str = "TIER2",
                parent=None) -> dict:
    """A record as the online trainer writes it (streams.trainer.version_record)."""
    now = time.time()
    state = "live" if go_live else "registered"
    return {"model": model, "version": version, "parent": parent, "tier": tier,
            "owner": "streamrec-online-trainer", "state": state, "created": now,
            "lineage": {"source_topic": "training.examples", "examples_seen": 1000},
            "metrics": {"loss": 0.3},
            "decision": {"go_live": go_live, "decided": True, "evidence": {},
                         "reason": f"weighted NE 0.5 beats {parent} (0.6)" if go_live
                         else "weighted NE 0.7 does not beat the live version"},
            "history": [[now, state]]}


def cli(capsys, kafka, *argv) -> tuple[int, str, str]:
    from streams.cli import main
    code = main(["models", *argv, "--bootstrap", kafka])
    out, err = capsys.readouterr()
    return code, out, err


def states(kafka, model: str) -> dict[str, str]:
    from stores import model_store
    return {r["version"]: r["state"] for r in model_store.read_registry(kafka).values()
            if r["model"] == model}


def test_rollback_holds_against_a_better_version_until_a_promote(kafka_clean, weights, capsys):
    from stores import model_store
    kafka, model = kafka_clean, "regtest"
    first = gate_record(model, "v1", go_live=True)
    model_store.publish(kafka, model, "v1", weights, first)
    second = model_store.publish_candidate(kafka, model, "v2", weights,
                                           gate_record(model, "v2", go_live=True, parent="v1"))
    assert second["state"] == "live"
    assert states(kafka, model) == {"v1": "retired", "v2": "live"}

    code, out, err = cli(capsys, kafka, "rollback", "--model", model)
    assert code == 0, err
    assert "regtest v2 rolled back; serving v1" in out and "held" in out
    registry = model_store.read_registry(kafka)
    assert states(kafka, model) == {"v1": "live", "v2": "rolled_back"}
    assert registry[f"{model}/v1"]["hold"]["rolled_back"] == "v2"

    # The trainer's gate finds a better version: it is published, but not live.
    third = model_store.publish_candidate(kafka, model, "v3", weights,
                                          gate_record(model, "v3", go_live=True, parent="v1"))
    assert third["state"] == "registered"
    assert third["reason"].startswith("held by a rollback: rollback of v2")
    assert third["decision"]["go_live"]
    assert states(kafka, model) == {"v1": "live", "v2": "rolled_back", "v3": "registered"}
    live = model_store.live_records(model_store.read_registry(kafka), model)
    assert [r["version"] for r in live] == ["v1"]
    assert "v3" in dict(model_store.published_versions(kafka, model))  # kept to promote

    code, out, _ = cli(capsys, kafka, "list", "--model", model, "--state", "registered",
                       "--json")
    assert code == 0
    listed = json.loads(out)
    assert [r["version"] for r in listed] == ["v3"] and "held by a rollback" in listed[0]["reason"]

    code, out, _ = cli(capsys, kafka, "list", "--model", model)
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines()[1:]}
    assert set(rows) == {"v1", "v2", "v3"}
    assert "rollback of v2 holds it until a promote" in rows["v1"]
    assert "rolled back to v1 by operator" in rows["v2"]

    code, out, _ = cli(capsys, kafka, "show", "--model", model, "--version", "v1")
    assert code == 0
    assert out.startswith("regtest v1: live (TIER2)")
    assert "the gate cannot make a newer version live" in out
    assert "live  by operator: rollback of v2 by operator" in out

    # An operator promotes the held-back version: the hold is gone, the gate decides again.
    code, out, err = cli(capsys, kafka, "promote", "--model", model, "--version", "v3")
    assert code == 0, err
    assert "regtest v3 is live" in out
    registry = model_store.read_registry(kafka)
    assert states(kafka, model) == {"v1": "retired", "v2": "rolled_back", "v3": "live"}
    assert not any(r.get("hold") for r in registry.values() if r["model"] == model)
    assert registry[f"{model}/v3"]["promoted"]

    fourth = model_store.publish_candidate(kafka, model, "v4", weights,
                                           gate_record(model, "v4", go_live=True, parent="v3"))
    assert fourth["state"] == "live" and "reason" not in fourth
    assert states(kafka, model)["v4"] == "live" and states(kafka, model)["v3"] == "retired"


def test_approval_tiers_retire_and_clear_errors(kafka_clean, weights, capsys):
    from models.registry import TransitionError
    from stores import model_store
    kafka, model = kafka_clean, "regtest-tier1"
    # An operator's bootstrap goes live whatever the tier.
    model_store.publish(kafka, model, "v1", weights, gate_record(model, "v1", go_live=True,
                                                                 tier="TIER1"))
    waiting = model_store.publish_candidate(
        kafka, model, "v2", weights, gate_record(model, "v2", go_live=True, tier="TIER1",
                                                 parent="v1"))
    assert waiting["state"] == "registered" and waiting["reason"] == "awaiting approval (TIER1)"
    assert waiting["history"][-1][1] == "registered"
    assert states(kafka, model) == {"v1": "live", "v2": "registered"}

    code, out, _ = cli(capsys, kafka, "list", "--tier", "TIER1", "--json")
    assert code == 0
    assert {r["version"] for r in json.loads(out) if r["model"] == model} == {"v1", "v2"}
    code, out, _ = cli(capsys, kafka, "show", "--model", model, "--version", "v2")
    assert "approval needed to go live" in out and "awaiting approval (TIER1)" in out

    code, out, err = cli(capsys, kafka, "promote", "--model", model, "--version", "v2")
    assert code == 0, err
    assert states(kafka, model) == {"v1": "retired", "v2": "live"}

    # Retire: a registered version goes; the live one is refused with the way out.
    model_store.publish_candidate(kafka, model, "v3", weights,
                                  gate_record(model, "v3", go_live=False, parent="v2"))
    code, out, err = cli(capsys, kafka, "retire", "--model", model, "--version", "v3")
    assert code == 0, err
    assert "regtest-tier1 v3 is retired" in out
    code, _, err = cli(capsys, kafka, "retire", "--model", model, "--version", "v2")
    assert code == 1 and "v2 is live: promote another version or roll back" in err
    assert states(kafka, model) == {"v1": "retired", "v2": "live", "v3": "retired"}

    # Clear errors, non-zero exit codes, nothing written.
    code, _, err = cli(capsys, kafka, "promote", "--model", model, "--version", "v9")
    assert code == 1 and "no version 'v9' of 'regtest-tier1' in the registry" in err
    code, _, err = cli(capsys, kafka, "promote", "--model", model)
    assert code == 2 and "--version is required" in err
    code, _, err = cli(capsys, kafka, "list", "--tier", "TIER9")
    assert code == 1 and "unknown tier 'TIER9'" in err
    code, _, err = cli(capsys, kafka, "rollback")
    assert code == 1 and "name the model with --model" in err
    retired = model_store.read_registry(kafka)[f"{model}/v3"]
    with pytest.raises(TransitionError, match="cannot go from retired to rolled_back"):
        model_store.set_state(kafka, retired, "rolled_back")
    with pytest.raises(ValueError, match="unknown tier 'TIER7'"):
        model_store.publish(kafka, model, "v4", weights,
                            gate_record(model, "v4", go_live=False, tier="TIER7"))
    assert "v4" not in states(kafka, model)
    assert "v4" not in dict(model_store.published_versions(kafka, model))
