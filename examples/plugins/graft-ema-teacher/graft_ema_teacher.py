"""Self-distillation from an EMA teacher, as a graftkit plugin in one file.

The teacher is an exponential moving average of the student's own weights (mean teacher; Tarvainen & Valpola,
2017). Each step the student learns from the labels and from the teacher's softened predictions; the EMA lives in
the strategy's checkpoint state, so --resume continues it exactly. Registers the strategy ``ema_teacher`` and the
loss ``soft_ce`` (cross-entropy against soft targets).
"""

from dataclasses import dataclass

from graft import Loss, Strategy, hookimpl, option


@dataclass
class EMATeacherOptions:
    decay: float = option(0.99, "EMA decay per optimizer step: teacher = decay * teacher + (1 - decay) * student.")
    weight: float = option(0.5, "Weight of the teacher term; the label term gets 1 - weight.")
    temperature: float = option(2.0, "Softening temperature of the teacher's predictions.")

    def validate(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}.")


class SoftCE(Loss):
    """Cross-entropy against soft target distributions: mean over examples of -sum(p * log q)."""

    def __call__(self, outputs, targets):
        import torch.nn.functional as F

        return -(targets.float() * F.log_softmax(outputs.float(), -1)).sum(-1).mean()


class EMATeacher(Strategy):
    """Self-distillation: a linear head trained on labels and on an EMA copy of the model's own predictions."""

    Options = EMATeacherOptions
    default_loss = "cross_entropy"
    primary_metric = "accuracy"
    metric_modes = {"accuracy": "max", "ema_accuracy": "max"}

    def build(self):
        from torch import nn

        class Classifier(nn.Module):
            def __init__(self, backbone, width, classes):
                super().__init__()
                self.backbone, self.head = backbone, nn.Linear(width, classes)

            def forward(self, inputs):
                return self.head(self.backbone(inputs))

        self.model = Classifier(self.backbone.module, self.backbone.num_features, self.data.num_outputs)
        self.ema = None  # made from the model's weights at the first step, on the model's device
        self.soft_ce = SoftCE()
        return self.model

    def on_step_start(self, step, total_steps):
        """Fold the weights of the previous optimizer step into the EMA (it trails the student by one step)."""
        import torch

        current = {k: v.detach() for k, v in self.model.state_dict().items()}
        if self.ema is None:
            self.ema = {k: v.clone() for k, v in current.items()}
            return
        d = self.options.decay
        with torch.no_grad():
            for k, v in current.items():
                if v.is_floating_point():
                    self.ema[k].mul_(d).add_(v, alpha=1 - d)
                else:
                    self.ema[k].copy_(v)

    def teacher_logits(self, inputs):
        """The model run with the EMA weights (no second copy of the module needed)."""
        import torch
        from torch.func import functional_call

        if self.ema is None:  # evaluated before any step: the teacher is the model itself
            self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        with torch.no_grad():
            return functional_call(self.model, self.ema, (inputs,))

    def training_step(self, model, batch):
        import torch

        logits = model(batch["inputs"])  # call the (possibly wrapped) model: DDP must see the forward
        T, w = self.options.temperature, self.options.weight
        soft = torch.softmax(self.teacher_logits(batch["inputs"]).float() / T, -1)
        loss = (1 - w) * self.loss(logits, batch["targets"]) + w * T * T * self.soft_ce(logits / T, soft)
        return {"loss": loss}

    def eval_step(self, model, batch):
        logits = model(batch["inputs"])
        teacher = self.teacher_logits(batch["inputs"])
        y = batch["targets"]
        return {"correct": (logits.argmax(1) == y).sum(), "teacher_correct": (teacher.argmax(1) == y).sum(),
                "count": y.new_tensor(y.shape[0])}

    def compute_metrics(self, sums):
        n = float(sums["count"])
        return {"accuracy": float(sums["correct"]) / n, "ema_accuracy": float(sums["teacher_correct"]) / n}

    def predict(self, model, inputs):
        import torch

        probs = torch.softmax(model(inputs).float(), -1)
        names = list(self.data.label_names)
        return [{"label": names[int(p.argmax())], "probability": float(p.max())} for p in probs]

    # The documented hook for a strategy's own checkpoint state: tensors and plain values only.
    def state_dict(self):
        return {"ema": self.ema}

    def load_state_dict(self, state):
        if state.get("ema") is not None:
            device = next(self.model.parameters()).device
            self.ema = {k: v.to(device) for k, v in state["ema"].items()}


@hookimpl
def register_strategies(register):
    register(EMATeacher, name="ema_teacher")


@hookimpl
def register_losses(register):
    register(SoftCE, name="soft_ce")
