"""Registry writes are compare-and-set through the real broker: concurrent writers lose
no update, a write made from a stale copy is refused, and a rollback racing the
trainer's publish is never undone (stores/model_store.write_registry)."""
from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.integration


def base(model: str, version: str, state: str = "registered") -> dict:
    now = time.time()
    return {"model": model, "version": version, "tier": "TIER2", "owner": "cas-test",
            "state": state, "created": now, "history": [[now, state]]}


def test_concurrent_writers_lose_no_update(kafka):
    from stores import model_store
    key = "castest/v1"
    first = model_store.write_registry(kafka, lambda reg: [base("castest", "v1")])[0]
    assert first["rev"] == 1

    def bump(name: str):
        def change(registry):
            current = registry[key]
            return [{**current, "count": current.get("count", 0) + 1,
                     "touched": current.get("touched", []) + [name]}]
        return change

    errors: list = []

    def writer(name: str, n: int) -> None:
        try:
            for i in range(n):
                model_store.write_registry(kafka, bump(f"{name}{i}"))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(name, 6)) for name in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    record = model_store.read_registry(kafka)[key]
    # Every one of the 18 read-modify-writes landed on the one before it.
    assert record["count"] == 18 and record["rev"] == 19
    assert sorted(record["touched"]) == sorted(f"{n}{i}" for n in "abc" for i in range(6))


def test_a_stale_copy_is_refused_and_nothing_is_written(kafka):
    from models.registry import RegistryConflict
    from stores import model_store
    read = model_store.write_registry(kafka, lambda reg: [base("castest", "v2")])[0]
    model_store.set_state(kafka, read, "shadow", by="ann", reason="try it")
    with pytest.raises(RegistryConflict, match=r"castest v2 changed since it was read "
                                               r"\(revision 1, now 2: shadow, moved by ann\)"):
        model_store.set_state(kafka, read, "retired", by="bob")
    record = model_store.read_registry(kafka)["castest/v2"]
    assert (record["state"], record["rev"], record["moved_by"]) == ("shadow", 2, "ann")


def test_rollback_racing_the_trainers_publish_keeps_its_hold(kafka):
    """The trainer decides release() inside the same fenced write as its record, so a
    rollback committed just before is always seen: the candidate stays registered."""
    from models.mtml import RankerConfig
    from models.training import Trainer
    from models.two_tower import TowerConfig
    from stores import model_store
    small = dict(hash_size=2 ** 10, author_size=2 ** 6)
    blob = model_store.serving_bytes(Trainer(TowerConfig(**small), RankerConfig(**small)))
    model = "castrace"
    model_store.publish(kafka, model, "v1", blob, base(model, "v1", "live"))
    time.sleep(0.01)
    model_store.publish(kafka, model, "v2", blob, base(model, "v2", "live"))
    done = threading.Event()
    outcome: dict = {}

    def trainer() -> None:
        done.wait(10)
        outcome["v3"] = model_store.publish_candidate(kafka, model, "v3", blob,
                                                      base(model, "v3", "live"))

    t = threading.Thread(target=trainer)
    t.start()
    done.set()
    gone, back = model_store.rollback(kafka, model)
    t.join(60)
    registry = model_store.read_registry(kafka)
    states = {r["version"]: r["state"] for r in registry.values() if r["model"] == model}
    # Either order: the rollback first (v3 held, registered) or v3 first (then the
    # rollback returns to v2, the version live before v3).  Never two live, never a
    # live version without its hold after a rollback.
    live = [v for v, s in states.items() if s == "live"]
    assert len(live) == 1
    assert registry[f"{model}/{live[0]}"]["hold"]["rolled_back"] == gone["version"]
    if outcome["v3"]["state"] == "registered":
        assert states == {"v1": "live", "v2": "rolled_back", "v3": "registered"}
        assert outcome["v3"]["reason"].startswith("held by a rollback: rollback of v2")
    else:
        assert states == {"v1": "retired", "v2": "live", "v3": "rolled_back"}
    for r in registry.values():
        if r["model"] == model and r["state"] == "live":
            model_store.set_state(kafka, r, "retired", reason="test cleanup")
