"""DifixModel: shapes, reference-view attention, batch independence, the one-step x0, the training pattern."""

import math

import pytest
import torch

from difix3d.fixer.config import preset_config
from difix3d.fixer.model import build_model, skip_conv_channels


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", seed=0).eval()


def _img(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("hw", [(64, 96), (40, 56)])
def test_forward_shape_and_range(model, hw):
    x = _img(1, 3, *hw)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert y.min() >= -1 and y.max() <= 1 and torch.isfinite(y).all()


def test_identical_reference_equals_no_reference(model):
    # Self-attention over [x tokens, x tokens] gives every key twice: softmax halves each weight and the values
    # repeat, so the result equals attention over x alone. A different reference must change the output.
    x, other = _img(1, 3, 32, 48, seed=1), _img(1, 3, 32, 48, seed=2)
    with torch.no_grad():
        plain, same, mixed = model(x), model(x, x), model(x, other)
    torch.testing.assert_close(same, plain, atol=1e-3, rtol=0)  # fp32 sums in another order
    assert (mixed - plain).abs().max() > 1e-2


def test_batch_independence_with_and_without_refs(model):
    x, r = _img(3, 3, 32, 32, seed=3), _img(3, 3, 32, 32, seed=4)
    with torch.no_grad():
        batched = model(x)
        single = model(x[1:2])
        batched_ref = model(x, r)
        r2 = r.clone()
        r2[0] = _img(3, 32, 32, seed=5)  # another sample's reference must not leak into sample 1
        batched_ref2 = model(x, r2)
        single_ref = model(x[1:2], r[1:2])
    torch.testing.assert_close(batched[1:2], single, atol=2e-4, rtol=0)  # conv kernels differ by batch size
    torch.testing.assert_close(batched_ref[1:2], single_ref, atol=2e-4, rtol=0)  # conv kernels differ by batch size
    torch.testing.assert_close(batched_ref2[1:], batched_ref[1:], atol=2e-4, rtol=0)  # conv kernels differ by batch size
    assert (batched_ref2[0] - batched_ref[0]).abs().max() > 1e-2


def test_ref_shape_must_match(model):
    with pytest.raises(ValueError, match="ref shape"):
        model(_img(1, 3, 32, 32), _img(1, 3, 32, 40))


def test_one_step_x0_at_timestep_199(model):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                          clip_sample=False)  # SD-Turbo scheduler_config.json
    a = sched.alphas_cumprod[199].item()
    assert model.sqrt_alpha_bar == pytest.approx(math.sqrt(a), rel=1e-6)
    z = torch.randn(2, 4, 4, 6)
    eps = torch.randn(2, 4, 4, 6)
    seen = {}

    class FakeUNet(torch.nn.Module):
        def forward(self, sample, t, encoder_hidden_states, return_dict):
            seen["t"], seen["emb"] = t, encoder_hidden_states
            return (eps,)

    real = model.unet
    model.unet = FakeUNet()
    try:
        x0 = model.denoise(z)
    finally:
        model.unet = real
    torch.testing.assert_close(x0, (z - math.sqrt(1 - a) * eps) / math.sqrt(a))
    assert seen["t"].tolist() == [199, 199]
    assert seen["emb"].shape == (2, 77, 32)
    # the diffusers scheduler's one-step update gives the same x0 (what the official code calls)
    sched.set_timesteps(timesteps=[199])  # one step from t=199 to the clean image
    ref = torch.stack([sched.step(eps[i:i + 1], 199, z[i:i + 1]).prev_sample[0] for i in range(2)])
    torch.testing.assert_close(x0, ref, atol=1e-5, rtol=1e-5)


def test_training_pattern_and_gradients():
    model = build_model("tiny", seed=0)
    counts = model.prepare_for_training()
    named = dict(model.named_parameters())
    assert all(p.requires_grad for n, p in named.items() if n.startswith("unet."))
    assert not any(p.requires_grad for n, p in named.items() if n.startswith("vae.encoder."))
    assert all(p.requires_grad for n, p in named.items() if ".skip_conv_" in n)
    lora = [n for n, p in named.items() if n.startswith("vae.decoder.") and "lora_" in n]
    assert lora and all(named[n].requires_grad for n in lora)
    assert counts["trainable"] == sum(p.numel() for p in model.trainable_parameters())
    assert counts["unet"] == sum(p.numel() for p in model.unet.parameters())
    assert counts["skip_convs"] > 0 and counts["decoder_lora"] > 0 and counts["frozen"] > 0
    model(_img(1, 3, 32, 32)).mean().backward()
    assert named["vae.decoder.skip_conv_1.base_layer.weight"].grad is not None
    assert named["unet.conv_in.weight"].grad is not None
    assert named["vae.encoder.conv_in.weight"].grad is None


def test_lora_wraps_the_decoder_only():
    """As in the official Difix code: the frozen encoder gets no adapter (its extra convs would run for nothing)."""
    m = build_model("sd-turbo", device="meta")
    wrapped = [n for n, _ in m.vae.named_modules() if n.endswith(".lora_A")]
    assert wrapped and all(n.startswith("decoder.") for n in wrapped)
    assert "decoder.skip_conv_1.lora_A" in wrapped and "decoder.up_blocks.3.resnets.2.conv2.lora_A" in wrapped
    counts = m.prepare_for_training()
    assert counts["decoder_lora"] == 512_668 and counts["skip_convs"] == 502_784
    assert counts["trainable"] == 866_926_176 and counts["frozen"] == 83_653_863  # frozen: the VAE's base weights
    assert m.prepare_for_training(train_vae=True)["trainable"] == 950_580_039


@pytest.mark.parametrize("train_vae", [False, True])
def test_gradient_checkpointing_recomputes_vae_blocks_with_the_same_gradients(monkeypatch, train_vae):
    import torch.utils.checkpoint as tuc

    x, ref = _img(2, 3, 32, 48), _img(2, 3, 32, 48)

    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
        model = build_model("tiny", seed=0)
        model.prepare_for_training(train_vae=train_vae)
        calls = []
        real = tuc.checkpoint
        monkeypatch.setattr(tuc, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        model(x, ref).square().mean().backward()
        with torch.no_grad():  # no recomputation outside training
            model(x)
        vae_modules = set(model.vae.modules())
        return ({n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                sum(fn in vae_modules for fn in calls))

    plain, no_calls = grads(False)
    ckpt, calls = grads(True)
    vae = build_model("tiny").vae
    layers = sum(len(b.resnets) + len(getattr(b, "upsamplers", None) or getattr(b, "downsamplers", None) or [])
                 for b in [*vae.encoder.down_blocks, *vae.decoder.up_blocks])
    assert no_calls == 0 and calls == layers + 2  # each resnet and sampler, and the two mid blocks whole
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


def test_train_vae_makes_a_random_preset_learn_to_reproduce_its_input():
    """With the paper's pattern a random tiny VAE stays frozen and the fixer cannot even copy its input; with
    ``train_vae`` the same budget gets it most of the way (why the bundled tiny fixer trains its VAE)."""
    torch.manual_seed(0)
    # smooth images (a real photo's statistics, roughly): low-frequency noise upsampled
    images = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8) * 2 - 1, size=(32, 32), mode="bilinear")

    def psnr_after(train_vae: bool) -> float:
        model = build_model("tiny", seed=0)
        counts = model.prepare_for_training(train_vae=train_vae)
        assert (counts["vae_base"] > 0) == train_vae
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
        for _ in range(60):
            loss = torch.nn.functional.mse_loss(model(images), images)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            mse = ((model(images) - images) / 2).pow(2).mean()
        return float(-10 * torch.log10(mse))

    frozen, trained = psnr_after(False), psnr_after(True)
    assert trained > frozen + 2.0, (frozen, trained)


def test_sd_turbo_architecture_param_counts():
    m = build_model("sd-turbo", device="meta")  # nothing allocated
    unet = sum(p.numel() for p in m.unet.parameters())
    vae = sum(p.numel() for n, p in m.vae.named_parameters() if "lora_" not in n and ".skip_conv_" not in n)
    assert round(unet / 1e6, 1) == 865.9  # SD 2.1-base UNet
    assert round(vae / 1e6, 1) == 83.7  # SD 2.1 VAE
    assert skip_conv_channels(preset_config("sd-turbo").vae_channels) == [(512, 512), (256, 512), (128, 512),
                                                                           (128, 256)]
    assert m.vae.decoder.skip_conv_2.base_layer.weight.shape == (512, 256, 1, 1)


def test_skip_convs_start_near_zero(model):
    w = model.vae.decoder.skip_conv_4.base_layer.weight
    assert torch.all(w == 1e-5)


def test_merge_lora_keeps_outputs_and_keys():
    """Serving folds decoder LoRA into the base convs: same outputs (to fp32 rounding), same state-dict keys."""
    import torch

    from difix3d.fixer import build_model

    model = build_model("tiny", seed=0).eval()
    with torch.no_grad():
        for name, p in model.vae.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero: give the adapters a real delta
                p.normal_(0, 0.05)
    keys = set(model.state_dict())
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        before = model(x)
        assert model.merge_lora() > 0
        after = model(x)
        assert model.merge_lora() == 0  # idempotent
    assert set(model.state_dict()) == keys
    assert (before - after).abs().max() < 1e-4
    with torch.no_grad():  # the deltas were real: switching the merged adapters off changes the output
        model.vae.disable_adapters()
        assert (model(x) - after).abs().max() > 1e-3
