import collections
import threading

import pytest
import torch

from difix3d.recon.background_writes import BackgroundWriter, snapshot
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
