"""The ``multilabel`` task: any number of labels per example, one sigmoid each."""

from graft import Task, hookimpl


class Multilabel(Task):
    """Any number of labels per example: one sigmoid per label; micro / macro F1 and exact match."""

    losses = ("bce",)
    primary_metric = "micro_f1"  # best weights and early stopping; the strategy's "accuracy" is no multi-label metric
    metric_modes = {"micro_f1": "max", "macro_f1": "max", "exact_match": "max"}
    output_shape = "[batch, labels]"

    def eval_sums(self, outputs, targets):
        import torch

        pred, y = (outputs > 0).long(), targets.long()
        return {"count": torch.tensor(float(y.shape[0]), device=outputs.device),
                "tp": (pred * y).sum(0), "fp": (pred * (1 - y)).sum(0), "fn": ((1 - pred) * y).sum(0),
                "exact": (pred == y).all(1).sum()}

    def compute_metrics(self, sums):
        tp, fp, fn = (sums[k].double() for k in ("tp", "fp", "fn"))
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        return {"micro_f1": float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)),
                "macro_f1": float(f1.mean()), "exact_match": float(sums["exact"]) / float(sums["count"])}

    def predict(self, model, inputs):
        import torch

        names = self.label_names
        probs = torch.sigmoid(model(inputs).float())
        return [{"labels": [names[j] for j in range(len(names)) if p[j] > 0.5],
                 "probabilities": {names[j]: float(p[j]) for j in range(len(names))}} for p in probs]


@hookimpl
def register_tasks(register):
    register(Multilabel, name="multilabel")
