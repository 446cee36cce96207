"""What a run asks of the cluster, and whether a given cluster can give it.

A run makes two placement groups, both PACK: the engines (rollout replicas, then
teacher replicas) and the learner ranks (EP x DP). `plan(cfg)` lists their bundles,
exactly as the pipeline requests them; `pack(plan, nodes)` places them the way Ray's
PACK strategy would on the nodes of a cluster YAML (`cluster_nodes`), so a config and a
cluster can be checked against each other before anything is launched.
"""

from __future__ import annotations


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


def engine_bundles(cfg) -> list[dict[str, float]]:
    """One bundle per rollout replica, then one per teacher replica."""
    r, t = cfg.rollout, cfg.teacher
    return [_bundle(r.cpus, r.gpus)] * r.replicas + [_bundle(t.cpus, t.gpus)] * t.replicas


def learner_bundles(cfg) -> list[dict[str, float]]:
    lc = cfg.learner
    return [_bundle(lc.cpus_per_rank, lc.gpus_per_rank)] * (lc.ep * lc.dp)


def plan(cfg) -> dict[str, list[dict[str, float]]]:
    return {"learner": learner_bundles(cfg), "engines": engine_bundles(cfg)}


def cluster_nodes(cluster: dict, scale: str = "min") -> list[tuple[str, dict[str, float]]]:
    """(node type, resources) of every node: the head, then `min_workers` (or `max_workers`) of each worker type."""
    if scale not in ("min", "max"):
        raise ValueError(f"scale: expected 'min' or 'max', got {scale!r}")
    types = cluster.get("available_node_types") or {}
    head = cluster.get("head_node_type")
    if head not in types:
        raise ValueError(f"head_node_type {head!r} is not one of available_node_types {sorted(types)}")
    nodes = [(head, dict(types[head].get("resources", {})))]
    for name, spec in types.items():
        # Ray counts a type's workers apart from the head, even for the head's own type
        nodes += [(name, dict(spec.get("resources", {})))] * int(spec.get(f"{scale}_workers", 0))
    return nodes


class Unplaceable(ValueError):
    pass


def pack(groups: dict[str, list[dict[str, float]]], nodes: list[tuple[str, dict[str, float]]]) -> dict[str, list[int]]:
    """Node index of every bundle, group by group, PACK-style: fill the nodes the group already
    uses before opening another. Raises Unplaceable naming the bundle that does not fit."""
    free = [dict(res) for _, res in nodes]
    placed: dict[str, list[int]] = {}
    for group, bundles in groups.items():
        used: list[int] = []
        placed[group] = []
        for b_i, bundle in enumerate(bundles):
            order = used + [i for i in range(len(free)) if i not in used]
            for i in order:
                if all(free[i].get(k, 0) >= v for k, v in bundle.items()):
                    for k, v in bundle.items():
                        free[i][k] -= v
                    if i not in used:
                        used.append(i)
                    placed[group].append(i)
                    break
            else:
                have = {k: sum(f.get(k, 0) for f in free) for k in bundle}
                raise Unplaceable(
                    f"{group} bundle {b_i} {bundle} fits on no node (free across the cluster: {have}; "
                    f"nodes: {[n for n, _ in nodes]})"
                )
    return placed
