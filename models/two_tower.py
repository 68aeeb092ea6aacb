"""The two-tower retrieval model: users and items as unit vectors in one space.

The user tower sees only the user (hashed id, the mean of their recent
positive items, the surface); the item tower sees only the item (hashed id,
author, side features).  So item vectors can be computed ahead and searched
with an ANN index, and a user vector once per request.

>>> import torch
>>> from models.features import Example, collate
>>> cfg = TowerConfig(hash_size=256, dim=8, id_dim=8, hidden=16)
>>> torch.manual_seed(0) and None
>>> model = TwoTower(cfg)
>>> users, items = model(collate([Example("u", "i", "a", "explore", 0.0)], cfg))
>>> users.shape, round(float(items.detach().norm()), 4)
(torch.Size([1, 8]), 1.0)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from models.features import ITEM_SIDE, Batch


@dataclass(frozen=True)
class TowerConfig:
    hash_size: int = 2 ** 16
    dim: int = 32
    author_size: int = 2 ** 12
    surface_size: int = 64
    #: Width of the id embeddings (user, item, recent items).
    id_dim: int = 32
    author_dim: int = 16
    surface_dim: int = 8
    hidden: int = 64
    #: Sparse embedding gradients: an optimiser step then touches only the rows a
    #: batch used, not the whole table (needs a sparse optimiser, e.g. SparseAdam).
    sparse: bool = True


def mlp(inputs: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, out))


class TwoTower(nn.Module):
    def __init__(self, config: TowerConfig = TowerConfig()):
        super().__init__()
        c = self.config = config
        self.user_id = nn.Embedding(c.hash_size, c.id_dim, sparse=c.sparse)
        # Empty bags (users with no positives yet) come out as zeros.
        self.recent = nn.EmbeddingBag(c.hash_size, c.id_dim, mode="mean", sparse=c.sparse)
        self.surface = nn.Embedding(c.surface_size, c.surface_dim, sparse=c.sparse)
        self.user_mlp = mlp(2 * c.id_dim + c.surface_dim, c.hidden, c.dim)
        self.item_id = nn.Embedding(c.hash_size, c.id_dim, sparse=c.sparse)
        self.author = nn.Embedding(c.author_size, c.author_dim, sparse=c.sparse)
        self.item_mlp = mlp(c.id_dim + c.author_dim + len(ITEM_SIDE), c.hidden, c.dim)
        for table in (self.user_id, self.recent, self.surface, self.item_id, self.author):
            nn.init.normal_(table.weight, std=0.05)

    def user_vectors(self, batch: Batch) -> torch.Tensor:
        """[B, dim] unit vectors, one per row's user."""
        x = torch.cat([self.user_id(batch.user_ids),
                       self.recent(batch.recent_ids, batch.recent_offsets),
                       self.surface(batch.surface_ids)], dim=1)
        return F.normalize(self.user_mlp(x), dim=1)

    def item_vectors(self, batch: Batch) -> torch.Tensor:
        """[B, dim] unit vectors, one per row's item."""
        x = torch.cat([self.item_id(batch.item_ids), self.author(batch.author_ids),
                       batch.item_side], dim=1)
        return F.normalize(self.item_mlp(x), dim=1)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_vectors(batch), self.item_vectors(batch)
