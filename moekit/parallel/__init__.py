"""Expert parallelism: process groups, sharding a model's experts, gradient reduction, full checkpoints
that reshard, local multi-process launch, and a MoETuner-style expert placement planner; FSDP2 of the
non-expert parameters on a 2-D ``(dp, ep)`` mesh (:mod:`.fsdp`), sharded ``torch.distributed.checkpoint``
checkpoints (:mod:`.dcp`), the hierarchical all-to-all (:func:`make_hierarchy`) and MoETuner's ILPs
(:mod:`.ilp`).

A trainer needs these calls (see each function's docstring)::

    groups = init_from_env(ep_size)                  # torchrun env -> gloo/nccl groups (or single process)
    shard_experts(model, groups)                     # E / ep_size experts per rank, alltoall engine
    ...loss.backward(); reduce_gradients(model, groups)  # instead of DDP
    clip_grad_norm_(model, max_norm, groups)           # the whole model's norm, same on every rank
    optimizer.step()
    update_expert_biases(model)                      # aux-loss-free bias: counts summed over the world
    state = gather_full_state_dict(model)            # every rank calls; rank 0 writes
    load_full_state_dict(model, state)               # any ep_size reads any checkpoint
    shutdown()                                       # every rank, before exiting

Balancing across ranks (the choice made here):

- The Switch/GShard aux loss and the z-loss are computed by each rank's router on that rank's tokens and
  averaged over the world through the gradient average: the objective is the mean of per-rank losses, exactly
  the single-process model run on each rank's tokens as a separate micro-batch (tests/test_ep.py checks this).
  With ``router.aux_loss_level="global_batch"`` the router instead sums the assignment counts behind ``f``
  over the world (Qwen3 / Megatron global-batch balancing): the mean of the ranks' losses is then the
  single-process loss on the concatenated batch (tests/test_fsdp.py).
- The auxiliary-loss-free bias is a replicated buffer, so its assignment counts are summed over the whole world
  (``Router.step`` all-reduces over the default group when distributed) and every rank applies the same update.
- Logged values: :func:`all_reduce_mean` of each rank's loss.
"""

from .checkpoint import (
                         gather_experts,
                         gather_full_optimizer_state,
                         gather_full_state_dict,
                         load_full_optimizer_state,
                         load_full_state_dict,
)
from .dcp import (
                         has_sharded,
                         init_optimizer_state,
                         load_sharded,
                         read_sharded_info,
                         save_sharded,
                         sharded_dir,
                         sharded_state,
)
from .fsdp import apply_fsdp, bf16_supported, build_mesh, is_fsdp, local_numel, memory_per_rank
from .grads import all_reduce_mean, broadcast_parameters, clip_grad_norm_, reduce_gradients
from .groups import ParallelGroups, init_from_env, make_groups, make_hierarchy, shutdown
from .ilp import cluster_ilp, map_clusters_ilp, milp_available
from .launch import free_port, run_local
from .placement import PlacementPlan, balanced_clusters, map_clusters, placement_metrics, plan_placement, uniform_plan
from .profile import RoutingProfile, record_routing
from .sharding import (
                         Placement,
                         contiguous_placement,
                         is_expert_parameter,
                         round_robin_placement,
                         shard_experts,
                         sharded_banks,
)

__all__ = ["ParallelGroups", "init_from_env", "make_groups", "shutdown", "shard_experts", "sharded_banks",
           "is_expert_parameter", "Placement", "contiguous_placement", "round_robin_placement",
           "reduce_gradients", "clip_grad_norm_", "broadcast_parameters", "all_reduce_mean", "gather_full_state_dict",
           "load_full_state_dict", "gather_full_optimizer_state", "load_full_optimizer_state", "gather_experts",
           "run_local", "free_port", "RoutingProfile", "record_routing", "PlacementPlan", "plan_placement",
           "balanced_clusters", "map_clusters", "placement_metrics", "uniform_plan", "apply_fsdp", "build_mesh",
           "is_fsdp", "bf16_supported", "local_numel", "memory_per_rank", "has_sharded", "init_optimizer_state",
           "load_sharded", "read_sharded_info", "save_sharded", "sharded_dir", "sharded_state", "make_hierarchy",
           "cluster_ilp", "map_clusters_ilp", "milp_available"]
