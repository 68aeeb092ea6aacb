"""Training the two towers and the multi-task ranker, with no Kafka in sight.

:class:`Trainer` owns both models and their optimisers.  ``fit`` takes one
mini-batch step (the online trainer agent calls it on every batch it
consumes), ``predict`` gives head probabilities, ``save``/``load`` write and
read one checkpoint file, ``frozen_copy`` gives a copy that never learns (the
control arm of an online-vs-frozen comparison).

>>> from models.features import Example, FeatureConfig
>>> from models.two_tower import TowerConfig
>>> from models.mtml import RankerConfig
>>> t = Trainer(TowerConfig(hash_size=512, dim=8, id_dim=8, hidden=16),
...             RankerConfig(hash_size=512, emb_dim=4, hidden=(16,)))
>>> exs = [Example("u1", f"i{n}", None, "explore", 0.0, labels={"like": n % 2}) for n in range(4)]
>>> sorted(t.fit(exs))[:3], t.predict(exs).shape, t.step
(['calibration', 'distill', 'loss'], (4, 8), 1)
"""
from __future__ import annotations

import copy
import math
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from models.calibration import CALIBRATION_LR, PlattCalibration, calibration_optimizer
from models.features import HEADS, Batch, Example, collate
from models.mtml import HEAD_PRIORS, MTMLRanker, RankerConfig
from models.two_tower import TowerConfig, TwoTower
from models.value import value_scores, weights_for
from schemas.events import POSITIVE_HEADS

#: 3: the calibration layer scales about each head's prior logit and learns by SGD.
CHECKPOINT_VERSION = 3


def tower_positives(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] bool: some positive head is a known 1 and see_less is not.

    >>> tower_positives(torch.tensor([[1., 0, 0, 0, 0, 0, 0, 0], [1., 0, 0, 0, 0, 0, 1, 0]]),
    ...                 torch.ones(2, 8)).tolist()
    [True, False]
    """
    pos_cols = [HEADS.index(h) for h in POSITIVE_HEADS]
    positive = ((labels[:, pos_cols] * mask[:, pos_cols]) > 0).any(dim=1)
    see_less = HEADS.index("see_less")
    return positive & ~((labels[:, see_less] * mask[:, see_less]) > 0)


def in_batch_softmax_loss(user_vecs: torch.Tensor, item_vecs: torch.Tensor,
                          positive: torch.Tensor, item_ids: torch.Tensor,
                          temperature: float = 0.05) -> torch.Tensor:
    """Sampled softmax with the batch's other items as negatives (no logQ correction).

    For each positive row, its own item must outscore every other item in the
    batch; copies of the same item elsewhere in the batch are not negatives.
    Zero (still differentiable) when the batch has no positive.

    >>> u = torch.eye(2); loss = in_batch_softmax_loss(u, u, torch.tensor([True, True]), torch.arange(2), 0.1)
    >>> round(float(loss), 4)
    0.0
    """
    logits = user_vecs @ item_vecs.T / temperature
    same_item = item_ids[:, None] == item_ids[None, :]
    not_self = ~torch.eye(len(item_ids), dtype=torch.bool)
    logits = logits.masked_fill(same_item & not_self, float("-inf"))
    rows = positive.nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return (user_vecs.sum() + item_vecs.sum()) * 0.0
    return F.cross_entropy(logits[rows], rows)


def distill_targets(ranker_scores, request_ids: Sequence, k: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """First-stage distillation: was each item in the second stage's top ``k`` of its request?

    Returns ``(targets, informative)``: requests with at most ``k`` items (or
    no request id) put everything in the top k, which teaches nothing, so
    their rows are not informative.  Ties keep the earlier row.

    >>> t, i = distill_targets([0.1, 0.9, 0.5, 0.7], ["r", "r", "r", "s"], k=1)
    >>> t.tolist(), i.tolist()
    ([0.0, 1.0, 0.0, 1.0], [True, True, True, False])
    """
    scores = torch.as_tensor(ranker_scores, dtype=torch.float32).reshape(-1)
    targets = torch.zeros_like(scores)
    informative = torch.zeros(scores.shape[0], dtype=torch.bool)
    groups: dict = {}
    for row, rid in enumerate(request_ids):
        if rid is not None:
            groups.setdefault(rid, []).append(row)
    for rows in groups.values():
        idx = torch.tensor(rows)
        top = idx[torch.argsort(-scores[idx], stable=True)[:k]]
        targets[top] = 1.0
        if len(rows) > k:
            informative[idx] = True
    unassigned = [row for row, rid in enumerate(request_ids) if rid is None]
    targets[unassigned] = 1.0
    return targets, informative


def multitask_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean BCE over the known (row, head) cells, and each head's own mean.

    >>> loss, per_head = multitask_loss(torch.zeros(1, 8), torch.ones(1, 8),
    ...                                 torch.tensor([[1., 0, 0, 0, 0, 0, 0, 0]]))
    >>> round(float(loss), 4), list(per_head)
    (0.6931, ['click'])
    """
    cells = F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * mask
    loss = cells.sum() / mask.sum().clamp(min=1.0)
    counts = mask.sum(dim=0)
    per_head = {h: float(cells[:, j].detach().sum() / counts[j])
                for j, h in enumerate(HEADS) if counts[j] > 0}
    return loss, per_head


def optimizers(prefix: str, model: torch.nn.Module, lr: float, sparse_lr: float
               ) -> dict[str, torch.optim.Optimizer]:
    """Adam for dense weights, SparseAdam for tables with sparse gradients.

    SparseAdam updates only the rows a batch touched, so a step costs the
    batch, not the 2**16-row tables (plain Adam would decay every row each step).
    """
    sparse, dense = [], []
    for module in model.modules():
        is_sparse = isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse
        for p in module.parameters(recurse=False):
            (sparse if is_sparse else dense).append(p)
    out = {f"{prefix}_dense": torch.optim.Adam(dense, lr=lr)}
    if sparse:
        out[f"{prefix}_sparse"] = torch.optim.SparseAdam(sparse, lr=sparse_lr)
    return out


def served_rows(examples: Sequence[Example]) -> torch.Tensor:
    """1.0 for the examples of items the funnel served (they carry retrieval scores),
    0.0 for the rest; all 1.0 when none was served (a replayed log).

    The calibration layer is fitted on served rows only: its probabilities are read
    for served items (by the value model, the stability SLOs), and impressions from
    elsewhere (other surfaces, organic browsing) have other base rates (more
    see_less on random items), which a model that cannot tell them apart would
    average into every prediction.

    >>> served = Example("u", "i", "a", "explore", 1.0, source_scores={"trending": 0.4})
    >>> other = Example("u", "j", "a", "explore", 1.0)
    >>> served_rows([served, other]).tolist(), served_rows([other]).tolist()
    ([1.0, 0.0], [1.0])
    """
    flags = torch.tensor([1.0 if e.source_scores else 0.0 for e in examples])
    return flags if flags.any() else torch.ones(len(examples))


class Trainer:
    """Both models, their optimisers, and the counts a checkpoint keeps.

    ``sparse_lr`` is the embedding tables' rate: a hashed row is updated only
    when its id appears in a batch, so it gets few steps and needs larger ones.
    """

    def __init__(self, tower: TowerConfig = TowerConfig(), ranker: RankerConfig = RankerConfig(),
                 *, lr: float = 1e-3, temperature: float = 0.05, distill_k: int = 3,
                 distill_weight: float = 0.1, sparse_lr: float = 1e-2, seed: int = 0,
                 calibration_lr: float = CALIBRATION_LR):
        for name in ("hash_size", "author_size", "surface_size"):
            if getattr(tower, name) != getattr(ranker, name):
                raise ValueError(f"tower and ranker must hash alike: {name} differs")
        self.settings = {"lr": lr, "temperature": temperature, "distill_k": distill_k,
                         "distill_weight": distill_weight, "sparse_lr": sparse_lr, "seed": seed,
                         "calibration_lr": calibration_lr}
        # A private RNG stream: building a trainer must not disturb the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tower = TwoTower(tower)
            self.ranker = MTMLRanker(ranker)
        self.calibration = PlattCalibration(
            len(HEADS), centre=torch.logit(torch.tensor([HEAD_PRIORS[h] for h in HEADS])))
        self.optimizers: Optional[dict] = {
            **optimizers("tower", self.tower, lr, sparse_lr),
            **optimizers("ranker", self.ranker, lr, sparse_lr),
            "calibration": calibration_optimizer(self.calibration, lr=calibration_lr)}
        self.step = 0
        self.examples_seen = 0
        self.frozen = False

    @property
    def features(self) -> TowerConfig:
        """The config :func:`~models.features.collate` hashes with."""
        return self.tower.config

    def batch(self, examples: Sequence[Example]) -> Batch:
        return collate(examples, self.features)

    # -- learning ---------------------------------------------------------

    def fit(self, examples: Sequence[Example]) -> dict[str, float]:
        """One optimiser step of both models on ``examples``; returns the losses."""
        if self.frozen:
            raise RuntimeError("this trainer is a frozen copy; it does not learn")
        batch = self.batch(examples)
        self.tower.train()
        self.ranker.train()
        s = self.settings
        users, items = self.tower(batch)
        dots = (users * items).sum(dim=1)
        tower_loss = in_batch_softmax_loss(users, items,
                                           tower_positives(batch.labels, batch.label_mask),
                                           batch.item_ids, s["temperature"])
        # The ranker reads the dot as an input feature, not as a path to train the towers.
        logits = self.ranker(batch.with_tower_dot(dots))
        ranker_loss, per_head = multitask_loss(logits, batch.labels, batch.label_mask)
        distill_loss = self._distill_loss(batch, logits, dots)
        loss = tower_loss + s["distill_weight"] * distill_loss + ranker_loss
        # Calibrate on logits from before this batch's update: labels the model has not seen.
        calibration_loss = self.calibration.fit_step(
            self.optimizers["calibration"], logits, batch.labels,
            batch.label_mask * served_rows(examples)[:, None])
        for name, opt in self.optimizers.items():
            if name != "calibration":
                opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, opt in self.optimizers.items():
            if name != "calibration":
                opt.step()
        self.step += 1
        self.examples_seen += len(examples)
        out = {"loss": loss.item(), "tower": tower_loss.item(), "distill": distill_loss.item(),
               "ranker": ranker_loss.item(), "calibration": calibration_loss}
        out.update({f"ranker/{h}": v for h, v in per_head.items()})
        return out

    def _distill_loss(self, batch: Batch, logits: torch.Tensor, dots: torch.Tensor) -> torch.Tensor:
        if not any(r is not None for r in batch.request_ids):
            return dots.sum() * 0.0
        probs = torch.sigmoid(logits.detach()).numpy()
        value = np.empty(batch.size, dtype=np.float64)
        for surface in set(batch.surfaces):
            rows = [i for i, s in enumerate(batch.surfaces) if s == surface]
            value[rows] = value_scores(probs[rows], weights_for(surface))
        targets, informative = distill_targets(value, batch.request_ids, self.settings["distill_k"])
        if not informative.any():
            return dots.sum() * 0.0
        return F.binary_cross_entropy_with_logits(
            dots[informative] / self.settings["temperature"], targets[informative])

    def pretrain(self, examples: Sequence[Example], epochs: int = 1, batch_size: int = 256,
                 progress: bool = True, seed: int = 0) -> list[float]:
        """Bootstrap from a log: ``epochs`` shuffled passes; mean loss of each epoch."""
        from tqdm import tqdm
        rng = random.Random(seed)
        order = list(range(len(examples)))
        steps = math.ceil(len(order) / batch_size)
        means = []
        with tqdm(total=epochs * steps, desc="pretrain", unit="batch", disable=not progress) as bar:
            for epoch in range(epochs):
                rng.shuffle(order)
                total = 0.0
                for start in range(0, len(order), batch_size):
                    losses = self.fit([examples[i] for i in order[start:start + batch_size]])
                    total += losses["loss"]
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{losses['loss']:.3f}")
                means.append(total / max(steps, 1))
        return means

    # -- scoring ----------------------------------------------------------

    @torch.no_grad()
    def predict(self, examples: Sequence[Example]) -> np.ndarray:
        """Head probabilities [B, len(HEADS)] (columns in HEADS order)."""
        return self.predict_batch(self.batch(examples))

    def _eval(self) -> None:
        # Module.eval() walks every submodule; serving predicts several times a request.
        if self.tower.training or self.ranker.training:
            self.tower.eval()
            self.ranker.eval()

    @torch.no_grad()
    def predict_batch(self, batch: Batch) -> np.ndarray:
        """:meth:`predict` of an already collated batch (e.g. from
        :func:`~models.features.collate_for_user`)."""
        self._eval()
        users, items = self.tower(batch)
        logits = self.ranker(batch.with_tower_dot((users * items).sum(dim=1)))
        return torch.sigmoid(self.calibration(logits)).numpy()

    @torch.no_grad()
    def user_vectors(self, examples: Sequence[Example]) -> np.ndarray:
        """[B, dim] user vectors (only the user-side fields of the examples are read)."""
        self._eval()
        return self.tower.user_vectors(self.batch(examples)).numpy()

    @torch.no_grad()
    def item_vectors(self, examples: Sequence[Example]) -> np.ndarray:
        """[B, dim] item vectors (only the item-side fields are read), e.g. for the ANN index."""
        self._eval()
        return self.tower.item_vectors(self.batch(examples)).numpy()

    # -- checkpoints ------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"version": CHECKPOINT_VERSION,
                 "tower_config": asdict(self.tower.config),
                 "ranker_config": asdict(self.ranker.config),
                 "settings": dict(self.settings), "step": self.step,
                 "examples_seen": self.examples_seen,
                 "tower": self.tower.state_dict(), "ranker": self.ranker.state_dict(),
                 "calibration": self.calibration.state_dict()}
        if self.optimizers is not None:
            state["optimizers"] = {n: opt.state_dict() for n, opt in self.optimizers.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')!r}, "
                             f"this code reads {CHECKPOINT_VERSION}")
        if (state["tower_config"] != asdict(self.tower.config)
                or state["ranker_config"] != asdict(self.ranker.config)):
            raise ValueError("checkpoint was written by models with another config")
        self.tower.load_state_dict(state["tower"])
        self.ranker.load_state_dict(state["ranker"])
        self.calibration.load_state_dict(state["calibration"])
        if self.optimizers is not None and "optimizers" in state:
            for name, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
        self.step = int(state["step"])
        self.examples_seen = int(state["examples_seen"])

    def save(self, path) -> None:
        """Write a checkpoint atomically (readers never see half a file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "Trainer":
        state = torch.load(path, map_location="cpu", weights_only=True)
        ranker_cfg = dict(state["ranker_config"])
        ranker_cfg["hidden"] = tuple(ranker_cfg["hidden"])
        trainer = cls(TowerConfig(**state["tower_config"]), RankerConfig(**ranker_cfg),
                      **state["settings"])
        trainer.load_state_dict({**state, "ranker_config": asdict(trainer.ranker.config)})
        return trainer

    def frozen_copy(self) -> "Trainer":
        """An independent copy that predicts like this one does now and never learns."""
        optimizers, self.optimizers = self.optimizers, None
        # Optimiser state is useless to a copy that never steps; don't duplicate it.
        try:
            twin = copy.deepcopy(self)
        finally:
            self.optimizers = optimizers
        twin.frozen = True
        for p in (list(twin.tower.parameters()) + list(twin.ranker.parameters())
                  + list(twin.calibration.parameters())):
            p.requires_grad_(False)
        return twin
