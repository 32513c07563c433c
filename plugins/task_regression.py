"""The ``regression`` task: one number per example."""

from graft import Task, hookimpl


class Regression(Task):
    """One number per example: a single-output head; MAE and RMSE (best weights by RMSE)."""

    losses = ("mse",)
    primary_metric = "rmse"
    metric_modes = {"mae": "min", "rmse": "min"}
    output_shape = "[batch, 1]"

    def outputs(self):
        return 1

    def eval_sums(self, outputs, targets):
        import torch

        err = outputs.reshape(targets.shape) - targets.float()
        return {"count": torch.tensor(float(targets.shape[0]), device=outputs.device),
                "abs_err": err.abs().sum(), "sq_err": (err ** 2).sum()}

    def compute_metrics(self, sums):
        n = float(sums["count"])
        return {"mae": float(sums["abs_err"]) / n, "rmse": (float(sums["sq_err"]) / n) ** 0.5}

    def predict(self, model, inputs):
        return [{"value": float(v)} for v in model(inputs).float().reshape(-1)]


@hookimpl
def register_tasks(register):
    register(Regression, name="regression")
