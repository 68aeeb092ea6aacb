"""The multi-task ranker: one shared body, one logit per engagement head.

Unlike the towers, the ranker sees user and item together, so it can read
interaction features (the user's affinity for this author, retrieval scores,
the two-tower dot product).  Heads share the body because rare heads (share,
follow) learn little alone.

Two paths add up to each logit: the deep path (an MLP over embeddings and
dense features) and a wide path (a linear layer over the dense features and
the dot products of the user's embeddings with the item's and the author's).
An MLP over concatenated embeddings learns a user-item product slowly; the
explicit dots and the linear path let an online model rank well after a
few hundred labels, while the deep path keeps refining.

>>> import torch
>>> from models.features import Example, HEADS, collate
>>> cfg = RankerConfig(hash_size=256, emb_dim=4, hidden=(16,))
>>> torch.manual_seed(0) and None
>>> logits = MTMLRanker(cfg)(collate([Example("u", "i", None, "explore", 0.0)] * 3, cfg))
>>> tuple(logits.shape) == (3, len(HEADS))
True
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.features import HEADS, INTERACTION, ITEM_SIDE, POSITION, Batch

#: User-item, user-author, recent-item and recent-author dot products.
N_DOTS = 4
#: Typical rate of each head per impression, where the heads' biases start: a new
#: model then predicts plausible probabilities instead of 0.5 for everything, and
#: its first steps go into ranking rather than into walking each bias down.
HEAD_PRIORS = {"click": 0.1, "like": 0.04, "save": 0.01, "share": 0.005, "comment": 0.005,
               "follow": 0.003, "see_less": 0.02, "long_dwell": 0.04}


@dataclass(frozen=True)
class RankerConfig:
    hash_size: int = 2 ** 16
    author_size: int = 2 ** 12
    surface_size: int = 64
    emb_dim: int = 16
    hidden: tuple = (128, 64)
    dropout: float = 0.0
    #: Sparse embedding gradients (see :class:`~models.two_tower.TowerConfig`).
    sparse: bool = True


class MTMLRanker(nn.Module):
    def __init__(self, config: RankerConfig = RankerConfig()):
        super().__init__()
        c = self.config = config
        self.user_id = nn.Embedding(c.hash_size, c.emb_dim, sparse=c.sparse)
        self.item_id = nn.Embedding(c.hash_size, c.emb_dim, sparse=c.sparse)
        self.recent = nn.EmbeddingBag(c.hash_size, c.emb_dim, mode="mean", sparse=c.sparse)
        self.author = nn.Embedding(c.author_size, c.emb_dim, sparse=c.sparse)
        self.surface = nn.Embedding(c.surface_size, c.emb_dim, sparse=c.sparse)
        for table in (self.user_id, self.item_id, self.recent, self.author, self.surface):
            nn.init.normal_(table.weight, std=0.05)
        dense = len(ITEM_SIDE) + len(POSITION) + len(INTERACTION)
        width = 5 * c.emb_dim + dense + N_DOTS
        layers: list[nn.Module] = []
        for h in c.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if c.dropout:
                layers.append(nn.Dropout(c.dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.heads = nn.Linear(width, len(HEADS))
        self.wide = nn.Linear(dense + N_DOTS, len(HEADS))
        with torch.no_grad():
            self.heads.bias.copy_(torch.logit(torch.tensor([HEAD_PRIORS[h] for h in HEADS])))
            self.wide.bias.zero_()

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B, len(HEADS)], columns in :data:`~models.features.HEADS` order."""
        user, item = self.user_id(batch.user_ids), self.item_id(batch.item_ids)
        recent, author = self.recent(batch.recent_ids, batch.recent_offsets), self.author(batch.author_ids)
        dots = torch.stack([(user * item).sum(1), (user * author).sum(1),
                            (recent * item).sum(1), (recent * author).sum(1)], dim=1)
        dense = torch.cat([batch.item_side, batch.position, batch.interaction, dots], dim=1)
        x = torch.cat([user, item, recent, author, self.surface(batch.surface_ids), dense], dim=1)
        return self.heads(self.body(x)) + self.wide(dense)
