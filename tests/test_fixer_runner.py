"""FixerRunner, the client protocol and the bundled checkpoint: sizes, layouts, batching, input checks."""

import logging
import os
import threading

import numpy as np
import pytest
import torch

from difix3d.fixer.bundled import default_checkpoint
from difix3d.fixer.client import FixerClient, LocalFixerClient
from difix3d.fixer.runner import FixerRunner, pad_to_multiple


@pytest.fixture(scope="module")
def runner():
    return FixerRunner.from_checkpoint(default_checkpoint(), device="cpu")


def _u8(*shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("hw", [(64, 96), (37, 50), (8, 8), (5, 13)])
def test_uint8_any_size(runner, hw):
    out = runner.fix(_u8(2, *hw, 3))
    assert out.shape == (2, *hw, 3) and out.dtype == np.uint8


def test_single_hwc_image_and_float_tensors(runner):
    assert runner.fix(_u8(30, 41, 3)).shape == (30, 41, 3)
    t = torch.rand(2, 3, 30, 41)
    y = runner.fix(t)
    assert y.shape == t.shape and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 1


def test_runner_is_the_model_on_images(runner):
    # 64x96 needs no padding: the runner must equal the model on [-1, 1] inputs, mapped back to [0, 1].
    t = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = (runner.model(t * 2 - 1) + 1) / 2
    torch.testing.assert_close(runner.fix(t), expected, atol=1e-5, rtol=0)


def test_runner_on_an_odd_size_is_the_model_on_the_padded_image_cropped(runner):
    t = torch.rand(1, 3, 61, 90, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        padded = runner.model(pad_to_multiple(t * 2 - 1, 8))  # [1, 3, 64, 96]
    torch.testing.assert_close(runner.fix(t), ((padded + 1) / 2)[..., :61, :90], atol=1e-5, rtol=0)


def test_posterior_sampling_is_optional_and_random():
    from difix3d.fixer.model import build_model

    model = build_model("tiny", seed=0).eval()
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        mean_a, mean_b = model(x), model(x)
        model.config.sample_posterior = True
        sampled_a, sampled_b = model(x), model(x)
    assert torch.equal(mean_a, mean_b)  # the posterior mean: deterministic
    assert not torch.equal(sampled_a, sampled_b) and not torch.equal(sampled_a, mean_a)


def test_padding_reflects_and_crops_back():
    x = torch.arange(5 * 6, dtype=torch.float32).reshape(1, 1, 5, 6)
    p = pad_to_multiple(x, 8)
    assert p.shape == (1, 1, 8, 8)
    assert torch.equal(p[..., :5, :6], x)
    assert torch.equal(p[..., 5, :6], x[..., 3, :])  # reflection about the last row
    tiny = pad_to_multiple(torch.ones(1, 1, 3, 3), 8)  # too small to reflect: replicated
    assert tiny.shape == (1, 1, 8, 8) and torch.all(tiny == 1)


def test_micro_batches_match_one_batch(runner):
    imgs, refs = _u8(5, 24, 32, 3, seed=1), _u8(5, 24, 32, 3, seed=2)
    small = FixerRunner(runner.model, device="cpu", max_batch=2)
    a, b = runner.fix(imgs, refs), small.fix(imgs, refs)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # rounding of fp32 noise only
    assert not np.array_equal(runner.fix(imgs), a)  # references change the output


@pytest.mark.parametrize("bad, match", [
    (np.zeros((1, 16, 16, 3), np.float32), "uint8"),
    (np.zeros((1, 16, 16, 4), np.uint8), r"\[B, H, W, 3\]"),
    (np.zeros((0, 16, 16, 3), np.uint8), "empty"),
    (torch.full((1, 3, 16, 16), float("nan")), "NaN"),
    (torch.zeros(1, 4, 16, 16), r"\[B, 3, H, W\]"),
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), "float"),
    (torch.full((1, 3, 16, 16), 255.0), r"values up to 255, expected \[0, 1\]"),  # was clamped to white
    ("image.png", "numpy"),
])
def test_bad_inputs_are_named(runner, bad, match):
    with pytest.raises(ValueError, match=match):
        runner.fix(bad)


def test_refs_must_match_images(runner):
    with pytest.raises(ValueError, match="refs: 1 references for 2 images"):
        runner.fix(_u8(2, 16, 16, 3), _u8(1, 16, 16, 3))


def test_refs_of_another_size_are_resized_to_the_images(runner):
    from difix3d.imageio import resize_image

    imgs, refs = _u8(2, 24, 32, 3, seed=1), _u8(2, 48, 40, 3, seed=2)
    resized = np.stack([resize_image(r, 24, 32) for r in refs])
    np.testing.assert_array_equal(runner.fix(imgs, refs), runner.fix(imgs, resized))  # Lanczos, as the official code
    t_imgs = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    t_refs = torch.from_numpy(refs).permute(0, 3, 1, 2).float() / 255
    out = runner.fix(t_imgs, t_refs)
    assert out.shape == t_imgs.shape and torch.isfinite(out).all()


def test_local_client_protocol_and_background_submit(runner):
    client = LocalFixerClient(runner)
    assert isinstance(client, FixerClient)
    imgs, refs = _u8(3, 16, 24, 3), _u8(3, 16, 24, 3, seed=5)
    threads = []
    real_fix = runner.fix

    def spy(images, refs=None):
        threads.append(threading.current_thread().name)
        return real_fix(images, refs)

    runner.fix = spy
    try:
        fut = client.submit(imgs, refs)
        out = fut.result(timeout=120)
    finally:
        del runner.fix
        client.close()
    assert threads and threads[0].startswith("difix-fixer")
    np.testing.assert_array_equal(out, runner.fix(imgs, refs))


def test_a_runner_and_its_local_client_tell_the_checkpoint_they_run(runner):
    from difix3d.fixer.model import build_model

    assert runner.checkpoint == default_checkpoint()
    with LocalFixerClient(runner) as client:
        assert client.checkpoint == default_checkpoint()
    assert FixerRunner(build_model("tiny", seed=0), device="cpu").checkpoint is None  # weights from no file


def test_bundled_checkpoint_is_small_tiny_and_warns(caplog):
    import difix3d.fixer.bundled as bundled

    bundled._warned = False
    with caplog.at_level(logging.WARNING, logger="difix3d.fixer.bundled"):
        path = default_checkpoint()
    assert "no substitute for a real Difix" in caplog.text
    assert os.path.getsize(os.path.join(path, "model.safetensors")) < 8.5e6
    from difix3d.fixer.checkpoint import load_checkpoint

    assert load_checkpoint(path).config.preset == "tiny"


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_bf16_channels_last_matches_fp32(compile):
    from difix3d.fixer.checkpoint import load_checkpoint

    imgs, refs = _u8(3, 40, 56, 3, seed=8), _u8(3, 40, 56, 3, seed=9)
    cpu = FixerRunner(load_checkpoint(default_checkpoint()), device="cpu").fix(imgs, refs)
    gpu = FixerRunner(load_checkpoint(default_checkpoint()), device="cuda", compile=compile)
    assert gpu.dtype == torch.bfloat16 and gpu.channels_last and torch.backends.cudnn.benchmark
    out = gpu.fix(imgs, refs)
    assert out.shape == cpu.shape
    # bf16 keeps ~3 significant digits; through a random-weight UNet + VAE that is a few uint8 levels on average,
    # while a different computation would differ by tens of levels
    assert np.abs(out.astype(int) - cpu.astype(int)).mean() < 6
    t = torch.rand(2, 3, 40, 56, device="cuda")
    assert gpu.fix(t).device.type == "cuda"


@pytest.mark.gpu
def test_cuda_graph_outputs_survive_the_next_replay():
    """reduce-overhead replays one recorded graph per micro-batch; each micro-batch's frames must be its own, not the
    memory the next replay writes."""
    from difix3d.fixer.checkpoint import load_checkpoint

    imgs = _u8(5, 40, 56, 3, seed=10)  # micro-batches of 2, 2, 1: the same graph replayed, then a second one
    eager = FixerRunner(load_checkpoint(default_checkpoint()), device="cuda", max_batch=2).fix(imgs)
    graphs = FixerRunner(load_checkpoint(default_checkpoint()), device="cuda", max_batch=2, compile=True,
                         compile_mode="reduce-overhead")
    for _ in range(3):  # recording, then replays
        out = graphs.fix(imgs)
        assert np.abs(out.astype(int) - eager.astype(int)).mean() < 2
        assert np.abs(out[0].astype(int) - out[2].astype(int)).mean() > 10  # different frames stay different


def test_compile_mode_is_checked():
    from difix3d.fixer.checkpoint import load_checkpoint
    from difix3d.pool.config import PoolConfig

    with pytest.raises(ValueError, match="compile_mode: expected one of default, reduce-overhead"):
        FixerRunner(load_checkpoint(default_checkpoint()), device="cpu", compile_mode="fast")
    with pytest.raises(ValueError, match="compile_mode"):
        PoolConfig(checkpoint="ckpt", compile_mode="fast")
    r = FixerRunner(load_checkpoint(default_checkpoint()), device="cpu", compile_mode="reduce-overhead")
    assert r.compile_mode is None and not r._cuda_graphs  # not compiled: the mode has nothing to act on


def test_auto_compile_only_for_large_models_on_cuda():
    from difix3d.fixer.model import build_model
    from difix3d.fixer.runner import compile_pays

    tiny, big = build_model("tiny"), build_model("sd-turbo", device="meta")
    assert not compile_pays(tiny, torch.device("cuda"))  # the bundled demo fixer: compiling costs more than it gains
    assert compile_pays(big, torch.device("cuda"))
    assert not compile_pays(big, torch.device("cpu"))
    assert FixerRunner(tiny, device="cpu", compile=None).compiled is False


def test_read_only_arrays_from_the_object_store_fix_without_warnings():
    import warnings

    from difix3d.fixer.checkpoint import load_checkpoint

    runner = FixerRunner(load_checkpoint(default_checkpoint()), device="cpu")
    imgs = _u8(2, 16, 24, 3, seed=3)
    imgs.setflags(write=False)  # what a Ray replica receives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = runner.fix(imgs, imgs)
    assert out.shape == imgs.shape and out.dtype == np.uint8


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (16, 16), (12, 40)])
def test_tiny_images_are_padded_up_and_cropped_back(size):
    runner = FixerRunner.from_checkpoint(default_checkpoint(), device="cpu")  # its narrow UNet failed at <= 16 px
    out = runner.fix(_u8(1, *size, 3, seed=3))
    assert out.shape == (1, *size, 3) and out.dtype == np.uint8
    assert pad_to_multiple(torch.zeros(1, 3, *size), 8, 32).shape[-2:] == (max(32, -(-size[0] // 8) * 8),
                                                                         max(32, -(-size[1] // 8) * 8))
