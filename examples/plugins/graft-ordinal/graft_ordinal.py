"""Ordinal regression as a graftkit task plugin, in one file, with no change to graftkit.

Ordered classes (ratings 1 < 2 < ... < 5, grades, ages in bands) are neither independent classes (cross-entropy
forgets the order) nor one number (regression assumes equal steps). The cumulative-link model used here (Frank &
Hall, ECML 2001; CORAL, Cao, Mirjalili & Raschka 2020, without its shared weights) learns K - 1 binary questions "is
the rank above k?": the head outputs ``[batch, K - 1]`` logits, trained with the built-in ``bce`` loss against
``rank > k`` targets. The predicted rank is the number of questions answered yes.

Registers the task ``ordinal`` and the data source ``ranked``, which reads any other data source and calls its
labels ranks in their order (``[data] plugin = "ranked"`` with ``source = { plugin = "digits" }``), so that
``finetune``, ``distill``, ``graft predict`` and ``graft export --format onnx`` all work on ordinal data.
"""

from dataclasses import dataclass, field

from graft import UNLABELLED, DataSource, GraftError, Task, create, hookimpl


class Ordinal(Task):
    """Ordered classes: K - 1 cumulative logits "rank > k" with BCE; MAE in ranks (best weights), accuracy."""

    losses = ("bce",)
    primary_metric = "mae"
    metric_modes = {"mae": "min", "rmse": "min", "accuracy": "max"}
    distillable = True  # the cumulative probabilities give a distribution over ranks (distill_logits)
    output_names = ("cumulative_logits",)
    output_shape = "[batch, ranks - 1]"

    def outputs(self):
        return max(1, self.data.num_outputs - 1)

    def check_targets(self, targets):
        k = self.data.num_outputs
        if k < 2:
            raise GraftError(f"[data] plugin = \"{self.data.name}\": the ordinal task needs at least 2 ranks, got {k}.")
        bad = targets[(targets < 0) | (targets >= k)]
        if len(bad):
            hint = " (an unlabelled example: ordinal data must be fully labelled)" if int(bad[0]) == UNLABELLED else ""
            raise GraftError(f"[data] plugin = \"{self.data.name}\" gives rank {int(bad[0])}{hint}; the ordinal "
                             f"task takes ranks 0..{k - 1} ({', '.join(map(str, self.label_names))}).")

    def loss_inputs(self, outputs, targets):
        import torch

        thresholds = torch.arange(outputs.shape[1], device=targets.device)
        return outputs, (targets.unsqueeze(1) > thresholds).float()  # [B, K - 1]: is the rank above k?

    def ranks(self, outputs):
        return (outputs > 0).sum(1)

    def eval_sums(self, outputs, targets):
        import torch

        err = (self.ranks(outputs) - targets).float()
        return {"count": torch.tensor(float(targets.shape[0]), device=outputs.device), "abs_err": err.abs().sum(),
                "sq_err": (err ** 2).sum(), "correct": (err == 0).sum()}

    def compute_metrics(self, sums):
        n = float(sums["count"])
        return {"mae": float(sums["abs_err"]) / n, "rmse": (float(sums["sq_err"]) / n) ** 0.5,
                "accuracy": float(sums["correct"]) / n}

    def rank_log_probs(self, outputs):
        """``[B, K - 1]`` cumulative logits -> ``[B, K]`` log P(rank = k): differences of P(rank > k)."""
        import torch

        above = torch.sigmoid(outputs.float())
        ones, zeros = above.new_ones(len(above), 1), above.new_zeros(len(above), 1)
        cumulative = torch.cat([ones, above, zeros], 1)  # P(rank > -1) = 1 ... P(rank > K - 1) = 0
        return (cumulative[:, :-1] - cumulative[:, 1:]).clamp(min=1e-6).log()

    def distill_logits(self, student, teacher, targets):
        return self.rank_log_probs(student), self.rank_log_probs(teacher), targets

    def predict(self, model, inputs):
        outputs = model(inputs).float()
        probs, ranks = self.rank_log_probs(outputs).exp(), self.ranks(outputs)
        names = self.label_names
        return [{"label": names[int(r)], "rank": int(r), "probability": float(p[int(r)]),
                 "probabilities": {names[k]: float(p[k]) for k in range(len(names))}} for r, p in zip(ranks, probs)]


@dataclass
class RankedOptions:
    source: dict = field(default_factory=dict, metadata={
        "help": "The [data] table of the data source whose labels are ranks, in their order: { plugin = ..., ... }."})

    def validate(self):
        if not self.source.get("plugin"):
            raise ValueError("source needs plugin = \"...\", like a [data] table.")


class Ranked(DataSource):
    """Another data source's labels read as ordered ranks (task "ordinal"): source = { plugin = ..., ... }."""

    Options = RankedOptions
    task = "ordinal"

    def inner(self) -> DataSource:
        if getattr(self, "_inner", None) is None:
            self._inner = create("data", self.options.source, where="[data] source")
            if self._inner.task != "classification":
                raise GraftError(f"[data] source: plugin {self._inner.name!r} has task {self._inner.task!r}; ranks "
                                 f"come from class labels.")
        return self._inner

    def setup(self, backbone, seed):
        inner = self.inner()
        inner.seed = seed
        inner.setup(backbone, seed)
        self.label_names = list(inner.label_names or [])

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.inner().set_epoch(epoch)

    def dataset(self, split):
        return self.inner().dataset(split)

    def collate(self, examples):
        return self.inner().collate(examples)

    def encode(self, backbone, items):
        return self.inner().encode(backbone, items)

    def report(self):
        return self.inner().report()


@hookimpl
def register_tasks(register):
    register(Ordinal, name="ordinal")


@hookimpl
def register_datasources(register):
    register(Ranked, name="ranked")
