"""A third-party strategy in one file: a linear probe with its own tiny head (test fixture)."""

from dataclasses import dataclass

from graft import Strategy, hookimpl, option


@dataclass
class ProbeOptions:
    head_lr_scale: float = option(1.0, "Learning-rate multiplier of the head.")


class DemoProbe(Strategy):
    """Linear probe: the backbone stays frozen, a linear head trains."""

    Options = ProbeOptions
    default_loss = "cross_entropy"
    primary_metric = "accuracy"
    metric_modes = {"accuracy": "max"}

    def build(self):
        from torch import nn

        for p in self.backbone.module.parameters():
            p.requires_grad_(False)
        return nn.ModuleDict({"backbone": self.backbone.module,
                              "head": nn.Linear(self.backbone.num_features, self.data.num_outputs)})

    def param_groups(self, model):
        return [{"params": list(model["head"].parameters()), "lr_scale": self.options.head_lr_scale, "name": "head"}]

    def training_step(self, model, batch):
        logits = model["head"](model["backbone"](batch["inputs"]))
        return {"loss": self.loss(logits, batch["targets"])}

    def eval_step(self, model, batch):
        logits = model["head"](model["backbone"](batch["inputs"]))
        y = batch["targets"]
        return {"correct": (logits.argmax(1) == y).sum(), "count": y.new_tensor(y.shape[0])}

    def compute_metrics(self, sums):
        return {"accuracy": float(sums["correct"]) / float(sums["count"])}


@hookimpl
def register_strategies(register):
    register(DemoProbe, name="demo_probe")
