"""cluster.yaml is a valid Ray cluster launcher config with the node types and safety it promises."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"


def _config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema_validator():
    # What `ray up` does: merge the provider's defaults, then validate against ray-schema.json.
    validate_config(prepare_config(_config()))


def test_node_types_autoscale_from_zero_gpu_and_cpu_workers():
    config = _config()
    types = config["available_node_types"]
    assert config["head_node_type"] == "head"
    assert types["gpu"]["min_workers"] == 0 and types["gpu"]["node_config"]["InstanceType"].startswith("g")
    assert types["cpu"]["min_workers"] == 0


def test_installs_the_project_into_rays_python_311_gpu_image_on_every_node():
    config = _config()
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    [project_dir] = [remote for remote, local in config["file_mounts"].items() if local == "."]
    assert any(f"pip install --no-cache-dir {project_dir}" in c for c in config["setup_commands"])
    # What .gitignore names (.venv, demo-output, ...) is not copied to the nodes.
    assert ".gitignore" in config["rsync_filter"]


def test_every_ray_start_requires_the_token_that_goes_to_every_node():
    config = _config()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        [start] = [command for command in commands if "ray start" in command]
        assert "RAY_AUTH_MODE=token " in start and "RAY_num_workers_soft_limit=32 " in start


def test_uses_instance_roles_not_keys():
    config = _config()
    text = CLUSTER_YAML.read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text
    for node in config["available_node_types"].values():
        assert "IamInstanceProfile" in node["node_config"]


def test_dashboard_binds_to_loopback_only():
    head = " ".join(_config()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head


def test_the_validator_rejects_a_misspelt_field():
    config = _config()
    gpu = config["available_node_types"]["gpu"]
    gpu["min_worker"] = gpu.pop("min_workers")
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(config))
