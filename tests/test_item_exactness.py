"""Item-side counts stay exact when ingest's work is delivered again or fails mid-batch.

The ingest and item-stats agents run here on fake messages, with plain dicts for
their tables and lists for the topics they send to, so a crash can be staged at
every point between writing tables, sending bundles and committing offsets.
"""
from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from types import SimpleNamespace

import orjson
import pytest

import streams.app  # noqa: F401  (the agents register on the app first)
from faust.types import TP
from models.item_state import SourcedDeltas
from schemas.topics import EVENTS, partition_for
from streams import agent_errors, ingest, item_stats, labels
from streams.settings import settings

T0 = 1_700_000_000.0


class FakeTopic:
    def __init__(self):
        self.sent = []

    async def send(self, key=None, value=None, partition=None):
        self.sent.append(SimpleNamespace(key=key, value=value, partition=partition))


class World:
    """The two agents' state, and the Kafka between them, as plain Python."""

    def __init__(self, monkeypatch):
        self.user_history: dict = {}
        self.item_stats: dict = {}
        self.deltas = FakeTopic()
        self.reroutes = FakeTopic()
        self.dead: list = []
        self.end_offset = 0
        self.log: list = []  # the events topic: one raw message per offset, one partition
        mp = monkeypatch
        mp.setattr(ingest, "user_history", self.user_history)
        mp.setattr(ingest, "item_deltas_topic", self.deltas)
        mp.setattr(ingest, "events_topic", self.reroutes)
        mp.setattr(ingest, "use_event", lambda event: None)
        mp.setattr(ingest, "send_dead_letter", self._dead_letter)
        mp.setattr(ingest, "replay_below", {})
        mp.setattr(ingest, "end_offsets", self._end_offsets)
        mp.setattr(labels, "pending_for", lambda *a, **k: None)
        mp.setattr(item_stats, "item_stats", self.item_stats)
        mp.setattr(item_stats, "use_event", lambda event: None)
        mp.setattr(item_stats, "send_dead_letter", self._dead_letter)
        mp.setattr(agent_errors, "send_dead_letter", self._dead_letter)
        for name in ("trending_topic", "profiles_topic", "author_items_topic"):
            mp.setattr(item_stats, name, FakeTopic())
        for name in ("boards", "author_boards"):
            mp.setattr(item_stats, name, {})
        mp.setattr(item_stats, "_unseeded", set())
        self.partition = partition_for("u0", settings.partitions)

    def one_partition(self, monkeypatch):
        """Every user and item on the drill's partition."""
        for module in (ingest, item_stats):
            monkeypatch.setattr(module, "partition_for", lambda key, n: self.partition)

    async def _end_offsets(self, tps):
        return {tp: self.end_offset for tp in tps}

    async def _dead_letter(self, raw, reason, msg, index=None):
        self.dead.append((raw, reason, msg.offset, index))

    def produce(self, *events) -> list:
        """Append messages (an event dict, or a list of them) to the events partition."""
        for value in events:
            self.log.append(orjson.dumps(value))
        return list(range(len(self.log) - len(events), len(self.log)))

    def batch(self, offsets):
        tp = TP(EVENTS, self.partition)
        return [SimpleNamespace(value=self.log[o], message=SimpleNamespace(
            topic=EVENTS, partition=self.partition, offset=o, key=b"u", tp=tp)) for o in offsets]

    def ingest(self, offsets):
        asyncio.run(ingest.ingest_reliably(self.batch(offsets)))

    def restart(self):
        """A new worker process: nothing in memory, the tables as their changelogs hold them."""
        ingest.replay_below.clear()

    def apply_deltas(self, start=0):
        """The item-stats agent consumes ``item.deltas`` from ``start``."""
        batch = [SimpleNamespace(value=m.value, message=SimpleNamespace(
            topic="item.deltas", partition=m.partition, offset=i, key=m.key))
            for i, m in enumerate(self.deltas.sent[start:], start)]
        asyncio.run(item_stats.apply_batch(batch))
        return len(self.deltas.sent)

    def counts(self) -> Counter:
        return Counter({item: s.get("q", {}).get("pos", 0) for item, s in self.item_stats.items()})


def like(user, item, n):
    return {"event_id": f"{user}-{item}-{n}-{uuid.uuid4().hex[:6]}", "user_id": user,
            "item_id": item, "event_type": "like", "surface": "explore", "ts": T0 + n}


@pytest.fixture
def world(monkeypatch):
    return World(monkeypatch)


def truth(events) -> Counter:
    return Counter(e["item_id"] for e in events)


# One user keeps every event on one partition, so offsets order the whole drill.
EVENTS_10 = [like("u0", f"i{n % 3}", n) for n in range(10)]


def test_a_redelivered_batch_with_other_bounds_counts_once(world):
    offsets = world.produce(*EVENTS_10)
    world.ingest(offsets[:6])          # folded: nothing existed before this process
    world.apply_deltas()
    # Killed before committing: another process gets all ten in one batch.
    world.restart()
    world.end_offset = 10
    world.ingest(offsets)
    world.apply_deltas(start=0)        # the item side is redelivered everything too
    assert world.counts() == truth(EVENTS_10)


def test_history_written_but_bundles_lost_are_sent_again(world):
    offsets = world.produce(*EVENTS_10)
    world.ingest(offsets[:6])
    world.deltas.sent.clear()          # killed before the bundles left the producer
    world.restart()
    world.end_offset = 10
    world.ingest(offsets)
    world.apply_deltas()
    assert world.counts() == truth(EVENTS_10)
    history = world.user_history["u0"]
    assert history["n"] == 10 and len(history["id_at"]) == 10


def test_bundles_sent_but_history_lost_are_skipped_by_the_item_side(world):
    offsets = world.produce(*EVENTS_10)
    world.ingest(offsets[:6])
    world.apply_deltas()
    world.user_history.clear()         # the changelog write never landed
    world.restart()
    world.end_offset = 10
    world.ingest(offsets[2:])          # committed offset 2
    sent = world.apply_deltas(start=0)
    assert world.counts() == truth(EVENTS_10[2:]) + truth(EVENTS_10[:2])
    assert sent > 0


def test_a_real_duplicate_at_a_new_offset_is_dropped_after_a_restart(world):
    offsets = world.produce(*EVENTS_10)
    world.ingest(offsets)
    world.apply_deltas()
    again = world.produce(EVENTS_10[3])  # the producer sent it twice
    world.restart()
    world.end_offset = len(world.log)
    world.ingest(again)
    world.apply_deltas(start=0)
    assert world.counts() == truth(EVENTS_10)


def test_a_batch_that_fails_mid_way_loses_and_doubles_nothing(world, monkeypatch):
    """A bug hit by one event after other users' histories were planned: before, the whole
    batch was dead-lettered after some tables were written, and its re-drive was then
    dropped as duplicates, so the good events' item counts never arrived."""
    good = [like(f"u{k}", f"i{k}", k) for k in range(6)]
    poison = like("u9", "poison", 9)
    for ev in good + [poison]:
        ev["user_id"] = "u0" if ev is not poison else "u0x"
    # All on the one partition of the drill (its users are keyed there by this test).
    world.one_partition(monkeypatch)
    offsets = world.produce(*good[:3], poison, *good[3:])
    real_add = SourcedDeltas.add

    def add(self, source, pos, history, ev, half_life, **kw):
        if ev.item_id == "poison":
            raise KeyError("a bug the validator did not catch")
        return real_add(self, source, pos, history, ev, half_life, **kw)

    monkeypatch.setattr(SourcedDeltas, "add", add)
    world.ingest(offsets)
    world.apply_deltas()
    assert world.counts() == truth(good)
    assert [(offset, "ingest failed" in reason) for _, reason, offset, _ in world.dead] == [(3, True)]
    assert "u0x" not in world.user_history  # parked unapplied
    # The bug is fixed and the dead letter re-driven: a new message, counted once.
    monkeypatch.setattr(SourcedDeltas, "add", real_add)
    redriven = world.produce(orjson.loads(world.dead[0][0]))
    world.ingest(redriven)
    world.apply_deltas(start=0)
    assert world.counts() == truth(good + [poison])


def test_an_item_batch_that_fails_parks_only_the_bundle_that_fails_alone(world, monkeypatch):
    """Before the guard, item_stats dropped the whole failed batch: every item in it
    lost its counts.  Now the other bundles apply, the failing one is parked, and its
    re-drive after the fix counts once."""

    class BuggyTable(dict):
        bug = True

        def get(self, key, default=None):
            if self.bug and key == "poison":
                raise KeyError("a bug")
            return super().get(key, default)

    world.item_stats = BuggyTable()
    monkeypatch.setattr(item_stats, "item_stats", world.item_stats)
    # Users of their own (no co-engagement pairs naming the poison), all on the drill's
    # partition; one bundle each.
    world.one_partition(monkeypatch)
    events = [like(f"u{n}", f"i{n}", n) for n in range(3)] + [like("u3", "poison", 3)]
    for ev in events:
        world.ingest(world.produce(ev))
    batch = [SimpleNamespace(value=m.value, message=SimpleNamespace(
        topic="item.deltas", partition=m.partition, offset=i, key=m.key))
        for i, m in enumerate(world.deltas.sent)]
    (poisoned,) = [e.message.offset for e in batch if b"poison" in e.value]
    asyncio.run(agent_errors.guarded("item_stats", item_stats.apply_batch, batch,
                                     agent_errors.Policy.ONE_BY_ONE))
    assert world.counts() == truth(events[:3])
    assert [(offset, reason) for _, reason, offset, _ in world.dead] == [
        (poisoned, "item_stats failed: KeyError('a bug')")]
    world.item_stats.bug = False
    asyncio.run(item_stats.apply_batch([batch[poisoned]]))  # the re-drive, bug fixed
    asyncio.run(item_stats.apply_batch(batch))              # and the whole batch again
    assert world.counts() == truth(events)


def test_a_bundle_on_another_partition_is_sent_to_its_items_partition(world, monkeypatch):
    """A re-driven dead letter lands where its key hashes: applied there, its items
    would get a second record on a partition that does not own them."""
    monkeypatch.setattr(item_stats, "item_deltas_topic", world.deltas)
    offsets = world.produce(*EVENTS_10)
    world.ingest(offsets)
    bundles = list(world.deltas.sent)
    elsewhere = min(set(range(settings.partitions)) - {m.partition for m in bundles})
    world.deltas.sent[:] = [SimpleNamespace(value=m.value, key=m.key, partition=elsewhere)
                            for m in bundles]
    world.apply_deltas()
    assert world.counts() == Counter()                  # nothing applied on the wrong one
    assert [m.partition for m in world.deltas.sent[len(bundles):]] == [
        m.partition for m in bundles]
    world.apply_deltas(start=len(bundles))
    world.apply_deltas(start=len(bundles))              # delivered twice: counted once
    assert world.counts() == truth(EVENTS_10)


def test_a_failed_publish_keeps_what_it_did_not_send_marked(world, monkeypatch):
    for name in ("_dirty", "_dirty_authors"):
        monkeypatch.setattr(item_stats, name, set())
    monkeypatch.setattr(item_stats, "_dirty_profiles", {})
    world.ingest(world.produce(like("u0", "i1", 1)))
    world.apply_deltas()
    marked = (set(item_stats._dirty_profiles), set(item_stats._dirty))
    assert marked[0] == {"i1"} and marked[1]

    async def away(**kw):
        raise ConnectionError("broker away")

    monkeypatch.setattr(item_stats.profiles_topic, "send", away)
    with pytest.raises(ConnectionError):
        asyncio.run(item_stats.publish_snapshots(T0 + 2))
    assert (set(item_stats._dirty_profiles), set(item_stats._dirty)) == marked


def test_a_send_that_fails_is_retried_and_counted_once(world, monkeypatch):
    offsets = world.produce(*EVENTS_10)
    real_send, calls = world.deltas.send, []

    async def flaky(**kw):
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("broker away")
        await real_send(**kw)

    monkeypatch.setattr(world.deltas, "send", flaky)
    monkeypatch.setattr(ingest, "SEND_RETRY_S", (0.0,))
    world.ingest(offsets[:5])
    world.ingest(offsets[5:])
    world.apply_deltas()
    assert world.counts() == truth(EVENTS_10)
    assert len(calls) > 2


def test_bundles_stay_small_when_a_backlog_goes_one_event_per_part(world):
    events = [like(f"u{n}", f"i{n % 50}", n) for n in range(3000)]
    for ev in events:
        ev["user_id"] = "u0"
    offsets = world.produce(*events)
    world.end_offset = len(offsets)    # all of it may have been seen before: one per part
    world.ingest(offsets)
    assert max(len(m.value) for m in world.deltas.sent) < 300 * 1024
    world.apply_deltas()
    assert world.counts() == truth(events)


# --------------------------------------------------------------------------- trending re-seed

def test_a_restarted_board_never_publishes_over_the_snapshot_before_the_view_caught_up(
        world, monkeypatch):
    """After a restart the board is made before the shared view has read the last snapshot:
    published as it is, its one new item would overwrite the snapshot's three."""
    from stores.shared_view import SharedItemView
    from schemas.topics import TRENDING_SNAPSHOTS
    view = SharedItemView("unused:0")
    monkeypatch.setattr(item_stats, "view", view)
    monkeypatch.setattr(item_stats, "_dirty", set())
    offsets = world.produce(like("u0", "new", 1))
    world.ingest(offsets)
    world.apply_deltas()
    asyncio.run(item_stats.publish_snapshots(T0 + 2))
    assert item_stats.trending_topic.sent == []  # not while the view is behind
    key = next(iter(item_stats.boards))
    name = f"{key[0]}/{key[1]}"
    view.apply(TRENDING_SNAPSHOTS, name.encode(), orjson.dumps(
        {"ts": T0, "items": [["old1", 3.0, None], ["old2", 2.0, None], ["new", 0.5, None]]}))
    view._caught_up.set()
    asyncio.run(item_stats.publish_snapshots(T0 + 2))
    published = orjson.loads(item_stats.trending_topic.sent[-1].value)
    assert {i for i, _, _ in published["items"]} == {"old1", "old2", "new"}
    # "new" keeps its score from its own stats, not the snapshot's older one.
    assert dict((i, s) for i, s, _ in published["items"])["new"] > 0.5


def test_hostile_input_is_parked_bounded_and_the_good_events_in_it_count(world, monkeypatch):
    """A >1 MB message and an array with thousands of bad elements among good ones:
    the agent keeps going, each refusal is one small record, the good events count."""
    from streams import deadletters
    dlq = FakeTopic()
    monkeypatch.setattr(deadletters, "_dlq_topic", dlq)
    monkeypatch.setattr(ingest, "send_dead_letter", deadletters.send_dead_letter)
    good = [like("u0", "i1", n) for n in range(3)]
    mixed = good[:2] + [{"event_id": f"bad{n}", "event_type": "nope"} for n in range(3000)]
    huge = b'{"event_id": "' + b"x" * 1_100_000 + b'"}'
    world.log.append(huge)
    offsets = [0, *world.produce(mixed, good[2])]
    world.ingest(offsets)
    world.apply_deltas()
    assert world.counts() == truth(good)
    records = [orjson.loads(m.value) for m in dlq.sent]
    assert len(records) == 3001 and max(len(m.value) for m in dlq.sent) < 8192
    assert records[0]["id"].startswith(f"events/{world.partition}/0") and not records[0]["complete"]
