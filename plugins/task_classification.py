"""The ``classification`` task: one class per example, a linear (or mlp) head on the pooled features."""

from graft import Task, hookimpl
from graft.supervised import check_class_ids, confusion_metrics, confusion_sums


class Classification(Task):
    """One class per example: softmax over a head on pooled features; accuracy, macro F1, per-class scores."""

    losses = ("cross_entropy",)
    metric_modes = {"accuracy": "max", "macro_f1": "max"}
    distillable = True
    output_shape = "[batch, classes]"

    def check_targets(self, targets):
        check_class_ids(targets, self.data, self.name)

    def eval_sums(self, outputs, targets):
        return confusion_sums(outputs.argmax(1), targets, outputs.shape[1])

    def compute_metrics(self, sums):
        return confusion_metrics(sums, self.label_names)

    def distill_logits(self, student, teacher, targets):
        return student, teacher, targets

    def score(self, outputs):
        import torch

        return float(torch.softmax(outputs.float(), -1).max())

    def predict(self, model, inputs):
        import torch

        names = self.label_names
        probs = torch.softmax(model(inputs).float(), 1)
        top = probs.topk(min(3, probs.shape[1]), dim=1)
        return [{"label": names[int(i[0])], "probability": float(p[0]),
                 "top": [{"label": names[int(j)], "probability": float(q)} for q, j in zip(p, i)]}
                for p, i in zip(top.values, top.indices)]


@hookimpl
def register_tasks(register):
    register(Classification, name="classification")
