"""Weight deltas: what changed between two versions of a model, and how to rebuild the new one.

Online training with sparse optimisers touches only the embedding rows of the ids a
batch saw, so between two published versions most of a 2**16-row table is the same.
A delta holds, per tensor, either the rows that differ (row indices and the rows) or,
when that would not be smaller (dense layers, biases), the whole tensor.  Rows are
compared bit for bit in the tensors' own dtype, so :func:`apply` on the same base
gives exactly the new tensors; the delta carries a fingerprint of its base and of its
result, and :func:`apply` refuses any other base and checks what it built.

Tensors are a flat ``{name: tensor}``; which of them are embedding tables does not
need saying: a table whose few rows changed is sent as rows because that is smaller.

>>> import torch
>>> base = {"emb": torch.zeros(1000, 4, dtype=torch.float16), "bias": torch.zeros(3)}
>>> new = {"emb": base["emb"].clone(), "bias": torch.ones(3)}
>>> new["emb"][7] = 0.5
>>> d = diff(base, new)
>>> d["rows"]["emb"]["index"].tolist(), sorted(d["whole"])
([7], ['bias'])
>>> rebuilt = apply(base, d)
>>> all(torch.equal(rebuilt[k], new[k]) for k in new)
True
>>> apply(new, d)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
models.weight_delta.BaseMismatch: the delta was made on another base (fingerprint ...)
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch

Tensors = dict[str, torch.Tensor]
#: Bytes of a row index on the wire (int32: tables have fewer than 2**31 rows).
INDEX_BYTES = 4


class MissingBase(LookupError):
    """A delta cannot be applied: its base is not here."""


class BaseMismatch(ValueError):
    """A delta was given a base other than the one it was made on."""


def fingerprint(tensors: Tensors) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order.

    >>> fingerprint({"a": torch.zeros(2)}) == fingerprint({"a": torch.zeros(2)})
    True
    >>> fingerprint({"a": torch.zeros(2)}) == fingerprint({"a": -torch.zeros(2)})
    False
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_bytes(t).numpy().tobytes())
    return h.hexdigest()


def changed_rows(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``new`` whose bits differ from ``base``'s (same shape).

    >>> changed_rows(torch.zeros(3, 2), torch.tensor([[0., 0.], [0., 1.], [-0., 0.]])).tolist()
    [1, 2]
    """
    rows = new.shape[0]
    differ = _bytes(base).reshape(rows, -1) != _bytes(new).reshape(rows, -1)
    return differ.any(dim=1).nonzero().flatten().to(torch.int32)


def diff(base: Tensors, new: Tensors, base_sha256: Optional[str] = None) -> dict:
    """The delta that turns ``base`` into ``new``: per tensor of ``new``, its changed
    rows when the tensor is a table in ``base`` of the same shape and dtype and the rows
    are smaller than the whole, else the whole tensor.  ``base_sha256`` is the base's
    :func:`fingerprint` when the caller already has it."""
    rows, whole = {}, {}
    for name, t in new.items():
        old = base.get(name)
        if old is not None and t.dim() >= 2 and old.shape == t.shape and old.dtype == t.dtype:
            index = changed_rows(old, t)
            row_bytes = t[0].numel() * t.element_size()
            if len(index) * (row_bytes + INDEX_BYTES) < t.numel() * t.element_size():
                rows[name] = {"index": index, "rows": t[index.long()].clone()}
                continue
        whole[name] = t.clone()
    return {"names": list(new), "rows": rows, "whole": whole,
            "base_sha256": base_sha256 or fingerprint(base), "sha256": fingerprint(new)}


def apply(base: Optional[Tensors], delta: dict, base_sha256: Optional[str] = None) -> Tensors:
    """The tensors ``delta`` was made to, rebuilt on ``base`` (which is not changed).

    Raises :class:`MissingBase` without a base, :class:`BaseMismatch` on a base other
    than the delta's (``base_sha256``, when the caller knows it, spares hashing it
    again), and ValueError if what it built is not what the delta was made from.
    """
    if base is None:
        raise MissingBase("the delta's base is not here: it needs the version it was made on")
    have = base_sha256 or fingerprint(base)
    if have != delta["base_sha256"]:
        raise BaseMismatch(f"the delta was made on another base (fingerprint "
                           f"{delta['base_sha256'][:12]}, this base {have[:12]})")
    out = {}
    for name in delta["names"]:
        if name in delta["whole"]:
            out[name] = delta["whole"][name].clone()
        else:
            changed = delta["rows"].get(name)
            out[name] = base[name].clone()
            if changed is not None and len(changed["index"]):
                out[name][changed["index"].long()] = changed["rows"]
    if fingerprint(out) != delta["sha256"]:
        raise ValueError("the rebuilt tensors do not match the delta's fingerprint")
    return out


def sent_bytes(delta: dict) -> dict:
    """Tensor bytes a delta carries: ``rows`` (indices and rows), ``whole``, and the
    ``rows_sent`` count.

    >>> sent_bytes(diff({"e": torch.zeros(50, 2)}, {"e": torch.ones(50, 2)}))
    {'rows': 0, 'whole': 400, 'rows_sent': 0}
    """
    rows = sum(_nbytes(c["index"]) + _nbytes(c["rows"]) for c in delta["rows"].values())
    return {"rows": rows, "whole": sum(_nbytes(t) for t in delta["whole"].values()),
            "rows_sent": sum(len(c["index"]) for c in delta["rows"].values())}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes as a uint8 tensor, one row per row of ``t``."""
    t = t.detach().contiguous()
    rows = t.shape[0] if t.dim() else 1
    if t.numel() == 0:
        return torch.zeros(rows, 0, dtype=torch.uint8)
    return t.reshape(rows, -1).view(torch.uint8)
