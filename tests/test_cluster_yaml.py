"""The Ray cluster launcher config (cluster/*.yaml), validated offline.

Against Ray's own `ray/autoscaler/ray-schema.json` from the installed wheel (what `ray up`
checks first), then through Ray's `prepare_config` + `validate_config` (defaults merged, node
types filled in: no cloud call), then against what this project needs from it.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))
AWS = REPO / "cluster" / "aws-gpu.yaml"
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def schema_errors(config: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(RAY_SCHEMA)  # ray-schema.json declares draft-07
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in validator.iter_errors(config)]


def test_there_is_an_aws_config():
    assert AWS in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_matches_rays_schema(path):
    assert schema_errors(load(path)) == []


def test_the_schema_check_can_fail():
    config = load(AWS)
    config["available_node_types"]["gpu"]["max_worker"] = 4  # typo of max_workers
    config["docker"]["imagee"] = "x"
    errors = schema_errors(config)
    assert any("max_worker" in e for e in errors) and any("imagee" in e for e in errors), errors


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_passes_rays_own_config_preparation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(load(path))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_rays_own_validation_can_fail():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(AWS)
    config["available_node_types"]["gpu"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        validate_config(prepare_config(config))


def _node_types(config: dict) -> dict:
    return config["available_node_types"]


def test_head_takes_no_work_and_gpu_workers_scale_from_zero():
    config = load(AWS)
    head = _node_types(config)[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert any("--num-cpus=0" in c for c in config["head_start_ray_commands"])
    gpu = [t for t in _node_types(config).values() if re.match(r"(g|p)\d", t["node_config"]["InstanceType"])]
    assert gpu, "no GPU instance type (g*/p* families)"
    for t in gpu:
        assert t.get("min_workers", 0) == 0 and t["max_workers"] >= 1


def test_every_node_runs_the_project_image_with_a_recent_ami():
    config = load(AWS)
    image = config["docker"]["image"]
    assert image.rsplit("/", 1)[-1].startswith("ptxray:")
    k8s_images = set(re.findall(r"image: (\S+)", "\n".join(p.read_text() for p in (REPO / "k8s" / "base").glob("*.yaml"))))
    assert k8s_images == {image}, "the VM cluster and the KubeRay base should run the same image"
    for name, t in _node_types(config).items():
        # Ray's built-in default AMI predates CUDA 13: every node type must name its own.
        assert t["node_config"].get("ImageId", "").startswith("ami-"), name
        assert "docker" not in t or "worker_image" not in t["docker"], f"{name} must not run another image"
    # The image carries ptxray and its dependencies; installing at boot would drift from it.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in c for c in config.get(key, [])), key


def test_token_authentication_stays_on():
    config = load(AWS)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert "RAY_AUTH_MODE=disabled" not in AWS.read_text()


def test_no_credentials_and_s3_through_instance_profiles():
    config = load(AWS)
    text = AWS.read_text()
    assert not re.search(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}", text)
    assert not re.search(r"(?i)aws_(secret_)?access_key|aws_session_token|-----BEGIN", text)
    assert "aws_credentials" not in config["provider"], "keys in the provider block end up on disk and in logs"
    assert "ssh_private_key" not in config["auth"], "let `ray up` create the key pair"
    head = config["head_node_type"]
    for name, t in _node_types(config).items():
        if name != head:  # the head gets ray-autoscaler-v1 from `ray up`
            assert "IamInstanceProfile" in t["node_config"], f"{name} workers could not reach S3"


def test_max_workers_covers_every_node_type():
    config = copy.deepcopy(load(AWS))
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for t in _node_types(config).values())
