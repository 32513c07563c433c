"""Losses of embedding training (the ``contrastive`` strategy): in-batch negatives (InfoNCE), CoSENT, triplet margin.

Each is called as ``loss(embeddings, scores)``: ``embeddings`` holds ``anchors`` and ``positives`` ``[M, D]`` (row
i of one is the pair of row i of the other; under DDP the whole step's rows, gathered from every process) and, when
the data has hard negatives, ``negatives`` ``[K, D]`` with ``negative_rows`` ``[K]`` (the row each belongs to);
``scores`` ``[M]`` is each pair's similarity label, or None. The result is a scalar: the mean over the M rows. A
loss says what data it needs in ``needs``: "pairs" (anchor/positive, scores unused) or "scores" (scored pairs).
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

from graft import Loss, hookimpl, option


def _similarity(a, b, how: str):
    """[M, N] similarities of the rows of ``a`` [M, D] and ``b`` [N, D]: cosine or dot product, in float32."""
    import torch.nn.functional as F

    a, b = a.float(), b.float()
    if how == "cos":
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return a @ b.T


@dataclass
class InfoNCEOptions:
    temperature: float = option(0.05, "Softmax temperature of the similarities (SimCSE's 0.05 = "
                                      "sentence-transformers' scale 20).")
    scale: float = option(0.0, "Multiplier of the similarities instead of 1 / temperature (sentence-transformers' "
                               "name); 0 = use temperature.")
    similarity: Literal["cos", "dot"] = option("cos", "Cosine similarity, or the dot product of the embeddings.")
    symmetric: bool = option(False, "Also each positive against all anchors, the two losses averaged (CLIP's "
                                    "symmetric loss; sentence-transformers' MultipleNegativesSymmetricRankingLoss).")

    def validate(self):
        if self.temperature <= 0 or self.scale < 0:
            raise ValueError("temperature must be > 0 and scale >= 0.")


class InfoNCE(Loss):
    """In-batch negatives (InfoNCE; MultipleNegativesRankingLoss): each anchor against every positive and negative."""

    Options = InfoNCEOptions
    needs: ClassVar[str] = "pairs"

    def __call__(self, embeddings, scores=None):
        """Cross-entropy of row i's softmax over [all positives, all hard negatives] with target i (van den Oord et
        al. 2018, "Representation Learning with Contrastive Predictive Coding"; Henderson et al. 2017's
        multiple-negatives ranking loss; SimCSE, Gao et al. 2021). Mean over the M rows."""
        import torch
        import torch.nn.functional as F

        o = self.options
        scale = o.scale or 1.0 / o.temperature
        a, p, n = embeddings["anchors"], embeddings["positives"], embeddings.get("negatives")
        candidates = p if n is None or n.numel() == 0 else torch.cat([p, n])
        target = torch.arange(a.shape[0], device=a.device)
        loss = F.cross_entropy(_similarity(a, candidates, o.similarity) * scale, target)
        if o.symmetric:
            loss = (loss + F.cross_entropy(_similarity(p, a, o.similarity) * scale, target)) / 2
        return loss


@dataclass
class CoSENTOptions:
    scale: float = option(20.0, "Multiplier of the cosine similarities (the paper's and sentence-transformers' 20).")

    def validate(self):
        if self.scale <= 0:
            raise ValueError("scale must be > 0.")


class CoSENT(Loss):
    """CoSENT on scored pairs: every pair with a higher score should have a higher cosine similarity."""

    Options = CoSENTOptions
    needs: ClassVar[str] = "scores"

    def __call__(self, embeddings, scores=None):
        """log(1 + sum over (i, j) with score_i > score_j of exp(scale * (cos_j - cos_i))) (Su 2022, CoSENT; as
        sentence-transformers' CoSENTLoss). Only the order of the scores matters."""
        import torch

        if scores is None:
            raise ValueError("CoSENT needs scored pairs.")
        a, p = embeddings["anchors"], embeddings["positives"]
        cos = torch.nn.functional.cosine_similarity(a.float(), p.float(), dim=-1) * self.options.scale
        diff = cos[:, None] - cos[None, :]  # [i, j] = cos_i - cos_j, counted where score_i < score_j
        lower = scores[:, None] < scores[None, :]
        diff = diff.masked_fill(~lower, float("-inf"))
        return torch.logsumexp(torch.cat([diff.new_zeros(1), diff.reshape(-1)]), dim=0)


@dataclass
class TripletOptions:
    distance: Literal["euclidean", "cosine"] = option("euclidean", "Distance of two embeddings: euclidean, or 1 - "
                                                                   "cosine similarity.")
    margin: float = option(5.0, "The positive must be this much closer than the negative (sentence-transformers' "
                                "default 5 for euclidean; about 0.5 suits cosine).")

    def validate(self):
        if self.margin < 0:
            raise ValueError("margin must be >= 0.")


class Triplet(Loss):
    """Triplet margin: the positive closer to the anchor than a negative, by a margin (hard or in-batch hardest)."""

    Options = TripletOptions
    needs: ClassVar[str] = "pairs"

    def __call__(self, embeddings, scores=None):
        """mean over rows of max(0, d(a, p) - d(a, n) + margin) (Schroff et al. 2015, FaceNet). n is the row's first
        hard negative, or for a row without one the closest other row's positive (batch-hard mining, Hermans et al.
        2017)."""
        import torch

        a, p, n = (embeddings[k].float() if embeddings.get(k) is not None else None
                   for k in ("anchors", "positives", "negatives"))
        dist = (lambda x, y: torch.cdist(x, y)) if self.options.distance == "euclidean" else \
            (lambda x, y: 1 - _similarity(x, y, "cos"))
        to_positives = dist(a, p)  # [M, M]
        positive = to_positives.diagonal()
        others = to_positives + torch.eye(len(a), device=a.device) * 1e6  # a row's own positive is no negative
        negative = others.min(dim=1).values if len(a) > 1 else positive + self.options.margin
        if n is not None and n.numel():
            rows = embeddings["negative_rows"]
            first = torch.full((len(a),), -1, dtype=torch.long, device=a.device)
            first.scatter_reduce_(0, rows, torch.arange(len(rows), device=a.device), "amin", include_self=False)
            has = first >= 0
            hard = dist(a[has], n[first[has]]).diagonal()
            negative = negative.clone()
            negative[has] = hard
        return torch.relu(positive - negative + self.options.margin).mean()


@hookimpl
def register_losses(register):
    register(InfoNCE, name="infonce")
    register(CoSENT, name="cosent")
    register(Triplet, name="triplet")
