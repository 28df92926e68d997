"""Distributed pair streams and the training losses."""

import contextlib
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from difix3d.errors import InputError, MissingWeightsError
from difix3d.train.config import LossWeights
from difix3d.train.data import PairStream, ShardIndex, collate_pairs, epoch_slice, read_rows
from difix3d.train.losses import VGG16_URL, DifixLoss, build_perceptual_net, gram_loss, shared_random_crop
from difix3d.train.pairs import write_pair_shard


def _shards(root, n_shards=3, rows=5, size=12, ref=True):
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        out = []
        for r in range(rows):
            t = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            out.append({"degraded": t, "target": t, "reference": t if ref else None, "scene": f"{s}", "camera": f"{r}"})
        write_pair_shard(str(root / f"shard-{s}.parquet"), out)
    return ShardIndex.build(str(root))


def _ids(rows):
    return [(r["scene"], r["camera"]) for r in rows]


def test_workers_read_disjoint_equal_slices_that_change_per_epoch(tmp_path):
    index = _shards(tmp_path)
    assert index.total == 15
    a, b = (epoch_slice(index, r, 2, seed=1, epoch=0) for r in (0, 1))
    assert len(a) == len(b) == 7 and not set(a) & set(b)
    assert epoch_slice(index, 0, 2, seed=1, epoch=0) == a  # deterministic
    assert {tuple(x) for e in range(6) for x in epoch_slice(index, 0, 2, 1, e)} != set(a)  # reshuffled over epochs


def test_stream_resumes_exactly_from_its_state(tmp_path):
    index = _shards(tmp_path)
    s = PairStream(index, rank=1, world_size=2, seed=3, shuffle_window=4)
    it = iter(s)
    first = _ids([next(it) for _ in range(10)])  # crosses an epoch boundary (7 rows per epoch)
    state = s.state()
    rest = _ids([next(it) for _ in range(5)])
    again = PairStream(index, rank=1, world_size=2, seed=3, shuffle_window=4, start=state)
    assert _ids([r for r, _ in zip(again, range(5))]) == rest
    assert state[0] == 1 and len(set(first[:7])) == 7


def test_corrupt_row_fails_naming_it_or_is_skipped(tmp_path):
    index = _shards(tmp_path, n_shards=1, rows=3)
    uri = index.shards[0]
    table = pq.read_table(uri)
    col = table.column("degraded").to_pylist()
    col[1] = b"garbage"
    pq.write_table(table.set_column(0, table.schema.field("degraded"), pa.array(col, pa.binary())), uri)
    stream = PairStream(index, shuffle_window=1)
    with pytest.raises(InputError, match=r"shard-0.parquet row 1 column degraded"):
        [r for r, _ in zip(stream, range(3))]
    skipping = PairStream(index, shuffle_window=1, skip_corrupt=True)
    got = _ids([r for r, _ in zip(skipping, range(4))])
    assert ("0", "1") not in got and len(got) == 4 and "row 1" in skipping.skipped[0]
    lonely = PairStream(index, rank=1, world_size=3, skip_corrupt=True, shuffle_window=1)  # its slice: row 1 only
    with pytest.raises(InputError, match=r"all 1 rows worker 1 of 3 reads in epoch 0 are corrupt"):
        next(iter(lonely))
    with pytest.raises(InputError, match=r"row 1 column degraded"):  # validation rows: the same choice
        read_rows(index, 3)
    assert _ids(read_rows(index, 3, skip_corrupt=True)) == [("0", "0"), ("0", "2")]


def test_a_row_whose_images_differ_in_size_is_a_corrupt_row(tmp_path):
    """Shards from other tools share the schema but not write_pair_shard's checks."""
    from difix3d.imageio import encode_image

    index = _shards(tmp_path, n_shards=1, rows=3)
    uri = index.shards[0]
    table = pq.read_table(uri)
    col = table.column("target").to_pylist()
    col[2] = encode_image(np.zeros((10, 16, 3), np.uint8))
    i = table.schema.get_field_index("target")
    pq.write_table(table.set_column(i, table.schema.field("target"), pa.array(col, pa.binary())), uri)
    with pytest.raises(InputError, match=r"shard-0.parquet row 2: .*degraded 12x16, target 10x16"):
        read_rows(index, 3)
    assert _ids(read_rows(index, 3, skip_corrupt=True)) == [("0", "0"), ("0", "1")]


def test_a_bad_shard_does_not_stop_workers_that_other_epochs_deal_good_ones(tmp_path):
    index = _shards(tmp_path, n_shards=2, rows=2)
    uri = index.shards[1]
    table = pq.read_table(uri)
    col = [b"garbage"] * table.num_rows
    pq.write_table(table.set_column(0, table.schema.field("degraded"), pa.array(col, pa.binary())), uri)
    for rank in (0, 1):  # each epoch deals one shard per worker; whichever got the bad one reads good rows later
        stream = PairStream(index, rank=rank, world_size=2, seed=0, shuffle_window=1, skip_corrupt=True)
        got = [r for r, _ in zip(stream, range(3))]
        assert len(got) == 3 and all(r["scene"] == "0" for r in got)


def test_input_errors_survive_pickling_between_processes():
    import pickle

    from difix3d.errors import CheckpointError

    for e in (InputError("a/0.png", "not a PNG"), CheckpointError("ckpt/model.safetensors", "truncated")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.source == e.source


def test_collate_crops_aligned_windows_in_minus_one_one(tmp_path):
    index = _shards(tmp_path, n_shards=1, rows=2)
    rows = read_rows(index, 2)
    batch = collate_pairs(rows, 8, 8, random.Random(0))
    assert batch["x"].shape == batch["target"].shape == batch["ref"].shape == (2, 3, 8, 8)
    assert torch.equal(batch["x"], batch["target"]) and batch["x"].min() >= -1 and batch["x"].max() <= 1
    big = collate_pairs(rows, 24, 40, random.Random(0), use_reference=False)  # upsampled to cover the crop
    assert big["x"].shape == (2, 3, 24, 40) and big["ref"] is None
    assert _ids(read_rows(index, 2, rank=1, world_size=2)) == [("0", "1")]


def test_missing_vgg_weights_error_names_the_file_and_the_flag(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"vgg16-397923af.pth.*--allow-random-perceptual") as e:
        build_perceptual_net("pretrained", hub_dir=str(tmp_path))
    message = str(e.value)
    assert message.count(VGG16_URL) == 1 and message.lower().count("fetch") == 1  # the instruction, once
    assert str(tmp_path / "checkpoints" / "vgg16-397923af.pth") in message
    assert "--lpips-weights" not in message  # evaluation's flag, not fine-tuning's
    with pytest.raises(MissingWeightsError, match="not found"):
        build_perceptual_net(str(tmp_path / "vgg.pth"))


def test_local_vgg_file_loads_into_the_backbone(tmp_path):
    torch.manual_seed(5)
    import torchvision

    feats = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path / "vgg.pth"
    torch.save(feats, path)
    net = build_perceptual_net(str(path))
    assert torch.equal(net.net.slice5[5].weight, feats["features.28.weight"])


def test_loss_terms_zero_on_identity_and_gram_after_warmup():
    net = build_perceptual_net("random", seed=0)
    assert torch.equal(build_perceptual_net("random", seed=0).net.slice1[0].weight, net.net.slice1[0].weight)
    loss = DifixLoss(LossWeights(gram_warmup_steps=5, gram_crop=16), net)
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    same = loss(x, x, step=10)
    assert float(same["total"]) == pytest.approx(0.0, abs=1e-6)
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    before, after = loss(y, x, step=4), loss(y, x, step=5)
    assert float(before["gram"]) == 0 and float(after["gram"]) > 0
    assert float(after["l2"]) == pytest.approx(float(((y - x) ** 2).mean()), rel=1e-5)
    assert float(after["total"]) == pytest.approx(float(after["l2"] + after["lpips"] + after["gram"]), rel=1e-5)
    y.requires_grad_(True)
    loss(y, x, step=6)["total"].backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_gram_loss_sees_texture_and_shared_crop_is_aligned():
    a = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    ca, cb = shared_random_crop(a, a.clone(), 6, random.Random(0))
    assert torch.equal(ca, cb) and ca.shape == (2, 3, 6, 6)
    feats = {k: torch.ones(1, 2, 3, 3) for k in ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")}
    assert float(gram_loss(feats, feats)) == 0
    other = {k: v * 2 for k, v in feats.items()}
    assert float(gram_loss(feats, other)) > 0
    only_first = {"relu1_2": 2.0}  # per-layer weights are a config field (LossWeights.gram_layers)
    assert float(gram_loss(feats, other, only_first)) == pytest.approx(
        2.0 * 2.6 * float(gram_loss({"relu1_2": feats["relu1_2"]}, {"relu1_2": other["relu1_2"]}, {"relu1_2": 1 / 2.6})))
    with pytest.raises(ValueError, match="relu9_9"):
        LossWeights(gram_layers={"relu9_9": 1.0})
    with pytest.raises(ValueError, match="empty"):
        LossWeights(gram_layers={})


def test_reference_view_is_decoded_and_supervised():
    from difix3d.fixer.model import build_model
    from difix3d.train.views import AllViewsFixer, training_targets

    model = build_model("tiny", seed=0).eval()
    x, ref = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = AllViewsFixer(model)(x, ref)
        assert out.shape == (2, 2, 3, 32, 32)
        torch.testing.assert_close(out[:, 0], model(x, ref), atol=1e-5, rtol=0)  # view 0 = what serving returns
    targets = training_targets(x, ref)
    assert torch.equal(targets[:, 0], x) and torch.equal(targets[:, 1], ref)  # the reference is its own target


def test_validation_reports_lpips_with_a_perceptual_net():
    from difix3d.fixer.model import build_model
    from difix3d.train.validate import validation_sums

    model = build_model("tiny", seed=0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    batches = [{"x": x, "target": x.clone(), "ref": None}]
    calls = []

    def lpips_net(a, b):
        calls.append(a.shape)
        return (a - b).abs().mean(dim=(1, 2, 3))

    sums, grid = validation_sums(model, batches, torch.device("cpu"), lpips_net, contextlib.nullcontext)
    assert sums["n"] == 3 and calls == [(3, 3, 32, 32)] and sums["lpips"] > 0 and len(grid) == 3
    assert validation_sums(model, [], torch.device("cpu"), None, contextlib.nullcontext)[0]["n"] == 0  # a rank with no rows


def test_checkpointed_lpips_gives_the_same_loss_and_gradient(monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    net = build_perceptual_net("random", seed=0)
    x = torch.rand(2, 3, 24, 24) * 2 - 1
    y0 = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    results = []
    for checkpointing in (False, True):
        loss = DifixLoss(LossWeights(gram=0.0), net, checkpointing=checkpointing)
        y = y0.clone().requires_grad_(True)
        out = loss(y, x, step=0)
        out["total"].backward()
        results.append((out["lpips"], y.grad))
    assert calls == [net]  # only the checkpointed run went through torch.utils.checkpoint
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_gram_loss_stays_float32_under_bf16_autocast():
    """The training step runs the loss inside a bf16 autocast region; the Gram matrices must not drop to bf16 (their
    difference is small against their size, and bf16 rounding swamped it: ~7x the loss, gradients at cosine 0.67)."""
    torch.manual_seed(0)
    fp = torch.relu(torch.randn(2, 16, 24, 24))
    ft = fp + 0.01 * torch.randn_like(fp)
    layers = {"relu1_2": 1.0}
    want = gram_loss({"relu1_2": fp}, {"relu1_2": ft}, layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gram_loss({"relu1_2": fp}, {"relu1_2": ft}, layers)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-5)


def test_shard_index_reads_footers_and_names_what_is_not_a_shard(tmp_path, monkeypatch):
    from difix3d import storage

    image = np.zeros((8, 8, 3), np.uint8)
    row = dict(degraded=image, target=image, reference=None, scene="s", camera="c", strategy="sparse", psnr=20.0)
    write_pair_shard(str(tmp_path / "ok" / "a.parquet"), [row, row, row])
    monkeypatch.setattr(storage, "read_bytes", lambda uri: pytest.fail(f"read all of {uri}"))  # footers only
    assert ShardIndex.build(str(tmp_path / "ok")).rows == (3,)
    (tmp_path / "spark" / "b.parquet").mkdir(parents=True)  # a Spark-style folder
    with pytest.raises(InputError, match=r"b.parquet: a folder, not a pair shard"):
        ShardIndex.build(str(tmp_path / "spark" / "*.parquet"))
    pq.write_table(pa.table({"image": [b"x"]}), str(tmp_path / "other.parquet"))
    with pytest.raises(InputError, match=r"other.parquet: not a pair shard: missing columns \['degraded'"):
        ShardIndex.build(str(tmp_path / "other.parquet"))
