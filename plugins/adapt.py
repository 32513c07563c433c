"""The ``adapt`` strategy: unsupervised domain adaptation. [data] is the labelled source domain, [target] the domain
the model must work on, of which only inputs are used for training (its labels, if any, only score it).

Methods (``method``), each adding a loss on the target's batches, drawn beside the source's every step:

- ``dann``: a domain classifier on the features behind a gradient-reversal layer (Ganin et al., "Domain-Adversarial
  Training of Neural Networks", JMLR 2016): the classifier learns to tell the domains apart, the backbone receives
  its gradient reversed and scaled by lambda_p = 2 / (1 + exp(-gamma p)) - 1 (p: training progress 0 -> 1, gamma 10,
  the paper's schedule), so its features stop telling them apart;
- ``cdan``: the domain classifier conditioned on the class predictions (Long et al., "Conditional Adversarial Domain
  Adaptation", NeurIPS 2018): it reads the outer product of features and softmax predictions, or -- when that would
  be wider than 4,096 -- the paper's randomized multilinear map (fixed random projections, multiplied element-wise);
  ``entropy_conditioning`` gives CDAN+E;
- ``mcc``: minimum class confusion on the target's predictions, no domain classifier (Jin et al., "Minimum Class
  Confusion for Versatile Domain Adaptation", ECCV 2020): temperature-scaled, entropy-weighted class correlations,
  normalised per class, off-diagonal mass minimised;
- ``none``: the source alone (the baseline), the target only scored;

and ``self_training`` beside any of them or alone: pseudo-labels from the target batch as drawn (the weak view),
kept where the prediction's confidence reaches ``threshold``, taught to a strongly augmented view of the same inputs
(FixMatch: Sohn et al., "FixMatch: Simplifying Semi-Supervised Learning with Consistency and Confidence", NeurIPS
2020; images: large affine warps and Cutout through torchvision.transforms.v2, text: ``mask_probability`` of the
tokens masked), from ``self_training_start`` of the run on. The domain discriminator's shape (two hidden layers with
BatchNorm) and the losses follow thuml's Transfer-Learning-Library (``tllib``), which the tests check the formulas of.

Model selection: the source's validation split by default; ``select_on = "target"`` picks weights with the target's
labelled validation split -- an oracle that real unsupervised adaptation does not have, and the summary says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from graft import GraftError, hookimpl, option
from graft.supervised import Supervised, SupervisedOptions

#: the widest conditioning CDAN feeds its domain classifier as the plain outer product (the paper's 4,096)
CDAN_MAX_OUTER = 4096


@dataclass
class AdaptOptions(SupervisedOptions):
    method: Literal["dann", "cdan", "mcc", "none"] = option(
        "dann", "dann (domain classifier behind gradient reversal), cdan (conditioned on the predictions), mcc "
                "(minimum class confusion), none (source only: the baseline).")
    trade_off: float = option(1.0, "Weight of the adaptation loss (domain classifier's, or MCC's) beside the source's "
                                   "classification loss.")
    schedule: Literal["dann", "constant"] = option(
        "dann", "dann/cdan: the gradient reversal's coefficient, 2 / (1 + exp(-gamma p)) - 1 over training progress p "
                "(Ganin et al.), or constant 1.")
    gamma: float = option(10.0, "The schedule's gamma.")
    domain_hidden: int = option(1024, "Width of the domain classifier's two hidden layers.")
    domain_batch_norm: bool = option(True, "BatchNorm in the domain classifier (as tllib's); false keeps processes "
                                           "independent of each other's batch statistics.")
    randomized: Literal["auto", "always", "never"] = option(
        "auto", "cdan: the randomized multilinear map (auto: when features x classes > 4,096).")
    randomized_dim: int = option(1024, "cdan: the randomized map's width.")
    entropy_conditioning: bool = option(False, "cdan: weight each example's domain loss by 1 + exp(-entropy) of its "
                                               "prediction (CDAN+E).")
    mcc_temperature: float = option(2.5, "mcc: temperature of the target's softmax (the paper's 2.5).")
    self_training: bool = option(False, "FixMatch-style pseudo-labels on the target, beside the method (or alone with "
                                        "method = \"none\").")
    threshold: float = option(0.95, "self_training: the confidence a target prediction needs to become a label.")
    self_training_weight: float = option(1.0, "self_training: weight of the pseudo-label loss.")
    self_training_start: float = option(0.0, "self_training: from this fraction of the run on (0.5: the second half, "
                                             "after the method has aligned the domains).")
    mask_probability: float = option(0.15, "self_training on text: share of the tokens masked in the strong view.")
    select_on: Literal["source", "target"] = option(
        "source", "Best weights by the source's validation metric, or by the target's (an oracle: it needs target "
                  "labels that unsupervised adaptation does not have).")

    def validate(self):
        super().validate()
        if self.trade_off < 0 or self.self_training_weight < 0 or self.gamma <= 0:
            raise ValueError("trade_off and self_training_weight must not be negative, and gamma must be positive.")
        if not 0.0 < self.threshold <= 1.0 or not 0.0 <= self.self_training_start < 1.0:
            raise ValueError("threshold must be in (0, 1] and self_training_start in [0, 1).")
        if not 0.0 <= self.mask_probability < 1.0 or not 0.0 < self.mcc_temperature:
            raise ValueError("mask_probability must be in [0, 1) and mcc_temperature positive.")
        if min(self.domain_hidden, self.randomized_dim) < 1:
            raise ValueError("domain_hidden and randomized_dim must be at least 1.")


def reverse_gradient(x, coeff: float):
    """Identity forward; the gradient multiplied by ``-coeff`` backward (Ganin et al.'s gradient-reversal layer)."""
    import torch

    class GradientReversal(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, coeff):
            ctx.coeff = coeff
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return -ctx.coeff * grad, None

    return GradientReversal.apply(x, float(coeff))


def dann_coefficient(progress: float, gamma: float = 10.0) -> float:
    """Ganin et al.'s lambda_p = 2 / (1 + exp(-gamma p)) - 1: 0 at the start, near 1 by the end."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def entropy(p):
    """Entropy of each row of probabilities ``[N, K]`` -> ``[N]`` (nats)."""
    return -(p * (p + 1e-5).log()).sum(1)


def mcc_loss(logits, temperature: float = 2.5):
    """Minimum class confusion (Jin et al. 2020) of target logits ``[B, K]``: softmax at ``temperature``, examples
    weighted by 1 + exp(-entropy) (normalised to sum to B), class correlation C = P^T W P ``[K, K]``, each class's
    column normalised to sum 1, then the off-diagonal sum / K: a scalar in [0, 1), 0 when no example leaves any
    probability on a second class."""
    import torch

    b, k = logits.shape
    p = torch.softmax(logits.float() / temperature, 1)
    w = 1 + torch.exp(-entropy(p).detach())
    w = (b * w / w.sum()).unsqueeze(1)
    c = (p * w).t() @ p
    c = c / c.sum(0, keepdim=True)  # C is symmetric: columns and rows sum alike (tllib divides by the row sums)
    return (c.sum() - c.trace()) / k


def domain_loss(d_source, d_target, weights=None):
    """The domain classifier's loss: binary cross-entropy of its logits ``[B_s, 1]`` (source = 1) and ``[B_t, 1]``
    (target = 0), the mean of the two domains' means; ``weights`` ``[B_s + B_t]`` (CDAN+E) weight each example."""
    import torch
    import torch.nn.functional as F

    logits = torch.cat([d_source, d_target]).float().squeeze(1)
    labels = torch.cat([torch.ones(len(d_source)), torch.zeros(len(d_target))]).to(logits.device)
    each = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if weights is not None:
        each = each * weights
    return 0.5 * (each[:len(d_source)].mean() + each[len(d_source):].mean())


def adapt_model(backbone_module, head, width: int, classes: int, o: AdaptOptions, seed: int):
    """backbone -> head, plus the method's domain classifier; ``forward(inputs)`` is the classifier's,
    ``forward(inputs, target, strong, coeff)`` computes a training step's logits in one call (so that DDP sees every
    parameter used): ``{"source", "target", "strong", "domain_source", "domain_target", "conditioning"}``."""
    import torch
    from torch import nn

    conditional = o.method == "cdan"
    wide = width * classes > CDAN_MAX_OUTER
    randomized = conditional and (o.randomized == "always" or o.randomized == "auto" and wide)
    in_width = (o.randomized_dim if randomized else width * classes) if conditional else width

    class AdaptModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = backbone_module, head
            self.domain = None
            if o.method in ("dann", "cdan"):
                norm = (lambda: nn.BatchNorm1d(o.domain_hidden)) if o.domain_batch_norm else nn.Identity
                self.domain = nn.Sequential(nn.Linear(in_width, o.domain_hidden), norm(), nn.ReLU(),
                                            nn.Linear(o.domain_hidden, o.domain_hidden), norm(), nn.ReLU(),
                                            nn.Linear(o.domain_hidden, 1))
            if randomized:  # fixed, seeded: part of the saved state, never trained
                g = torch.Generator().manual_seed(seed)
                self.register_buffer("random_f", torch.randn(width, o.randomized_dim, generator=g))
                self.register_buffer("random_g", torch.randn(classes, o.randomized_dim, generator=g))

        def _features(self, views):
            same = all(isinstance(v, torch.Tensor) for v in views) and len({v.shape[1:] for v in views}) == 1
            if same:  # one pass: BatchNorm layers see both domains, as DANN's and tllib's training do
                return self.backbone(torch.cat(views)).split([len(v) for v in views])
            return [self.backbone(v) for v in views]

        def condition(self, f, logits):
            g = torch.softmax(logits.float(), 1).detach().to(f.dtype)
            if randomized:
                return (f @ self.random_f) * (g @ self.random_g) / math.sqrt(o.randomized_dim)
            return (g.unsqueeze(2) * f.unsqueeze(1)).flatten(1)

        def forward(self, inputs, target=None, strong=None, coeff: float = 0.0):
            if target is None:
                return self.head(self.backbone(inputs))
            views = [inputs, target] + ([strong] if strong is not None else [])
            feats = self._features(views)
            logits = [self.head(f) for f in feats]
            out = {"source": logits[0], "target": logits[1], "strong": logits[2] if strong is not None else None}
            if self.domain is not None:
                f = torch.cat(feats[:2])
                h = self.condition(f, torch.cat(logits[:2])) if conditional else f
                d = self.domain(reverse_gradient(h, coeff))
                out["domain_source"], out["domain_target"] = d[:len(feats[0])], d[len(feats[0]):]
            return out

    return AdaptModel()


class Adapt(Supervised):
    """Domain adaptation: labelled source data, unlabelled target data; DANN, CDAN, MCC, FixMatch self-training."""

    Options = AdaptOptions
    metric_modes = {**Supervised.metric_modes, "target_loss": "min", "target_accuracy": "max",
                    "target_macro_f1": "max"}

    target = None
    stream = None
    progress = 0.0

    def set_target(self, source, stream):
        if source.task != self.data.task:
            raise GraftError(f"[target] plugin = {source.name!r} is {source.task} data and [data] plugin = "
                             f"{self.data.name!r} is {self.data.task} data: adaptation needs one task in both domains.")
        theirs, ours = [str(n) for n in source.label_names or []], [str(n) for n in self.data.label_names or []]
        if theirs and theirs != ours:
            only = sorted(set(theirs) ^ set(ours))
            raise GraftError(f"[target] plugin = {source.name!r} has the labels {theirs[:12]} and [data] plugin = "
                             f"{self.data.name!r} has {ours[:12]}"
                             f"{f' (in one only: {only[:8]})' if only else ' (another order)'}: the source's "
                             f"classifier scores the target, so both need the same classes in the same order. Make "
                             f"the target's labels the source's, or give the target without labels.")
        self.target, self.stream = source, stream

    def build(self):
        model = super().build()
        task = self.task
        if task.features != "pooled" or not task.distillable:
            raise GraftError(f"[strategy] plugin = \"adapt\" adapts a classifier of whole examples; the [data] task "
                             f"is {task.name!r}. Use finetune for it, or classification data.")
        if self.options.select_on == "target":
            if self.target is not None and not self.target.dataset("val"):
                raise GraftError(f"[strategy] select_on = \"target\" picks weights on the target's validation split, "
                                 f"and [target] plugin = {self.target.name!r} has none; give it one "
                                 f"(val_fraction), or select_on = \"source\".")
            self.primary_metric = "target_" + self.primary_metric
        return model

    def make_model(self, head):
        seed = getattr(self.data, "seed", 0)
        return adapt_model(self.backbone.module, head, self.backbone.num_features, self.task.outputs(),
                           self.options, seed)

    def param_groups(self, model):
        groups = super().param_groups(model)
        if self.model.domain is not None:
            groups.append({"params": list(self.model.domain.parameters()), "name": "domain",
                           "lr_scale": self.options.head_lr_scale})
        return groups

    def metric_mode(self, metric):
        if metric.startswith("target_") and metric not in type(self).metric_modes:
            return super().metric_mode(metric[len("target_"):])
        return super().metric_mode(metric)

    def on_step_start(self, step, total_steps):
        self.progress = step / max(1, total_steps)

    # -- the step ------------------------------------------------------------------------------------------
    def coefficient(self) -> float:
        o = self.options
        return dann_coefficient(self.progress, o.gamma) if o.schedule == "dann" else 1.0

    def training_step(self, model, batch):
        import torch

        if self.stream is None:
            raise GraftError("[strategy] plugin = \"adapt\" trains on a target domain: add a [target] table (any data "
                             "source; its labels are used only for scoring).")
        o = self.options
        target = self.stream.next()  # drawn every step, used or not: the target order is the same in every method
        teach = o.self_training and self.progress >= o.self_training_start
        if o.method == "none" and not teach:
            # the source alone: the target must not reach the backbone, or its BatchNorm statistics would adapt to the
            # target domain (AdaBN) and the baseline would not be source-only
            loss = self.loss(*self.task.loss_inputs(model(batch["inputs"]), batch["targets"]))
            return {"loss": loss, "source_loss": loss.detach()}
        strong = self.strong_view(target) if teach else None
        coeff = self.coefficient()
        out = model(batch["inputs"], target["inputs"], strong, coeff)
        source_loss = self.loss(*self.task.loss_inputs(out["source"], batch["targets"]))
        loss, logs = source_loss, {"source_loss": source_loss.detach()}
        if o.method in ("dann", "cdan"):
            weights = None
            if o.method == "cdan" and o.entropy_conditioning:
                p = torch.softmax(torch.cat([out["source"], out["target"]]).float().detach(), 1)
                w = 1.0 + torch.exp(-entropy(p))
                weights = w / w.sum() * len(w)
            transfer = domain_loss(out["domain_source"], out["domain_target"], weights)
            d = torch.cat([out["domain_source"], out["domain_target"]]).squeeze(1).detach()
            truth = torch.cat([torch.ones(len(out["domain_source"])), torch.zeros(len(out["domain_target"]))])
            logs["domain_accuracy"] = ((d > 0).float().cpu() == truth).float().mean()
            logs["coefficient"] = torch.tensor(coeff)
        elif o.method == "mcc":
            transfer = mcc_loss(out["target"], o.mcc_temperature)
        else:
            transfer = None
        if transfer is not None:
            loss = loss + o.trade_off * transfer
            logs["transfer_loss"] = transfer.detach()
        if teach:
            st, kept = self_training_loss(out["target"], out["strong"], o.threshold)
            loss = loss + o.self_training_weight * st
            logs["self_training_loss"], logs["pseudo_labelled"] = st.detach(), kept
        return {"loss": loss, **logs}

    def strong_view(self, target):
        """The target batch strongly augmented, each example from its own seed (the same view under any process
        count and after a resume): images -- affine warps (rotation 30 degrees, shifts 20%, scale 0.75-1.25, shear
        15), contrast and brightness 0.5, Cutout of 5-20% of the image (``v2.RandomErasing``); text -- a share
        ``mask_probability`` of the ordinary tokens replaced by the mask token (unknown token without one)."""
        import torch

        x, seeds = target["inputs"], [self.target.example_seed(i) for i in target["index"].tolist()]
        if isinstance(x, torch.Tensor):
            return self._strong_images(x, seeds)
        tok = self.backbone.tokenizer()
        mask_id = tok.mask_token_id if tok.mask_token_id is not None else tok.unk_token_id
        if mask_id is None:
            raise GraftError(f"[strategy] self_training on text masks tokens of the strong view, and the tokenizer of "
                             f"[backbone] plugin = {self.backbone.name!r} has neither a mask nor an unknown token. Use "
                             f"a tokenizer with one, or self_training = false.")
        special = torch.tensor(sorted(set(tok.all_special_ids)), device=x["input_ids"].device)
        ids = x["input_ids"].clone()
        for row, seed in zip(ids, seeds):
            g = torch.Generator().manual_seed(seed)
            draw = (torch.rand(row.shape, generator=g) < self.options.mask_probability).to(row.device)
            row[draw & ~torch.isin(row, special)] = mask_id
        return {**x, "input_ids": ids}

    def _strong_images(self, x, seeds):
        import torch
        from torchvision.transforms import v2

        cfg = self.backbone.image_config()
        mean = torch.tensor(cfg["mean"], device=x.device).view(-1, 1, 1)
        std = torch.tensor(cfg["std"], device=x.device).view(-1, 1, 1)
        augment = v2.Compose([v2.RandomAffine(degrees=30, translate=(0.2, 0.2), scale=(0.75, 1.25), shear=15),
                              v2.ColorJitter(brightness=0.5, contrast=0.5),
                              v2.RandomErasing(p=1.0, scale=(0.05, 0.2), value=0.0)])
        out = []
        for image, seed in zip(x, seeds):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out.append((augment((image * std + mean).clamp(0, 1)) - mean) / std)
        return torch.stack(out)

    # -- evaluation ----------------------------------------------------------------------------------------
    def eval_step(self, model, batch):
        sums = super().eval_step(model, batch)
        if batch.get("source") == "target":
            return {f"target/{k}": v for k, v in sums.items()}
        return sums

    def compute_metrics(self, sums):
        ours = {k: v for k, v in sums.items() if not k.startswith("target/")}
        theirs = {k[len("target/"):]: v for k, v in sums.items() if k.startswith("target/")}
        metrics = super().compute_metrics(ours) if ours else {}
        if theirs and float(theirs["count"]) > 0:  # a target without labels is not scored
            metrics.update({f"target_{k}": v for k, v in super().compute_metrics(theirs).items()
                            if isinstance(v, (int, float))})
        return metrics

    def report(self, model):
        o = self.options
        chose = ("the target's validation labels: an ORACLE (unsupervised adaptation has no target labels)"
                 if o.select_on == "target" else "the source's validation split")
        return {"method": o.method, "self_training": o.self_training, "weights_chosen_by": chose,
                "target": self.target.name if self.target is not None else None}

    def state_dict(self):
        return {"target_position": self.stream.position if self.stream is not None else 0}

    def load_state_dict(self, state):
        if self.stream is not None:
            self.stream.position = int(state.get("target_position", 0))


def self_training_loss(weak_logits, strong_logits, threshold: float):
    """FixMatch's unlabelled loss: the weak view's prediction (no gradient) becomes the label where its probability
    reaches ``threshold``; cross-entropy of the strong view's logits on those, averaged over the whole batch (a
    pseudo-label below the threshold contributes nothing). Returns (loss, share of the batch pseudo-labelled)."""
    import torch
    import torch.nn.functional as F

    confidence, pseudo = torch.softmax(weak_logits.detach().float(), 1).max(1)
    keep = (confidence >= threshold).float()
    each = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
    return (each * keep).mean(), keep.mean().detach()


@hookimpl
def register_strategies(register):
    register(Adapt, name="adapt")
