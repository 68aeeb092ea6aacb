"""Approximate nearest-neighbour index over item embeddings (hnswlib).

Items are named by string ids; hnswlib names points by integer labels.  Each
new id takes the next label from a counter (no hashing, so no collisions) and
keeps it for ever: re-embedding an item replaces its vector under the same
label, deleting it only marks the label deleted (its slot is reclaimed by a
rebuild, not reused).

Scores are similarities, higher is nearer: the inner product for ``"ip"``,
the cosine for ``"cosine"`` and minus the *squared* L2 distance for ``"l2"``.

The index is a cache, never the only copy of anything: every worker builds it
from the item embeddings (a pre-generated batch, or the live item tower) when
they arrive, so nothing is saved.  It is locked (:class:`RWLock`) because the
shared view's thread upserts the live tower index in place while serving
queries it on the event loop (``stores/shared_view.py``).

>>> import numpy as np
>>> index = AnnIndex(dim=2)
>>> index.upsert(["a", "b", "c"], np.array([[1, 0], [0, 1], [0.7, 0.7]], dtype=np.float32))
>>> [item for item, _ in index.query(np.array([1, 0.1], dtype=np.float32), k=2)]
['a', 'c']
>>> index.delete("a")
>>> [item for item, _ in index.query_item("c", k=5)]
['b']
>>> len(index), "a" in index
(2, False)
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Collection, Iterator, Optional, Sequence

import hnswlib
import numpy as np

SPACES = ("ip", "cosine", "l2")

# hnswlib >= 0.7 takes a per-query ``filter`` callable; older builds do not.
HAS_FILTER = "filter" in (hnswlib.Index.knn_query.__doc__ or "")


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class AnnConfig:
    """What an :class:`AnnIndex` is built with.

    >>> AnnConfig(32, ef=128)
    AnnConfig(dim=32, space='ip', M=16, ef_construction=200, ef=128, max_elements=1024)
    """

    dim: int
    space: str = "ip"
    M: int = 16
    ef_construction: int = 200
    #: search breadth at query time (hnswlib uses max(ef, k))
    ef: int = 64
    #: initial capacity; the index doubles it as the catalogue grows
    max_elements: int = 1024

    def __post_init__(self):
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {self.space!r}")
        for name in ("dim", "M", "ef_construction", "ef", "max_elements"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------
# readers-writer lock
# --------------------------------------------------------------------------

class RWLock:
    """Many readers at once, or one writer alone.

    A waiting writer holds back readers that arrive after it, so a steady
    stream of queries cannot starve upserts.  Not reentrant.

    >>> lock = RWLock()
    >>> with lock.read():
    ...     with lock.read():
    ...         pass
    >>> with lock.write():
    ...     pass
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# --------------------------------------------------------------------------
# the index
# --------------------------------------------------------------------------

class AnnIndex:
    """String-keyed hnswlib index with upsert, delete and exclusions.

    Safe to query from many threads while another upserts or deletes.
    ``upsert(..., num_threads=n)`` builds with n hnswlib threads; queries
    are one vector each and use one thread.

    >>> import numpy as np
    >>> index = AnnIndex(dim=3, space="cosine", max_elements=2)
    >>> rng = np.random.default_rng(0)
    >>> index.upsert([f"item{i}" for i in range(10)], rng.normal(size=(10, 3)))
    >>> len(index), index.capacity        # grew 2 -> 4 -> 8 -> 16
    (10, 16)
    >>> best, score = index.query_item("item3", k=1)[0]
    >>> best != "item3" and -1.0 <= score <= 1.0
    True
    """

    def __init__(self, dim: int, *, space: str = "ip", max_elements: int = 1024, M: int = 16,
                 ef_construction: int = 200, ef: int = 64):
        config = AnnConfig(dim=dim, space=space, M=M, ef_construction=ef_construction, ef=ef,
                           max_elements=max_elements)
        index = hnswlib.Index(space=space, dim=dim)
        index.init_index(max_elements=max_elements, M=M, ef_construction=ef_construction)
        index.set_ef(ef)
        index.set_num_threads(1)
        self.config = config
        self._index = index
        self._labels: dict[str, int] = {}   # item id -> label
        self._ids: dict[int, str] = {}      # label -> item id
        self._deleted: set[int] = set()     # labels marked deleted
        self._next_label = 0
        # hnswlib lets add_items and knn_query run concurrently, but resize_index
        # reallocates the vectors and graph under running searches (use after
        # free), and our id maps are plain dicts: so writers go alone.
        self._lock = RWLock()

    # -- inspection ------------------------------------------------------
    def __len__(self) -> int:
        """Live items (deleted ones do not count)."""
        # No lock: _search calls this while holding the (non-reentrant) read
        # lock; from outside it is a snapshot that may lag a concurrent write.
        return len(self._labels) - len(self._deleted)

    def __contains__(self, item_id: object) -> bool:
        label = self._labels.get(item_id)  # type: ignore[arg-type]
        return label is not None and label not in self._deleted

    def ids(self) -> list[str]:
        """Live item ids, oldest first."""
        with self._lock.read():
            return [item for item, label in self._labels.items() if label not in self._deleted]

    def label(self, item_id: str) -> int:
        """The hnswlib label of an item (also of a deleted one); KeyError if never seen."""
        try:
            return self._labels[item_id]
        except KeyError:
            raise KeyError(f"unknown item id {item_id!r}: not in the ANN index") from None

    @property
    def capacity(self) -> int:
        return self._index.get_max_elements()

    def vector(self, item_id: str) -> Optional[np.ndarray]:
        """The stored vector (unit-normalised for ``"cosine"``), or None if absent or deleted."""
        with self._lock.read():
            label = self._labels.get(item_id)
            if label is None or label in self._deleted:
                return None
            return np.asarray(self._index.get_items([label]), dtype=np.float32)[0]

    def set_ef(self, ef: int) -> None:
        """Change the query-time search breadth (recall against speed)."""
        if isinstance(ef, bool) or not isinstance(ef, int) or ef <= 0:
            raise ValueError(f"ef must be a positive int, got {ef!r}")
        with self._lock.write():
            self._index.set_ef(ef)
            self.config = AnnConfig(**{**asdict(self.config), "ef": ef})

    # -- writes ----------------------------------------------------------
    def upsert(self, item_ids: Sequence[str], vectors: np.ndarray, *, num_threads: int = 1) -> None:
        """Add new items and replace the vectors of known ones (deleted ones come back)."""
        ids = list(item_ids)
        for item in ids:
            if not isinstance(item, str):
                raise ValueError(f"item ids must be str, got {item!r}")
        if len(set(ids)) != len(ids):
            raise ValueError("item ids repeat within one upsert; send each item once")
        data = self._check_vectors(vectors, ids)
        if not ids:
            return
        with self._lock.write():
            labels, new, next_label = [], {}, self._next_label
            for item in ids:
                label = self._labels.get(item)
                if label is None:
                    label, next_label = next_label, next_label + 1
                    new[item] = label
                labels.append(label)
            try:
                self._reserve(next_label)
                # 0.8.0 unmarks on update by itself; do it explicitly so the
                # behaviour does not hang on that detail.
                for label in labels:
                    if label in self._deleted:
                        self._index.unmark_deleted(label)
                        self._deleted.discard(label)
                self._index.add_items(data, np.asarray(labels, dtype=np.uint64),
                                      num_threads=num_threads)
                self._labels.update(new)
                self._ids.update((label, item) for item, label in new.items())
            finally:
                # Never hand a label out twice, even after a failed add that may
                # have stored some points; queries skip labels with no id.
                self._next_label = next_label

    def delete(self, item_id: str) -> None:
        """Hide an item from queries; deleting it again is a no-op."""
        with self._lock.write():
            label = self._labels.get(item_id)
            if label is None:
                raise KeyError(f"unknown item id {item_id!r}: not in the ANN index")
            if label not in self._deleted:
                self._index.mark_deleted(label)
                self._deleted.add(label)

    def _reserve(self, needed: int) -> None:
        capacity = self._index.get_max_elements()
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2  # doubling keeps the total copying linear in the catalogue
        self._index.resize_index(capacity)

    def _check_vectors(self, vectors: np.ndarray, ids: list) -> np.ndarray:
        dim = self.config.dim
        if not isinstance(vectors, np.ndarray):
            raise ValueError(f"vectors must be a numpy array, got {type(vectors).__name__}")
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise ValueError(f"vectors must have shape (n, {dim}), got {vectors.shape}")
        if vectors.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} item ids but {vectors.shape[0]} vectors")
        if vectors.dtype.kind not in "fiu":
            raise ValueError(f"vectors must be real numbers, got dtype {vectors.dtype}")
        with np.errstate(over="ignore"):  # overflow shows up as inf, reported below
            data = np.ascontiguousarray(vectors, dtype=np.float32)
        finite = np.isfinite(data).all(axis=1)  # after the cast: huge float64 becomes inf
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise ValueError(f"vector for item {ids[bad]!r} has NaN or inf")
        return data

    # -- queries ---------------------------------------------------------
    def query(self, vector: np.ndarray, k: int, *,
              exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """Up to ``k`` (item id, score) pairs, nearest first, without ``exclude``."""
        q = self._check_query(vector, k)
        with self._lock.read():
            return self._search(q, k, self._live_labels(exclude))

    def query_item(self, item_id: str, k: int, *,
                   exclude: Collection[str] = ()) -> list[tuple[str, float]]:
        """Neighbours of a stored item, never the item itself."""
        self._check_k(k)
        with self._lock.read():
            label = self._labels.get(item_id)
            if label is None or label in self._deleted:
                raise KeyError(f"unknown item id {item_id!r}: not in the ANN index"
                               + (" (deleted)" if label is not None else ""))
            q = np.asarray(self._index.get_items([label]), dtype=np.float32)[0]
            skip = self._live_labels(exclude)
            skip.add(label)
            return self._search(q, k, skip)

    def _check_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")

    def _check_query(self, vector: np.ndarray, k: int) -> np.ndarray:
        self._check_k(k)
        q = np.asarray(vector)
        if q.ndim == 2 and q.shape[0] == 1:
            q = q[0]
        if q.shape != (self.config.dim,):
            raise ValueError(f"query vector must have shape ({self.config.dim},), got {q.shape}")
        if q.dtype.kind not in "fiu":
            raise ValueError(f"query vector must be real numbers, got dtype {q.dtype}")
        q = q.astype(np.float32)
        if not np.isfinite(q).all():
            raise ValueError("query vector has NaN or inf")
        return q

    def _live_labels(self, item_ids: Collection[str]) -> set[int]:
        if isinstance(item_ids, str):
            raise ValueError("exclude must be a collection of item ids, not one str")
        labels = set()
        for item in item_ids:
            label = self._labels.get(item)
            if label is not None and label not in self._deleted:
                labels.add(label)
        return labels

    def _search(self, q: np.ndarray, k: int, skip: set[int]) -> list[tuple[str, float]]:
        want = min(int(k), len(self) - len(skip))
        if want <= 0:
            return []
        ask, filt = want, None
        if skip and HAS_FILTER and len(skip) > want:
            # Many exclusions (a long history): let the graph walk skip them.
            # The callback re-enters Python per visited point, so for a few
            # exclusions over-asking and dropping them afterwards is cheaper.
            skip_set = skip
            filt = lambda label: label not in skip_set  # noqa: E731
        else:
            ask = min(want + len(skip), len(self))
        try:
            labels, distances = self._index.knn_query(q, k=ask, num_threads=1, filter=filt)
        except RuntimeError:
            # The graph walk reached fewer than `ask` live points (many deletions,
            # or `ask` close to the live count): scan exactly instead.
            return self._exact(q, want, skip)
        out = []
        for label, distance in zip(labels[0].tolist(), distances[0].tolist()):
            item = self._ids.get(label)
            if item is None or label in skip:
                continue
            out.append((item, self._score(distance)))
            if len(out) == want:
                break
        return out

    def _score(self, distance: float) -> float:
        # hnswlib distances: ip and cosine are 1 - similarity, l2 is squared.
        return -distance if self.config.space == "l2" else 1.0 - distance

    def _exact(self, q: np.ndarray, want: int, skip: set[int]) -> list[tuple[str, float]]:
        labels = [label for label in self._ids if label not in self._deleted and label not in skip]
        if not labels:
            return []
        stored = np.asarray(self._index.get_items(labels), dtype=np.float32)
        if self.config.space == "l2":
            scores = -((stored - q) ** 2).sum(axis=1)
        else:
            if self.config.space == "cosine":  # stored vectors are already unit length
                q = q / (np.linalg.norm(q) + 1e-30)
            scores = stored @ q
        order = np.argsort(-scores, kind="stable")[:want]
        return [(self._ids[labels[i]], float(scores[i])) for i in order]
