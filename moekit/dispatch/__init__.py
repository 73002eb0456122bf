"""Engines: how routed tokens reach their experts. Selected by name through one registry."""

from . import alltoall, compiled, fused_triton, reference, sorted  # noqa: F401  (registers the engines)
from .alltoall import ExpertShard, alltoall_engine
from .compiled import sorted_op_engine
from .fused_triton import triton_engine
from .reference import reference_engine
from .registry import ENGINES, Engine, get_engine, register_engine, resolve_engine
from .sorted import grouped_mm_engine, sorted_blocked_engine, sorted_engine

__all__ = ["ENGINES", "Engine", "get_engine", "register_engine", "resolve_engine", "reference_engine",
           "sorted_engine", "sorted_blocked_engine", "grouped_mm_engine", "sorted_op_engine", "alltoall_engine", "ExpertShard",
           "triton_engine"]
