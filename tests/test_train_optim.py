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


def _stepped(model):
    opt = build_optimizer("adamw", model.parameters(), **KW)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return opt


def test_a_saved_state_is_matched_to_the_parameters_by_name():
    """Moments of parameters gone from the model are dropped, a new parameter starts without them, and a LoRA-wrapped
    layer's ``base_layer.weight`` is the plain layer's ``weight``."""
    torch.manual_seed(0)
    old = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 3), "gone": torch.nn.Linear(4, 5), "b": torch.nn.Linear(4, 2)})
    old.forward = lambda x: old["a"](x).sum() + old["gone"](x).sum() + old["b"](x).sum()
    old_opt = _stepped(old)
    saved = old_opt.state_dict()
    saved_names = ["a.base_layer.weight", "a.base_layer.bias", "gone.weight", "gone.bias", "b.weight", "b.bias"]
    new = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 3), "new": torch.nn.Linear(4, 1), "b": torch.nn.Linear(4, 2)})
    names = [n for n, _ in new.named_parameters()]
    opt = build_optimizer("adamw", new.parameters(), **KW)
    load_optimizer_state(opt, saved, "adamw", torch.device("cpu"), names=names, saved_names=saved_names)
    for layer in ("a", "b"):
        for kind in ("weight", "bias"):
            moments = opt.state[getattr(new[layer], kind)]
            assert torch.equal(moments["exp_avg"], old_opt.state[getattr(old[layer], kind)]["exp_avg"])
            assert float(moments["step"]) == 1
    assert new["new"].weight not in opt.state and new["new"].bias not in opt.state
    assert len(opt.state) == 4 and opt.param_groups[0]["lr"] == KW["lr"]
    sum(new[k](torch.ones(1, 4)).sum() for k in new).backward()
    opt.step()  # the new parameter gets its moments here


def test_a_saved_state_that_does_not_fit_by_name_is_a_checkpoint_error():
    from difix3d.errors import CheckpointError

    old = torch.nn.Linear(4, 3)
    saved = _stepped(old).state_dict()
    new = torch.nn.Linear(4, 5)  # same names, other shapes
    opt = build_optimizer("adamw", new.parameters(), **KW)
    with pytest.raises(CheckpointError, match=r"s/train_state.pt: the optimizer's exp_avg of weight is \(3, 4\), "
                                              r"the parameter \(5, 4\)"):
        load_optimizer_state(opt, saved, "adamw", torch.device("cpu"), names=["weight", "bias"],
                             saved_names=["weight", "bias"], source="s/train_state.pt")
    with pytest.raises(CheckpointError, match="holds 2 parameters and names 3"):
        load_optimizer_state(opt, saved, "adamw", torch.device("cpu"), names=["weight", "bias"],
                             saved_names=["weight", "bias", "other"], source="s/train_state.pt")


def test_a_resume_with_another_optimizer_setup_is_bad_input_naming_the_run(tmp_path):
    """An InputError is recorded by the worker, so a restarted worker group fails at once instead of retrying."""
    from difix3d.errors import InputError
    from difix3d.train.loop import _check_same_optimizer_setup

    cfg = FinetuneConfig(train_shards=str(tmp_path), storage_path=str(tmp_path / "runs"), name="r1", train_vae=True)
    _check_same_optimizer_setup(cfg, {"optimizer": "adamw", "train_vae": True})
    with pytest.raises(InputError, match=r"r1: the run was started with train_vae=False and is resumed with "
                                         r"train_vae=True"):
        _check_same_optimizer_setup(cfg, {})  # a state saved before train_vae was recorded: its default


def test_a_resume_that_would_read_the_pairs_in_another_order_is_bad_input(tmp_path):
    """The saved stream position means rows of one order: another seed, shuffle window or shard set would train
    some rows twice and skip others."""
    from difix3d.errors import InputError
    from difix3d.train.loop import _check_same_optimizer_setup

    cfg = FinetuneConfig(train_shards=str(tmp_path), storage_path=str(tmp_path / "runs"), name="r1", seed=1)
    saved = {"optimizer": "adamw", "train_vae": False, "train_shards": str(tmp_path), "seed": 1, "shuffle_window": 64}
    _check_same_optimizer_setup(cfg, saved)
    _check_same_optimizer_setup(cfg, {})  # saved before these were recorded: not checked
    for name, value in (("seed", 0), ("shuffle_window", 16), ("train_shards", str(tmp_path / "other"))):
        with pytest.raises(InputError, match=rf"r1: the run was started with {name}=.* saved position in the "
                                             "training pairs"):
            _check_same_optimizer_setup(cfg, {**saved, name: value})


def test_a_resumed_optimizer_trains_with_the_new_settings_not_the_saved_ones(caplog):
    from difix3d.train.loop import _apply_optimizer_settings

    m = torch.nn.Linear(4, 4)
    dev = torch.device("cpu")
    opt = build_optimizer("adamw", m.parameters(), lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                          device=dev)
    m(torch.randn(2, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    cfg = FinetuneConfig(lr=1e-6, weight_decay=0.0, betas=(0.8, 0.99), eps=1e-6)
    resumed = build_optimizer("adamw", m.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                              weight_decay=cfg.weight_decay, device=dev)
    load_optimizer_state(resumed, saved, "adamw", dev)
    assert resumed.param_groups[0]["lr"] == 2e-5  # what loading alone does
    with caplog.at_level("WARNING"):
        _apply_optimizer_settings(cfg, resumed)
    group = resumed.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (1e-6, 0.0, (0.8, 0.99), 1e-6)
    assert "lr 2e-05 -> 1e-06" in caplog.text
    assert resumed.state_dict()["state"][0]["exp_avg"].abs().sum() > 0  # the moments are kept
