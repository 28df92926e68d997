"""cluster.yaml validates offline against the schema the ray package ships, and says what the fleet job needs."""

import os

import pytest
import ray
import yaml

from difix3d.errors import InputError
from difix3d.fleet.cluster import validate_cluster_yaml

CLUSTER_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster.yaml")


@pytest.fixture(scope="module")
def config():
    return validate_cluster_yaml(CLUSTER_YAML)


def test_cluster_yaml_is_valid_for_installed_ray(config):
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_cpu_head_and_autoscaling_gpu_workers(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0  # no scene work on the head
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {t["node_config"]["InstanceType"] for t in gpu_types.values()} >= {"g5.xlarge", "p4d.24xlarge"}
    assert all(t["max_workers"] > t["min_workers"] for t in gpu_types.values())  # they autoscale
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_types.values())


def test_images_match_installed_ray_and_setup_installs_difix3d(config):
    assert ray.__version__ in config["docker"]["head_image"] and ray.__version__ in config["docker"]["worker_image"]
    assert "gpu" in config["docker"]["worker_image"]
    assert any("pip install" in c and "difix3d" in c for c in config["setup_commands"])


def test_token_and_credentials_are_mounted(config):
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any(".difix3d/credentials" in k for k in config["file_mounts"])
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("AWS_" in line or "credentials/env" in line for line in config["setup_commands"])


def test_invalid_config_is_rejected_naming_the_file(tmp_path):
    with open(CLUSTER_YAML) as f:
        raw = yaml.safe_load(f)
    raw["available_node_types"]["gpu_a10g"]["min_wrokers"] = 1  # a typo the schema forbids
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match="bad.yaml.*invalid Ray cluster config"):
        validate_cluster_yaml(str(bad))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(InputError, match="list.yaml.*mapping"):
        validate_cluster_yaml(str(tmp_path / "list.yaml"))
