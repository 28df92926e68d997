import os

import pytest
import torch

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run tiny models: one intra-op thread is faster than two, and many times faster on a shared, loaded
# 2-core machine (measured 7-30x on the tiny fixer, the torch rasterizer and the hash grid).
torch.set_num_threads(1)

if os.environ.get("DIFIX3D_GSPLAT_SO"):  # GPU hosts: reuse a prebuilt gsplat extension
    from difix3d import gsplat_prebuilt

    gsplat_prebuilt.install()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session: 4 logical CPUs (Ray Data streaming stalls with fewer)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
