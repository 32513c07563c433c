import pytest
import torch

from graft.testing import check_strategy
from graft_ema_teacher import EMATeacher, SoftCE


def test_passes_graftkit_conformance_checks(tmp_path):
    summary = check_strategy(EMATeacher, tmp_path, options={"decay": 0.9})
    assert "ema_accuracy" in summary["test"]


def test_soft_ce_equals_cross_entropy_for_one_hot_targets():
    logits = torch.randn(5, 4)
    labels = torch.tensor([0, 3, 1, 2, 2])
    one_hot = torch.nn.functional.one_hot(labels, 4).float()
    assert SoftCE()(logits, one_hot).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)


def test_ema_trails_the_student(tmp_path):
    from graft import Run, load_config
    from graft.testing import TINY_BACKBONE, TINY_DATA, registry_with

    reg = registry_with(EMATeacher, name="ema_teacher")
    run = Run(load_config({"backbone": TINY_BACKBONE, "data": TINY_DATA,
                       "strategy": {"plugin": "ema_teacher", "decay": 0.5}}, registry=reg, where="t.toml"))
    s = run.strategy
    s.on_step_start(0, 10)
    before = {k: v.clone() for k, v in s.ema.items()}
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(1.0)
    s.on_step_start(1, 10)
    k = "head.weight"
    assert torch.allclose(s.ema[k], before[k] + 0.5)  # halfway to the moved weights
