import collections
import threading

import pytest
import torch

from difix3d.recon.background_writes import BackgroundWriter, DeviceSnapshot, cuda_nbytes, snapshot
from difix3d.storage import write_torch as save_torch


def test_snapshot_copies_every_tensor_even_on_cpu():
    live = torch.zeros(3)
    Pair = collections.namedtuple("Pair", "a b")
    state = {"params": {"x": live}, "opt": [Pair(live, 1)], "rng": (1, (2, 3)), "name": "s"}
    snap = snapshot(state)
    live += 1  # training goes on after the snapshot
    assert torch.equal(snap["params"]["x"], torch.zeros(3))
    assert torch.equal(snap["opt"][0].a, torch.zeros(3)) and isinstance(snap["opt"][0], Pair)
    assert snap["rng"] == (1, (2, 3)) and snap["name"] == "s"


def test_cuda_nbytes_counts_only_device_tensors():
    assert cuda_nbytes({"a": torch.zeros(10), "b": [torch.zeros(2, 2)], "c": 3}) == 0


def test_device_snapshot_refuses_a_cpu_device():
    with pytest.raises(ValueError, match="CUDA"):
        DeviceSnapshot({"x": torch.zeros(2)}, "cpu")


@pytest.mark.gpu
def test_device_snapshot_freezes_the_state_and_lands_on_the_host_from_another_thread():
    live = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    Pair = collections.namedtuple("Pair", "a b")
    state = {"params": {"x": live}, "opt": [Pair(live, 1)], "cpu": torch.ones(2), "rng": (1, 2)}
    assert cuda_nbytes(state) == 2 * live.numel() * 4
    snap = DeviceSnapshot(state, live.device)
    for _ in range(50):  # training keeps changing the live tensors after the snapshot, queued on the same stream
        live.mul_(1.0001).add_(1.0)
    writer, out = BackgroundWriter(), {}
    writer.submit(lambda: out.update(host=snap.to_host()), state=True)
    writer.close()
    host = out["host"]
    assert host["params"]["x"].device.type == "cpu"
    assert torch.equal(host["params"]["x"], torch.arange(1 << 20, dtype=torch.float32))
    assert torch.equal(host["opt"][0].a, host["params"]["x"]) and isinstance(host["opt"][0], Pair)
    assert torch.equal(host["cpu"], torch.ones(2)) and host["rng"] == (1, 2)
    with pytest.raises(RuntimeError, match="twice"):
        snap.to_host()


def test_writes_run_in_submission_order_off_the_calling_thread():
    writer, order, threads = BackgroundWriter(), [], set()
    release = threading.Event()

    def write(i):
        if i == 0:
            release.wait(5)
        order.append(i)
        threads.add(threading.get_ident())

    for i in range(5):
        writer.submit(write, i)
    release.set()
    writer.close()
    assert order == [0, 1, 2, 3, 4]
    assert threading.get_ident() not in threads


def test_failed_write_is_raised_not_lost(tmp_path):
    writer = BackgroundWriter()

    def broken():
        raise OSError("disk full")

    writer.submit(broken)
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    writer.close()


def test_inline_when_disabled_and_state_round_trips(tmp_path):
    writer = BackgroundWriter(enabled=False)
    uri = str(tmp_path / "state.pt")
    writer.submit(save_torch, uri, {"t": torch.arange(4)}, state=True)
    assert torch.equal(torch.load(uri)["t"], torch.arange(4))  # written before submit returned
    writer.close()


def test_writes_after_a_failure_are_skipped_so_no_state_names_a_missing_view(tmp_path):
    writer = BackgroundWriter()
    release = threading.Event()

    def failing_view_write():
        release.wait(5)
        raise OSError("disk full")

    uri = str(tmp_path / "state.pt")
    writer.submit(failing_view_write)
    writer.submit(save_torch, uri, {"t": torch.zeros(1)}, state=True)  # queued behind the failing write
    release.set()
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert not (tmp_path / "state.pt").exists()


def test_a_state_file_blames_itself_only_for_what_is_wrong_with_it(tmp_path, monkeypatch):
    """A damaged file is a CheckpointError (an input error: the fleet does not retry it); a storage hiccup while
    reading it is not the file's fault and stays retryable."""
    from difix3d import storage
    from difix3d.errors import CheckpointError
    from difix3d.recon.background_writes import BackgroundWriter, StateFile

    uri = str(tmp_path / "state.pt")
    with BackgroundWriter(enabled=False) as writer:
        state = StateFile(uri, writer, "cpu")
        state.save(lambda: {"step": torch.tensor(3)}, final=True)
    got = {}
    assert state.load(got.update) and int(got["step"]) == 3
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda u: (_ for _ in ()).throw(ConnectionResetError("reset")))
    with pytest.raises(ConnectionResetError):
        state.load(got.update)
    monkeypatch.setattr(storage, "read_bytes", real_read)
    (tmp_path / "state.pt").write_bytes((tmp_path / "state.pt").read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"state\.pt: cannot resume from it .*delete it to restart"):
        state.load(got.update)
