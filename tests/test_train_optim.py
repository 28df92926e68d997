"""The fine-tuning optimizers: choices, the 8-bit AdamW state, and its checkpoint round trip."""

import io

import pytest
import torch

from difix3d.train.config import FinetuneConfig
from difix3d.train.optim import build_optimizer, load_optimizer_state

KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, device=torch.device("cpu"))


def test_unknown_optimizer_is_refused_by_the_config_and_the_builder():
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        FinetuneConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], **KW)


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss)


def test_adamw8bit_learns_keeps_8bit_moments_and_resumes_exactly_from_a_saved_state():
    pytest.importorskip("torchao", reason="the optional extra difix3d[lowmem]")
    torch.manual_seed(0)
    x, y = torch.randn(32, 128), torch.randn(32, 128)

    def fresh():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128))
        return model, build_optimizer("adamw8bit", model.parameters(), **KW)

    model, opt = fresh()
    first = _train(model, opt, x, y, 1)
    after = _train(model, opt, x, y, 5)
    assert after < first
    moment = opt.state[model[0].weight]["exp_avg"]
    assert "8bit" in type(moment).__name__  # quantized, not an fp32 tensor

    buf = io.BytesIO()  # what the training loop writes in train_state.pt, and loads on resume
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    straight = _train(model, opt, x, y, 3)

    resumed_model, resumed_opt = fresh()
    buf.seek(0)
    state = torch.load(buf, weights_only=False)
    resumed_model.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    assert _train(resumed_model, resumed_opt, x, y, 3) == pytest.approx(straight, rel=1e-5)
    torch.testing.assert_close(resumed_model[0].weight, model[0].weight)


def test_adamw8bit_without_torchao_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # import fails as if torchao were absent
    with pytest.raises(ImportError, match=r"difix3d\[lowmem\]"):
        build_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(2))], **KW)


def test_resumed_adamw_keeps_this_devices_kernel_choice_not_the_saved_one():
    param = torch.nn.Parameter(torch.ones(4))
    saved = torch.optim.AdamW([param], lr=1e-3, fused=True)  # e.g. a run checkpointed on a GPU host
    param.grad = torch.ones(4)
    saved.step()
    opt = build_optimizer("adamw", [param], **KW)  # resumed on a CPU worker
    load_optimizer_state(opt, saved.state_dict(), "adamw", torch.device("cpu"))
    assert opt.param_groups[0]["fused"] is False and opt.param_groups[0]["foreach"] is None
    assert opt.param_groups[0]["lr"] == 1e-3  # the rest of the saved state is the run's
    assert torch.equal(opt.state[param]["exp_avg"], saved.state[param]["exp_avg"])
    opt.step()
