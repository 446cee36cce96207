"""launch/cluster-h200.yaml against Ray's own cluster schema, and the H200 configs' placement on it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from launch.config import load_config
from launch.placement import Unplaceable, cluster_nodes, pack, plan

CLUSTER = Path("launch/cluster-h200.yaml")
H200_CONFIGS = ["launch/configs/qwen3-30b-a3b-h200.yaml", "launch/configs/glm-4.7-flash-h200.yaml"]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_validates_against_rays_schema(cluster):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    validate_config(prepare_config(copy.deepcopy(cluster)))  # what `ray up` runs before launching
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["h200.worker"]["gpus"] = 8  # a typo'd key must not pass
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_nodes_are_8xh200_and_services_stay_off_the_network(cluster):
    for name, spec in cluster["available_node_types"].items():
        assert spec["resources"]["GPU"] == 8, name
        assert spec["node_config"]["InstanceType"] == "p5en.48xlarge", name
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # dashboard + job server on loopback: SSH tunnel only
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in " ".join(cluster["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in cluster["file_mounts"].values()
    opened = cluster["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in opened] == [(22, 22)]
    setup = " ".join(cluster["setup_commands"])
    assert "[gpu]" in setup and "torch==" in setup  # the GPU extra, with torch pinned in the same install


@pytest.mark.parametrize("config", H200_CONFIGS)
def test_h200_config_fits_the_declared_gpus(cluster, config):
    cfg = load_config(config)
    assert cfg.learner.ep == 8 and cfg.cluster.bind_host == "auto" and cfg.cluster.address == "auto"
    groups = plan(cfg)
    nodes = cluster_nodes(cluster, "min")
    declared = sum(res.get("GPU", 0) for _, res in nodes)
    asked = sum(b.get("GPU", 0) for bundles in groups.values() for b in bundles)
    assert asked <= declared, (asked, declared)
    placed = pack(groups, nodes)
    assert len(set(placed["learner"])) == 1  # EP=8 on one node: the expert all-to-all stays on NVLink
    assert len(placed["engines"]) == cfg.rollout.replicas + cfg.teacher.replicas


def test_pack_names_what_does_not_fit(cluster):
    cfg = load_config(H200_CONFIGS[0], {"rollout.replicas": 9})
    with pytest.raises(Unplaceable, match=r"engines bundle \d+ .*GPU"):
        pack(plan(cfg), cluster_nodes(cluster, "min"))
    pack(plan(cfg), cluster_nodes(cluster, "max"))  # fits once the autoscaler adds workers


def test_the_embedded_default_fits_a_two_core_machine():
    cfg = load_config("launch/configs/tiny-cpu.yaml")
    pack(plan(cfg), [("local", {"CPU": cfg.cluster.num_cpus})])
