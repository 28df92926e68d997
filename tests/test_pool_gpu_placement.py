"""The fleet's default GPU shares put one fixer replica on each GPU, with two scene tasks beside it. Ray packs
fractional GPU requests onto one device until it is full, so shares of exactly half a GPU had put two replicas on
one GPU and none on another. Checked on a fresh local Ray cluster with two logical GPUs (no CUDA needed: Ray
assigns GPU ids to actors and tasks all the same)."""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, time
    import ray
    from difix3d import pool
    from difix3d.fixer.bundled import default_checkpoint
    from difix3d.fleet.config import FleetConfig
    from difix3d.fleet.driver import scene_task_options
    from difix3d.fleet.fixers import pool_size

    ray.init(num_cpus=6, num_gpus=2, include_dashboard=False, log_to_driver=False)
    config = FleetConfig()
    lo, hi, gpus = pool_size(config, 2.0)
    client = pool.start_pool(default_checkpoint(), name="placement", min_replicas=lo, max_replicas=hi,
                             num_gpus_per_replica=gpus, num_cpus_per_replica=1, device="cpu")
    replicas = [ray.get(h.ready.remote())["gpu_ids"] for h in client.replica_handles()]

    @ray.remote
    def scene():
        time.sleep(3.0)  # all four run at once, or one waits for a GPU share
        return ray.get_gpu_ids()

    t0 = time.monotonic()
    opts = scene_task_options(config, use_gpu=True)
    scenes = ray.get([scene.options(**opts).remote() for _ in range(4)])
    print(json.dumps({"replicas": replicas, "scenes": [[str(g) for g in s] for s in scenes],
                      "seconds": time.monotonic() - t0, "lo": lo}))
    pool.shutdown_pool("placement")
""")


def test_default_shares_put_one_replica_and_two_scenes_on_each_gpu():
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lo"] == 2
    replica_gpus = sorted(g for ids in result["replicas"] for g in ids)
    assert replica_gpus == ["0", "1"], result  # one replica per GPU, not both on GPU 0
    scene_gpus = sorted(g for ids in result["scenes"] for g in ids)
    assert scene_gpus == ["0", "0", "1", "1"], result  # two scenes beside each replica
    assert result["seconds"] < 6.0, result  # the four scenes ran at once
