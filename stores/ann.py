"""Approximate nearest-neighbour index over item embeddings (hnswlib).

Items are named by string ids; hnswlib names points by integer labels.  Each
new id takes the next label from a counter (no hashing, so no collisions) and
keeps it for ever: re-embedding an item replaces its vector under the same
label, deleting it only marks the label deleted (its slot is reclaimed by a
rebuild, not reused).

Scores are similarities, higher is nearer: the inner product for ``"ip"``,
the cosine for ``"cosine"`` and minus the *squared* L2 distance for ``"l2"``.

The index is a cache.  It can always be rebuilt from the item embeddings, so
it is never the only copy of anything; :meth:`AnnIndex.save` exists to make
restarts fast, and a missing or corrupt save is a reason to rebuild.

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

import json
import os
import threading
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Collection, Iterator, Mapping, Optional, Sequence

import hnswlib
import numpy as np

SPACES = ("ip", "cosine", "l2")
SIDECAR = "ann.json"
FORMAT_VERSION = 1

# hnswlib >= 0.7 takes a per-query ``filter`` callable; older builds do not.
HAS_FILTER = "filter" in (hnswlib.Index.knn_query.__doc__ or "")


class CorruptIndexError(ValueError):
    """A saved index exists but cannot be trusted; rebuild it from the embeddings."""


# --------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------

def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be positive")
    return value


@dataclass(frozen=True)
class AnnConfig:
    """What an :class:`AnnIndex` is built with.

    >>> AnnConfig.from_env(32, environ={"STREAMREC_ANN_EF": "128"})
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

    @classmethod
    def from_env(cls, dim: int, space: str = "ip", max_elements: int = 1024,
                 environ: Optional[Mapping[str, str]] = None) -> "AnnConfig":
        """Read ``STREAMREC_ANN_M``, ``STREAMREC_ANN_EF``, ``STREAMREC_ANN_EF_CONSTRUCTION``."""
        env = os.environ if environ is None else environ
        return cls(dim=dim, space=space, max_elements=max_elements,
                   M=_env_int(env, "STREAMREC_ANN_M", cls.M),
                   ef=_env_int(env, "STREAMREC_ANN_EF", cls.ef),
                   ef_construction=_env_int(env, "STREAMREC_ANN_EF_CONSTRUCTION",
                                            cls.ef_construction))


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
    """String-keyed hnswlib index with upsert, delete, exclusions and save/load.

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
        self._setup(config, index, labels={}, deleted=set(), next_label=0)

    @classmethod
    def from_config(cls, config: AnnConfig) -> "AnnIndex":
        return cls(config.dim, space=config.space, max_elements=config.max_elements,
                   M=config.M, ef_construction=config.ef_construction, ef=config.ef)

    def _setup(self, config: AnnConfig, index: "hnswlib.Index", labels: dict[str, int],
               deleted: set[int], next_label: int) -> None:
        index.set_ef(config.ef)
        index.set_num_threads(1)
        self.config = config
        self._index = index
        self._labels = labels                                   # item id -> label
        self._ids = {label: item for item, label in labels.items()}  # label -> item id
        self._deleted = deleted                                 # labels marked deleted
        self._next_label = next_label
        # hnswlib lets add_items and knn_query run concurrently, but resize_index
        # reallocates the vectors and graph under running searches (use after
        # free), and our id maps are plain dicts: so writers go alone.
        self._lock = RWLock()
        self._save_lock = threading.Lock()  # one save at a time per index

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

    # -- persistence -----------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write the index and its JSON sidecar into ``directory`` atomically.

        The hnswlib file gets a fresh name; the sidecar naming it replaces the
        old one in a single ``os.replace``, so a crash leaves the old save or
        the new one, never a mix.  Writers wait while saving; queries do not.
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        with self._save_lock, self._lock.read():
            name = f"index-{uuid.uuid4().hex}.bin"
            tmp = folder / (name + ".tmp")
            self._index.save_index(str(tmp))
            _fsync(tmp)
            os.replace(tmp, folder / name)
            size, crc = _size_and_crc(folder / name)
            meta = {
                "format": FORMAT_VERSION,
                "config": asdict(self.config),
                "capacity": self._index.get_max_elements(),
                "index_file": name,
                "index_bytes": size,
                "index_crc32": crc,
                "labels": self._labels,
                "deleted": sorted(self._deleted),
                "next_label": self._next_label,
            }
            side_tmp = folder / (SIDECAR + f".{uuid.uuid4().hex}.tmp")
            side_tmp.write_text(json.dumps(meta))
            _fsync(side_tmp)
            os.replace(side_tmp, folder / SIDECAR)  # the commit point
            _fsync(folder)
            for old in folder.glob("index-*.bin*"):
                if old.name != name:
                    old.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "AnnIndex":
        """Restore a :meth:`save`; FileNotFoundError or CorruptIndexError means rebuild."""
        folder = Path(directory)
        side = folder / SIDECAR
        if not side.is_file():
            raise FileNotFoundError(f"no saved ANN index in {folder} (missing {SIDECAR}); "
                                    "rebuild it from the item embeddings")
        try:
            meta = json.loads(side.read_text())
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"unsupported format {meta.get('format')!r}")
            config = AnnConfig(**meta["config"])
            name = meta["index_file"]
            if not isinstance(name, str) or Path(name).name != name:
                raise ValueError(f"bad index file name {name!r}")
            labels = {str(item): int(label) for item, label in meta["labels"].items()}
            deleted = {int(label) for label in meta["deleted"]}
            next_label = int(meta["next_label"])
            capacity = int(meta["capacity"])
            expected = (int(meta["index_bytes"]), int(meta["index_crc32"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptIndexError(f"unreadable ANN sidecar {side}: {exc}") from exc
        used = set(labels.values())
        if (len(used) != len(labels) or not deleted <= used
                or any(label >= next_label for label in used)):
            raise CorruptIndexError(f"inconsistent ANN sidecar {side}")
        path = folder / name
        if not path.is_file():
            raise CorruptIndexError(f"ANN sidecar {side} names {name}, which is missing")
        # Check before hnswlib reads it: a truncated file can crash the process.
        if _size_and_crc(path) != expected:
            raise CorruptIndexError(f"ANN index file {path} does not match its sidecar "
                                    "(size or checksum)")
        index = hnswlib.Index(space=config.space, dim=config.dim)
        try:
            index.load_index(str(path), max_elements=capacity)
        except RuntimeError as exc:
            raise CorruptIndexError(f"hnswlib cannot load {path}: {exc}") from exc
        self = cls.__new__(cls)
        self._setup(config, index, labels=labels, deleted=deleted, next_label=next_label)
        return self


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_and_crc(path: Path) -> tuple[int, int]:
    size, crc = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc
