"""Expert parallelism: process groups, sharding a model's experts, gradient reduction, full checkpoints
that reshard, local multi-process launch, and a MoETuner-style expert placement planner.

A trainer needs five calls (see each function's docstring)::

    groups = init_from_env(ep_size)                  # torchrun env -> gloo/nccl groups (or single process)
    shard_experts(model, groups)                     # E / ep_size experts per rank, alltoall engine
    ...loss.backward(); reduce_gradients(model, groups); optimizer.step()
    update_expert_biases(model)                      # aux-loss-free bias: counts summed over the world
    state = gather_full_state_dict(model)            # every rank calls; rank 0 writes
    load_full_state_dict(model, state)               # any ep_size reads any checkpoint
    shutdown()                                       # every rank, before exiting
"""

from .checkpoint import (gather_experts, gather_full_optimizer_state, gather_full_state_dict,
                         load_full_optimizer_state, load_full_state_dict)
from .grads import all_reduce_mean, broadcast_parameters, reduce_gradients
from .groups import ParallelGroups, init_from_env, make_groups, shutdown
from .launch import free_port, run_local
from .placement import (PlacementPlan, balanced_clusters, map_clusters, placement_metrics, plan_placement,
                        uniform_plan)
from .profile import RoutingProfile, record_routing
from .sharding import (Placement, contiguous_placement, is_expert_parameter, round_robin_placement,
                       shard_experts, sharded_banks)

__all__ = ["ParallelGroups", "init_from_env", "make_groups", "shutdown", "shard_experts", "sharded_banks",
           "is_expert_parameter", "Placement", "contiguous_placement", "round_robin_placement",
           "reduce_gradients", "broadcast_parameters", "all_reduce_mean", "gather_full_state_dict",
           "load_full_state_dict", "gather_full_optimizer_state", "load_full_optimizer_state", "gather_experts",
           "run_local", "free_port", "RoutingProfile", "record_routing", "PlacementPlan", "plan_placement",
           "balanced_clusters", "map_clusters", "placement_metrics", "uniform_plan"]
