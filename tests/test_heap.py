"""streams/heap.py: what the worker keeps is taken out of full collections' walk."""
import gc
import weakref

from streams.heap import freeze


def test_freeze_takes_kept_objects_out_of_the_collected_generations():
    kept = [[n] for n in range(100)]
    try:
        assert any(o is kept for o in gc.get_objects())
        assert freeze() >= len(kept)
        # Frozen: no generation holds it, so a full collection does not walk it ...
        assert not any(o is kept for o in gc.get_objects())
        assert kept[5] == [5]
        # ... and what is made afterwards is collected as usual until the next freeze.
        later = [[1]]
        assert any(o is later for o in gc.get_objects())
    finally:
        gc.unfreeze()


def test_cyclic_garbage_made_before_a_freeze_is_collected_not_frozen():
    class Node:
        pass

    gc.disable()      # no automatic collection between the two checks
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b          # a cycle: reference counting alone never frees it
    try:
        assert gone() is not None
        freeze()
        assert gone() is None
    finally:
        gc.unfreeze()
        gc.enable()
