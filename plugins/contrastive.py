"""The ``contrastive`` strategy: embedding transfer -- a pretrained encoder becomes a retrieval / similarity model.

Two kinds of data:

- pairs (``[data] plugin = "pairs"``): (anchor, positive) rows, optionally with hard negatives and a similarity
  score per row. The loss (``[loss]``, default ``infonce``) sees every anchor against every positive and negative of
  the step: in-batch negatives. Under DDP the step's embeddings are gathered from all processes with their gradients
  (``torch.distributed.nn.functional.all_gather``), so 2 processes of batch B train like 1 of batch 2B;
- any other text data (``text``, ``corpus``...): unsupervised SimCSE (Gao, Yao & Chen 2021, "SimCSE: Simple
  Contrastive Learning of Sentence Embeddings"): the positive of a text is the text itself, encoded a second time
  under another dropout mask;
- any image data (``imagefolder``, ``digits``...): SimCLR (Chen, Kornblith, Norouzi & Hinton 2020, "A Simple
  Framework for Contrastive Learning of Visual Representations"): two random augmentations of the same image are
  each other's positives (``crop_scale``, ``color_jitter``). Labels, if any, are not used.

Cached in-batch negatives (``mini_batch_size``): GradCache (Gao, Zhang, Han & Callan 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup"; sentence-transformers' Cached* losses). The step's
embeddings are first computed without a graph, chunk by chunk; the loss and its gradient with respect to every
embedding are computed on them; then each chunk is encoded again (with the same dropout masks: the random state is
replayed) and back-propagated with its cached gradient. Loss and gradients equal the big batch's, with the memory of
one chunk.

Distillation (``teacher``): the student's embeddings of both sides are drawn to a finished contrastive run's
embeddings of the same texts, by mean squared error (Reimers & Gurevych 2020, "Making Monolingual Sentence
Embeddings Multilingual using Knowledge Distillation"), mixed with the loss by ``alpha``.

Evaluation: the loss, and on pairs retrieval over the held-out split -- each anchor against every distinct
positive text of the split: Recall@1, Recall@10, MRR@10, nDCG@10 -- or, for scored pairs, Spearman's rho between
cosine similarity and score (scipy.stats). ``graft predict RUN --file texts.txt --json`` gives embeddings;
``graft export`` (and every finished run) writes ``sentence-transformers/``, a folder that
``sentence_transformers.SentenceTransformer(path)`` loads (Transformer, Pooling, Normalize modules).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from graft import GraftError, Strategy, hookimpl, option, warn


@dataclass
class ContrastiveOptions:
    normalize: bool = option(True, "Embeddings are L2-normalised (unit length): dot product = cosine similarity.")
    mini_batch_size: int = option(0, "GradCache: encode the step's texts in chunks of this many, so that a large "
                                     "batch of in-batch negatives fits in memory (same loss and gradients); 0 = off.")
    gather: bool = option(True, "Under DDP, every process's embeddings are negatives for every other's (2 processes "
                                "of batch B = 1 of 2B). False: each process's own batch only.")
    teacher: str = option("", "Distil a finished contrastive run: the mean squared error between this model's and "
                              "the teacher's embeddings of the same texts (Reimers & Gurevych 2020).", path=True)
    alpha: float = option(1.0, "With teacher: weight of the embedding MSE; the [loss] gets 1 - alpha.")
    tower: dict = option(help="Two towers: a [backbone]-style table (e.g. { plugin = \"hf\", weights = \"DIR\" }) "
                              "of the network that embeds the positives and negatives (text); the [backbone] "
                              "embeds the anchors (text, or images with [data] source_images). Empty: one network "
                              "for both sides.", default_factory=dict)
    lock: Literal["none", "anchors", "positives"] = option(
        "none", "Two towers: the tower that does not train (LiT, Zhai et al. 2022: e.g. an image tower learning to "
                "meet a locked text tower = lock \"positives\"); a locked tower stays in eval mode.")
    projection_dim: int = option(0, "Two towers: a trained linear projection of each unlocked tower to this width "
                                    "(needed when the towers' widths differ and neither is locked; with a locked "
                                    "tower, 0 projects the other tower to the locked one's width).")
    freeze_layers: int = option(0, "The first N layer groups of the [backbone] do not train (embeddings first, then "
                                   "each block: Backbone.layer_groups()).")
    crop_scale: float = option(0.2, "Unlabelled images (SimCLR): each view is a random crop of at least this "
                                    "fraction of the image's area, resized back (SimCLR's 0.08 for ImageNet-sized "
                                    "images; larger for small ones).")
    color_jitter: float = option(0.4, "Unlabelled images: strength of the views' colour distortion (brightness, "
                                      "contrast, saturation; hue at a quarter of it), applied with probability 0.8, "
                                      "then grey scale with probability 0.2; 0 = crops and flips only.")

    def validate(self):
        if self.mini_batch_size < 0 or self.freeze_layers < 0:
            raise ValueError("mini_batch_size and freeze_layers must be >= 0.")
        if not 0 < self.crop_scale <= 1 or not 0 <= self.color_jitter <= 1:
            raise ValueError("crop_scale must be in (0, 1] and color_jitter in [0, 1].")
        if not 0 <= self.alpha <= 1:
            raise ValueError("alpha must be in [0, 1].")
        for key in ("weights", "tokenizer"):  # as top-level path options: absolute, so a saved config reloads anywhere
            value = self.tower.get(key)
            if isinstance(value, str) and value and not value.startswith("pkg:"):
                self.tower = {**self.tower, key: str(Path(value).expanduser().absolute())}


def retrieval_metrics(anchors, candidates, relevant, ks=(1, 10)) -> dict:
    """Recall@k, MRR@10 and nDCG@10 of retrieving, for each anchor (row of ``anchors`` [n, D]), its relevant
    candidate among ``candidates`` [m, D] by dot product (cosine for unit vectors): ``relevant`` is its index
    (long ``[n]``), or a bool ``[n, m]`` mask when an anchor has several -- then the first relevant one found counts
    (success@k, and the reciprocal rank and gain of that one). Ties count against the anchor. Means over anchors,
    in [0, 1]."""
    import torch

    ranks = []
    for i in range(0, len(anchors), 1024):
        s = anchors[i:i + 1024].float() @ candidates.float().T
        mask = relevant[i:i + 1024]
        if mask.dtype != torch.bool:
            mask = torch.zeros_like(s, dtype=torch.bool).scatter_(1, mask[:, None], True)
        best = s.masked_fill(~mask, float("-inf")).max(1, keepdim=True).values
        ranks.append(((s >= best) & ~mask).sum(1) + 1)  # 1 = first
    r = torch.cat(ranks).double()
    out = {f"recall@{k}": float((r <= k).double().mean()) for k in ks}
    top = r <= 10
    out["mrr@10"] = float(torch.where(top, 1 / r, torch.zeros_like(r)).mean())
    out["ndcg@10"] = float(torch.where(top, 1 / torch.log2(r + 1), torch.zeros_like(r)).mean())
    return out


class _Replay:
    """GradCache's second pass, as an autograd function: ``apply(dummy, loss)`` returns the loss; its backward
    encodes each chunk again under the random state of its first pass and back-propagates the cached gradient of
    its embeddings (times the incoming gradient: the loop's loss scale and accumulation share)."""

    @staticmethod
    def make(strategy, base, chunks, grads, autocast, world, mean=False):
        import torch

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, dummy, loss):
                return loss.detach().clone()

            @staticmethod
            def backward(ctx, g):
                params = [p for p in base.parameters() if p.requires_grad]
                # under DDP the encoder ran outside DDP's forward: this step's gradients are summed here by hand
                kept = [p.grad for p in params] if world > 1 else None
                if kept is not None:
                    for p in params:
                        p.grad = None
                device = g.device
                for (side, inputs, state), grad in zip(chunks, grads):
                    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                        torch.set_rng_state(state[0])
                        if state[1] is not None:
                            torch.cuda.set_rng_state(state[1], device)
                        with torch.enable_grad(), torch.autocast(device.type, dtype=autocast[1],
                                                                 enabled=autocast[0]):
                            e = strategy.encode(base, inputs, side)
                        torch.autograd.backward(e.float(), grad * g)
                if kept is not None:
                    _sum_gradients(params, kept, world if mean else 1)
                return None, None

        return Replay


def _sum_gradients(params, kept, divide: int = 1) -> None:
    """Sum this step's gradients of ``params`` over processes (one flat all-reduce; divided by ``divide``: the
    world size gives DDP's mean), then add back the gradients ``kept`` from earlier micro-batches. A parameter no
    process gave a gradient keeps none (the optimizer skips it, weight decay included), as under DDP."""
    import torch
    import torch.distributed as td

    used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    td.all_reduce(used)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    td.all_reduce(flat)
    if divide > 1:
        flat /= divide
    at = 0
    for p, k, u in zip(params, kept, used.tolist()):
        n = p.numel()
        if u:
            p.grad = flat[at:at + n].view_as(p).to(p.dtype) + (k if k is not None else 0)
        else:
            p.grad = k
        at += n


class Contrastive(Strategy):
    """Embedding training (retrieval, similarity): in-batch negatives, CoSENT, triplet; SimCSE; GradCache; KD."""

    Options = ContrastiveOptions
    default_loss = "infonce"
    supports_adapters = True
    primary_metric = "recall@1"
    metric_modes = {"loss": "min", "recall@1": "max", "recall@10": "max", "mrr@10": "max", "ndcg@10": "max",
                    "spearman": "max"}

    def build(self):
        o = self.options
        self.pairs = self.data.task == "seq2seq"  # the pairs source
        self.images = not self.pairs and self.backbone.modality == "image"  # SimCLR's two augmented views
        needs = getattr(self.loss, "needs", None)
        if needs is None:
            raise GraftError(f"[loss] plugin = {self.loss.name!r} is not an embedding loss: use \"infonce\", "
                             f"\"cosent\" (scored pairs) or \"triplet\".")
        self.scored = self.pairs and self._scored()
        if needs == "scores" and not self.scored and not self.predicting:
            raise GraftError(f"[loss] plugin = {self.loss.name!r} learns from scored pairs: set [data] score_column "
                             f"(a similarity per row), or use \"infonce\".")
        self.primary_metric = "spearman" if self.scored else "recall@1" if self.pairs else "loss"
        self.tower = self._tower() if o.tower else None
        if o.lock != "none" and self.tower is None:
            raise GraftError(f"[strategy] lock = \"{o.lock}\" locks one of two towers: set [strategy] tower (a "
                             f"second backbone for the positives), or remove lock.")
        images_out = self.pairs and getattr(self.data.options, "target_images", False)
        if images_out and self.tower is None and self.backbone.modality != "image":
            raise GraftError("[data] target_images = true with a text [backbone]: the target images need an image "
                             "tower. Set [strategy] tower = { plugin = \"timm\", model = \"...\" }.")
        if self.pairs and self.backbone.modality == "image" and self.tower is None and not images_out:
            raise GraftError("[strategy] plugin = \"contrastive\" on image sources: the target texts need a text "
                             "tower. Set [strategy] tower = { plugin = \"hf\", weights = \"DIR\" } (and lock = "
                             "\"positives\" to keep it as it is: LiT).")
        self.model = embedder(self.backbone.module, o.normalize, *self._towers())
        project = getattr(self.model, "project", {})
        #: the embeddings' width (a projection's, with two towers)
        self.dim = project["anchors"].out_features if "anchors" in project else int(self.backbone.num_features)
        self.teacher = None
        if o.teacher and not self.predicting:
            self.teacher = self._load_teacher(o.teacher)
        groups = self.backbone.layer_groups()
        if o.freeze_layers > len(groups):
            raise GraftError(f"[strategy] freeze_layers = {o.freeze_layers}: backbone {self.backbone.name!r} has "
                             f"{len(groups)} layer groups. Use at most {len(groups)}.")
        params = dict(self.backbone.module.named_parameters())
        for name in (n for g in groups[: o.freeze_layers] for n in g):
            params[name].requires_grad_(False)
        return self.model

    def _tower(self):
        from graft import create

        o = self.options
        tower = create("backbone", o.tower, where="[strategy] tower")
        tower.build()
        if not self.pairs:
            raise GraftError("[strategy] tower: two towers need (anchor, positive) pairs: [data] plugin = \"pairs\".")
        wanted = "image" if getattr(self.data.options, "target_images", False) else "text"
        if tower.modality != wanted:
            raise GraftError(f"[strategy] tower: the second tower embeds the targets, which are {wanted}s here "
                             f"([data] target_images = {str(wanted == 'image').lower()}); backbone {tower.name!r} "
                             f"takes {tower.modality}.")
        if tower.modality == "image":
            from torchvision.transforms import v2 as T
            import torch

            cfg = tower.image_config()
            size = tuple(cfg["size"])
            gray = [T.Grayscale(1)] if cfg["channels"] == 1 else []
            self.tower_tf = T.Compose(gray + [T.Resize(int(round(size[0] / 0.875))), T.CenterCrop(size),
                                              T.ToImage(), T.ToDtype(torch.float32, scale=True),
                                              T.Normalize(cfg["mean"], cfg["std"])])
        elif tower.tokenizer() is None:
            raise GraftError(f"[strategy] tower: backbone {tower.name!r} has no tokenizer; give it one (tokenizer = "
                             f"\"DIR\").")
        return tower

    def _towers(self):
        """(tower module, {side: projection}) for the embedder: projections to a common width (see projection_dim),
        and the locked side frozen."""
        import torch

        if self.tower is None:
            return None, {}, None
        o = self.options
        widths = {"anchors": self.backbone.num_features, "positives": self.tower.num_features}
        locked = {"anchors": self.backbone.module, "positives": self.tower.module}.get(o.lock)
        if locked is not None:
            locked.requires_grad_(False)
        target = o.projection_dim or (widths[o.lock] if o.lock != "none" else 0)
        if not target and widths["anchors"] != widths["positives"]:
            raise GraftError(f"[strategy] tower: the towers give {widths['anchors']} and {widths['positives']} "
                             f"features and neither is locked; set projection_dim (e.g. 256) to project both to "
                             f"one width.")
        projections = {side: torch.nn.Linear(w, target, bias=False) for side, w in widths.items()
                       if target and side != o.lock and (o.projection_dim or w != target)}
        return self.tower.module, projections, locked

    def _scored(self) -> bool:
        for split in ("train", "val", "test"):
            ds = self.data.dataset(split) if not self.predicting else None
            if ds:
                return ds[0][6] is not None
        return False

    def _load_teacher(self, path):
        from graft import load_run

        run = load_run(Path(path), for_prediction=True, device="cpu")
        if not isinstance(run.strategy, Contrastive):
            raise GraftError(f"[strategy] teacher = {path!r} is a {run.strategy.name!r} run; embedding distillation "
                             f"needs a contrastive run.")
        if not self.pairs and run.backbone.tokenizer().get_vocab() != self.backbone.tokenizer().get_vocab():
            raise GraftError(f"[strategy] teacher = {path!r} has another vocabulary than this backbone: on plain "
                             f"text the teacher reads the student's token ids. Use pairs data (each side read by its "
                             f"own tokenizer), or a student with the teacher's tokenizer.")
        if run.strategy.dim != self.dim:
            raise GraftError(f"[strategy] teacher = {path!r} gives {run.strategy.dim}-dimensional "
                             f"embeddings and this model {self.dim}: the squared error compares "
                             f"them dimension by dimension. Use a student of the same width.")
        self.teacher_run = run
        return run.model.eval().requires_grad_(False)

    # -- encoding ----------------------------------------------------------------------------------------------
    def encode(self, model, inputs, side: str = "anchors"):
        """[B, D] float32 embeddings of prepared inputs (unit length with ``normalize``) of ``side`` ("anchors", or
        "positives" / "negatives": the tower's, with two towers) through ``model``, the strategy's module (or DDP
        around it, whose forward this bypasses)."""
        return getattr(model, "module", model).embed(inputs, side)

    def _sides(self, batch) -> dict:
        if self.pairs and self.tower is not None:  # the tower's own tokenizer reads the target texts
            sides = {"anchors": batch["inputs"], "positives": self._tower_inputs(batch["references"], batch)}
            if batch.get("negative_texts"):
                sides["negatives"] = self._tower_inputs(batch["negative_texts"], batch)
            return sides
        if self.pairs:
            sides = {"anchors": batch["inputs"], "positives": batch["positives"]}
            if "negatives" in batch:
                sides["negatives"] = batch["negatives"]
            return sides
        if self.images:
            return {"anchors": self._views(batch, 0), "positives": self._views(batch, 1)}
        return {"anchors": batch["inputs"], "positives": batch["inputs"]}  # SimCSE: a second dropout mask

    def _tower_inputs(self, texts, batch):
        """The tower's inputs of target texts (its own tokenizer) or image paths (its own preprocessing)."""
        device = _first(batch["inputs"]).device
        if self.tower.modality == "image":
            import torch

            from graft.data import open_image

            return torch.stack([self.tower_tf(open_image(path)) for path in texts]).to(device)
        enc = self.tower.tokenizer()(list(texts), truncation=True, max_length=self.data.max_target, padding=True,
                                     return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def _views(self, batch, view: int):
        """One augmented view of each image of the batch (SimCLR, Chen et al. 2020: random resized crop, flip, colour
        distortion, grey scale; torchvision.transforms.v2), each drawn from a seed of the example, the epoch and the
        view (``DataSource.example_seed``): the same views with any number of processes, and after a resume.
        Evaluation draws from the example alone, so every evaluation sees the same views."""
        import torch
        from torchvision.transforms import v2

        x = batch["inputs"]
        cfg = self.backbone.image_config()
        mean = torch.tensor(cfg["mean"], device=x.device).view(-1, 1, 1)
        std = torch.tensor(cfg["std"], device=x.device).view(-1, 1, 1)
        o, s = self.options, self.options.color_jitter
        steps = [v2.RandomResizedCrop(tuple(x.shape[-2:]), scale=(o.crop_scale, 1.0), antialias=True),
                 v2.RandomHorizontalFlip()]
        if s > 0:
            steps += [v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8)]
            if x.shape[1] == 3:
                steps += [v2.RandomGrayscale(p=0.2)]
        augment = v2.Compose(steps)
        out = []
        for image, index in zip(x, batch["index"].tolist()):
            seed = self.data.example_seed(index) if batch.get("split") == "train" else index
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((seed * 2 + view) % (1 << 63))
                out.append((augment((image * std + mean).clamp(0, 1)) - mean) / std)
        return torch.stack(out)

    def _teacher_embeddings(self, batch) -> dict | None:
        import torch

        if self.teacher is None:
            return None
        t = self.teacher_run
        ds = self.data.dataset(batch["split"])
        rows = [ds[i] for i in batch["index"].tolist()]
        texts = {"anchors": [r[3] for r in rows], "positives": [r[2] for r in rows]} if self.pairs else None
        device = _first(batch["inputs"]).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        out = {}
        with torch.no_grad():
            for side in ("anchors", "positives"):
                if texts is None:  # SimCSE data: the teacher reads the same token ids (same tokenizer required)
                    inputs = batch["inputs"]
                else:
                    inputs = {k: v.to(device) for k, v in t.data.encode(t.backbone, texts[side]).items()}
                out[side] = t.strategy.encode(self.teacher, inputs)
        return out

    # -- the objective -----------------------------------------------------------------------------------------
    def _gathered(self, emb: dict, batch: dict, mode: str):
        """The step's embeddings of every process (rank-major), the hard negatives' rows offset to the gathered rows,
        and the scores. ``mode``: "grad" (gathered with their gradients), "leaves" (the others' without; this
        process's own tensors kept, GradCache's leaves) or "local" (no gathering: evaluation, where processes may
        hold different numbers of batches)."""
        import torch
        import torch.distributed as td

        scores = batch.get("scores")
        rows = batch.get("negative_rows")
        if mode == "local" or not (self.options.gather and td.is_available() and td.is_initialized()
                                   and td.get_world_size() > 1):
            return dict(emb), rows, scores
        grad = mode == "grad"
        w, rank = td.get_world_size(), td.get_rank()
        n_local = emb["anchors"].shape[0]
        counts = torch.tensor([n_local, len(rows) if rows is not None else 0], device=emb["anchors"].device)
        sizes = [torch.zeros_like(counts) for _ in range(w)]
        td.all_gather(sizes, counts)
        sizes = torch.stack(sizes).tolist()

        def gather(t, n_max, fill=0.0):
            pad = torch.full((n_max - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            t = torch.cat([t, pad])
            if grad and t.is_floating_point():
                import warnings

                import torch.distributed.nn.functional as dnn

                with warnings.catch_warnings():  # "deprecated" for a private module's function; still the public one
                    warnings.simplefilter("ignore", FutureWarning)
                    return list(dnn.all_gather(t))
            parts = [torch.empty_like(t) for _ in range(w)]
            td.all_gather(parts, t.detach())
            return parts

        n_rows, n_neg = max(s[0] for s in sizes), max(s[1] for s in sizes)
        out = {}
        for side in ("anchors", "positives"):
            parts = gather(emb[side], n_rows)
            if not grad:  # the local part keeps its graph (GradCache's leaves)
                parts[rank] = emb[side]
            out[side] = torch.cat([p[: s[0]] for p, s in zip(parts, sizes)])
        if n_neg:
            local = emb.get("negatives")
            if local is None:  # a slice keeps the graph: every process must run the gather's backward
                local = emb["anchors"][:0]
            parts = gather(local, n_neg)
            if not grad:
                parts[rank] = local
            out["negatives"] = torch.cat([p[: s[1]] for p, s in zip(parts, sizes)])
            r = rows if rows is not None else torch.zeros(0, dtype=torch.long, device=local.device)
            r_parts = gather(r, n_neg, fill=0)
            base = [sum(s[0] for s in sizes[:k]) for k in range(w)]
            rows = torch.cat([p[: s[1]] + b for p, s, b in zip(r_parts, sizes, base)])
        if scores is not None:
            s_parts = gather(scores.float(), n_rows)
            scores = torch.cat([p[: s[0]] for p, s in zip(s_parts, sizes)])
        return out, rows, scores

    def _objective(self, emb: dict, batch: dict, teacher: dict | None, mode: str = "grad"):
        """The loss of the step's embeddings ``emb`` (this process's rows; gathered inside, see ``_gathered``)."""
        import torch.nn.functional as F

        everyone, rows, scores = self._gathered(emb, batch, mode)
        if rows is not None:
            everyone["negative_rows"] = rows
        loss = self.loss(everyone, scores) if self.options.alpha < 1 or teacher is None else None
        if teacher is None:
            return loss
        t, _, _ = self._gathered(teacher, batch, "local" if mode == "local" else "leaves")
        mse = (F.mse_loss(everyone["anchors"], t["anchors"]) + F.mse_loss(everyone["positives"], t["positives"])) / 2
        a = self.options.alpha
        return mse if loss is None else a * mse + (1 - a) * loss

    def training_step(self, model, batch):
        sides = self._sides(batch)
        teacher = self._teacher_embeddings(batch)
        chunk = self.options.mini_batch_size
        if chunk and _first(batch["inputs"]).shape[0] > chunk:
            return {"loss": self._cached_step(model, sides, batch, teacher, chunk)}
        return {"loss": self._objective(model(sides), batch, teacher)}

    def _cached_step(self, model, sides, batch, teacher, chunk):
        """GradCache (see the module's docstring): the loss, whose backward replays the chunks."""
        import torch
        import torch.distributed as td

        base = getattr(model, "module", model)
        if any(type(p).__name__ == "DTensor" for p in base.parameters()):
            raise GraftError("[strategy] mini_batch_size (GradCache) with [train] parallel = \"fsdp\": FSDP reduces "
                             "gradients during the replayed backward itself. Use DDP (parallel = \"ddp\") or set "
                             "mini_batch_size = 0.")
        device = _first(batch["inputs"]).device
        chunks, emb = [], {}
        with torch.no_grad():
            for side, inputs in sides.items():
                parts = []
                n = _first(inputs).shape[0]
                for i in range(0, n, chunk):
                    piece = inputs[i:i + chunk] if not isinstance(inputs, dict) else \
                        {k: v[i:i + chunk] for k, v in inputs.items()}
                    state = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda"
                             else None)
                    parts.append(self.encode(base, piece, side))
                    chunks.append((side, piece, state))
                emb[side] = torch.cat(parts).detach()
        trained = {side: self._trains(side) for side in emb}  # a locked tower's side needs no replay
        for side, e in emb.items():
            e.requires_grad_(trained[side])
        with torch.enable_grad():
            loss = self._objective(emb, batch, teacher, "leaves")
            leaves = [e for side, e in emb.items() if trained[side]]
            # a side the loss does not read (negatives under CoSENT) has no gradient: its chunks are not replayed
            grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
        per_side = dict(zip([side for side in emb if trained[side]], grads))
        kept, cached, offsets = [], [], {}
        for side, piece, state in chunks:
            at, n = offsets.get(side, 0), _first(piece).shape[0]
            offsets[side] = at + n
            if per_side.get(side) is not None:
                kept.append((side, piece, state))
                cached.append(per_side[side][at:at + n])
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        world = td.get_world_size() if td.is_available() and td.is_initialized() else 1
        # gathered negatives: each process's gradient is its share of the one loss (summed); else each process has
        # its own loss, and DDP's mean is what the plain step gets
        mean = world > 1 and not self.options.gather
        dummy = torch.zeros((), device=device, requires_grad=True)
        return _Replay.make(self, model, kept, cached, autocast, world, mean).apply(dummy, loss.detach())

    def _trains(self, side: str) -> bool:
        """Whether ``side``'s embeddings depend on trained parameters (not a locked tower's side)."""
        o = self.options
        if self.tower is None or o.lock == "none":
            return True
        return (side == "anchors") != (o.lock == "anchors")

    # -- evaluation --------------------------------------------------------------------------------------------
    def eval_step(self, model, batch):
        import torch

        emb = model(self._sides(batch))
        n = emb["anchors"].shape[0]
        loss = self._objective(emb, batch, self._teacher_embeddings(batch), "local")
        out = {"loss_sum": loss.detach().float() * n, "rows": torch.tensor(float(n))}
        if self.pairs:
            out["embedded"] = [(batch["index"].cpu(), emb["anchors"].detach().float().cpu(),
                                emb["positives"].detach().float().cpu(), list(batch["references"]),
                                batch["scores"].cpu() if "scores" in batch else None, list(batch["sources"]))]
        return out

    def compute_metrics(self, sums):
        import torch

        out = {"loss": float(sums["loss_sum"]) / max(1.0, float(sums["rows"]))}
        parts = sums.get("embedded") or []
        if not parts:
            return out
        parts.sort(key=lambda p: int(p[0][0]) if len(p[0]) else 0)
        anchors = torch.cat([p[1] for p in parts])
        positives = torch.cat([p[2] for p in parts])
        texts = [t for p in parts for t in p[3]]
        if self.scored:
            from scipy.stats import spearmanr

            scores = torch.cat([p[4] for p in parts])
            cos = torch.nn.functional.cosine_similarity(anchors, positives, dim=-1)
            rho = float(spearmanr(cos.numpy(), scores.numpy()).statistic)
            out["spearman"] = rho if rho == rho else 0.0  # constant embeddings: no correlation (NaN would stick)
            return out
        first: dict[str, int] = {}
        for i, t in enumerate(texts):  # one candidate per distinct positive text
            first.setdefault(t, i)
        keep = sorted(first.values())
        where = {i: k for k, i in enumerate(keep)}
        queries: dict[str, int] = {}  # one query per distinct anchor text, relevant: each of its positives
        for i, a in enumerate(t for p in parts for t in p[5]):
            queries.setdefault(a, len(queries))
        rows = [queries[a] for p in parts for a in p[5]]
        relevant = torch.zeros(len(queries), len(keep), dtype=torch.bool)
        relevant[torch.tensor(rows), torch.tensor([where[first[t]] for t in texts])] = True
        pick = sorted({q: i for i, q in reversed(list(enumerate(rows)))}.values())
        anchors = anchors[pick]
        candidates = positives[keep]
        if not self.options.normalize:
            import torch.nn.functional as F

            anchors, candidates = F.normalize(anchors, dim=-1), F.normalize(candidates, dim=-1)
        out.update(retrieval_metrics(anchors, candidates, relevant), candidates=len(keep))
        return out

    # -- batches, prediction, export ---------------------------------------------------------------------------
    def batch_keys(self, split):
        """Each training row's texts (anchor, positive, negatives): rows sharing one never meet in a step."""
        ds = self.data.dataset(split) if not self.images and not self.pairs else None  # images: not all read
        if not ds and not self.pairs:
            return None
        if self.pairs:
            return [frozenset((source, target, *negatives)) for source, target, negatives in self.data.texts(split)]
        first = ds[0][0] if isinstance(ds[0], tuple) else None
        if isinstance(first, (list, tuple)):
            return [frozenset([tuple(e[0])]) for e in ds]
        return None

    def predict(self, model, inputs):
        import torch

        with torch.no_grad():
            e = self.encode(model, inputs)
        return [{"embedding": [round(float(x), 7) for x in row]} for row in e.float().cpu()]

    def serving_model(self, model):
        """The encoder with pooling (and normalisation) as one module: prepared inputs -> ``embeddings`` [B, D], for
        ``graft export --format onnx``."""
        import torch

        class Encoder(torch.nn.Module):
            def __init__(self, embedder):
                super().__init__()
                self.embedder = embedder

            def forward(self, inputs):
                return self.embedder.embed(inputs)

        return Encoder(getattr(model, "module", model)).eval(), ("embeddings",), \
            f"[batch, {self.dim}]"

    def report(self, model):
        return {"embedding_dim": self.dim, "normalize": self.options.normalize}

    def export(self, model, directory):
        """backbone/ and, for one hf text backbone, sentence-transformers/: the backbone's folder with modules.json,
        sentence_bert_config.json, 1_Pooling/ (the backbone's pooling) and 2_Normalize/ (with normalize); with two
        towers, backbone/ and tower/."""
        d = Path(directory, "backbone")
        d.mkdir(exist_ok=True)
        self.backbone.export(str(d))
        if self.tower is not None:  # two towers: each in its family's format; the projections are in the weights
            Path(directory, "tower").mkdir(exist_ok=True)
            self.tower.export(str(Path(directory, "tower")))
            return
        pooling = getattr(getattr(self.backbone, "options", None), "pooling", None)
        if self.backbone.modality != "text":
            return
        if pooling not in ("mean", "cls"):
            warn(f"contrastive: no sentence-transformers/ folder: it has no module for pooling {pooling!r}; use "
                 f"[backbone] pooling = \"mean\" or \"cls\" for one.")
            return
        st = Path(directory, "sentence-transformers")
        st.mkdir(exist_ok=True)
        self.backbone.export(str(st))
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.options.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
            (st / "2_Normalize").mkdir(exist_ok=True)
        (st / "modules.json").write_text(json.dumps(modules, indent=2))
        limit = getattr(self.data, "max_source", None) or getattr(self.data.options, "max_length", 0) or \
            min(256 if not self.pairs else 512, self.backbone.limits().get("max_tokens") or 512)
        (st / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": int(limit),
                                                                  "do_lower_case": False}, indent=2))
        (st / "1_Pooling").mkdir(exist_ok=True)
        (st / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": int(self.backbone.num_features), "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True}, indent=2))


def _first(inputs):
    """The tensor of prepared inputs (images) or the first of a dict of them (token ids): for rows and device."""
    return inputs if not isinstance(inputs, dict) else next(iter(inputs.values()))


def embedder(encoder, normalize: bool, tower=None, projections=None, locked=None):
    """The strategy's module: ``forward(sides)`` maps each side's prepared inputs to its ``[rows, D]`` embeddings in
    one call (DDP prepares one gradient reduction for all of them); ``embed(inputs, side)`` one side's. With a
    ``tower``, positives and negatives go through it; ``projections`` ({"anchors" / "positives": Linear}) map a
    tower to the common width; the ``locked`` module stays in eval mode."""
    import torch
    import torch.nn.functional as F

    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            if tower is not None:
                self.tower = tower
            if projections:
                self.project = torch.nn.ModuleDict(projections)

        def embed(self, inputs, side: str = "anchors"):
            key = "anchors" if side == "anchors" or tower is None else "positives"
            e = (self.encoder if key == "anchors" else self.tower)(inputs)
            e = e[0] if isinstance(e, tuple) else e
            if projections and key in self.project:
                e = self.project[key](e)
            return F.normalize(e.float(), dim=-1) if normalize else e.float()

        def forward(self, sides: dict) -> dict:
            return {side: self.embed(inputs, side) for side, inputs in sides.items()}

        def train(self, mode: bool = True):
            super().train(mode)
            if locked is not None:
                locked.eval()
            return self

    return Embedder()


@hookimpl
def register_strategies(register):
    register(Contrastive, name="contrastive")
