"""Router configuration (scorer, selector, balancer settings) — see specs/architectures.md §0."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..configs import check, check_choice, check_types

__all__ = ["RouterConfig"]

ScoreFunc = Literal["softmax", "sigmoid"]
Selector = Literal["topk", "expert_choice"]
AuxLevel = Literal["batch", "sequence", "global_batch"]
GroupScore = Literal["top2_sum", "max"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RouterConfig:
    """How tokens are scored, assigned and balanced.

    Attributes:
        score_func: ``softmax`` over experts (Switch/GShard/Mixtral) or per-expert ``sigmoid`` (DeepSeek-V3).
        norm_topk_prob: renormalise the selected scores to sum to 1 (Mixtral, DeepSeek-V3); False keeps the
            raw probabilities (Switch top-1, DeepSeek-V2). ``None`` (default) renormalises when ``top_k > 1``
            and keeps the raw top-1 probability when ``top_k == 1`` (Switch, arXiv 2101.03961 eq. 2;
            DeepSpeed-MoE): a renormalised single weight is always ``p/p = 1``, so the task loss would give the
            router no gradient and only the aux loss would train it. An explicit ``True`` with ``top_k=1`` is
            allowed for exact equivalences (sparse upcycling, Hugging Face imports) and has that consequence.
            Use :meth:`renormalize` to read the resolved value.
        routed_scaling_factor: multiplies the combine weights (2.5 in DeepSeek-V3).
        selector: ``topk`` (tokens choose experts) or ``expert_choice`` (experts choose tokens).
        num_groups / topk_groups: group-limited routing: experts are split into ``num_groups`` groups and
            each token only picks experts from its best ``topk_groups`` groups (DeepSeek-V3: 8 / 4).
        group_score: how a group is scored before keeping the best ``topk_groups``: ``top2_sum`` sums the
            group's two highest selection scores (DeepSeek-V3, arXiv 2412.19437, ``noaux_tc`` gate: scores
            plus the correction bias); ``max`` takes the group's highest score (DeepSeek-V2's device-limited
            ``group_limited_greedy``, arXiv 2405.04434 §2.1.3). A group of one expert scores its max either way.
        capacity_factor: ``None`` is dropless. Otherwise each expert takes at most
            ``ceil(capacity_factor * top_k * T / E)`` assignments; overflow is dropped in priority order
            (all first choices before second choices, then sequence order). For ``expert_choice`` it sets how
            many tokens each expert picks (default 1.0 there).
        eval_capacity_factor: capacity factor in eval mode (ST-MoE uses 2.0); ``None`` keeps the training one.
        aux_loss_coef: load-balancing loss coefficient (alpha, 1e-2 in Switch); 0 disables. The loss is
            ``E * sum_i f_i * P_i`` with ``f_i`` counting **all k choices** of every token before capacity dropping
            (Switch's loss generalised to top-k, as in Megatron-LM and DeepSpeed's top-k gating); see
            ``aux_loss_first_choice`` for GShard's form.
        aux_loss_first_choice: ``f_i`` counts only each token's first choice (GShard, arXiv 2006.16668
            Algorithm 1: ``m_e`` from the top-1 expert of each token), instead of all ``k`` choices.
        aux_loss_level: ``batch`` (Switch) or ``sequence`` (DeepSeek's per-sequence variant, averaged), both
            over this process's tokens; or ``global_batch`` (Qwen3 / Megatron's global-batch balancing): in
            distributed training the assignment fractions ``f`` count every process's tokens (summed over the
            world), so the loss averaged over processes is the single-process loss on the concatenated batch.
            In one process (and in evaluation) ``global_batch`` is ``batch``. Read by the plain MoE router;
            variants that compute their own balancing loss treat it as ``batch``.
        z_loss_coef: ST-MoE router z-loss coefficient (1e-3 in ST-MoE); 0 disables.
        bias_update_rate: DeepSeek-V3 auxiliary-loss-free balancing speed gamma (1e-3 in V3); 0 disables.
        jitter_eps: multiplicative input jitter in training (Switch: 1e-2); 0 disables.
        use_logit_bias: the router's linear map has a learned bias, ``logits = W x + b`` (GPT-OSS).
        use_selection_bias: selection adds the ``expert_bias`` buffer to the scores even when it is not
            updated (``bias_update_rate=0``), e.g. a DeepSeek-V3 checkpoint's trained correction bias.
    """

    score_func: ScoreFunc = "softmax"
    norm_topk_prob: bool | None = None
    routed_scaling_factor: float = 1.0
    selector: Selector = "topk"
    num_groups: int = 1
    topk_groups: int = 1
    group_score: GroupScore = "top2_sum"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    aux_loss_coef: float = 0.01
    aux_loss_level: AuxLevel = "batch"
    aux_loss_first_choice: bool = False
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    jitter_eps: float = 0.0
    use_logit_bias: bool = False
    use_selection_bias: bool = False

    def __post_init__(self) -> None:
        check_types(self, "router")
        check_choice("router", "score_func", self.score_func, ("softmax", "sigmoid"))
        check_choice("router", "selector", self.selector, ("topk", "expert_choice"))
        check_choice("router", "aux_loss_level", self.aux_loss_level, ("batch", "sequence", "global_batch"))
        check(self.norm_topk_prob in (None, True, False),
              f"router.norm_topk_prob={self.norm_topk_prob!r} must be true, false or unset (renormalise iff top_k > 1)")
        check_choice("router", "group_score", self.group_score, ("top2_sum", "max"))
        check(self.num_groups >= 1, f"router.num_groups={self.num_groups} must be >= 1; use 1 for no groups")
        check(1 <= self.topk_groups <= self.num_groups,
              f"router.topk_groups={self.topk_groups} must be in [1, num_groups={self.num_groups}]")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            check(value is None or (value > 0 and math.isfinite(value)),
                  f"router.{name}={value} must be positive and finite; use None (dropless) or a value such as 1.25")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "jitter_eps"):
            value = getattr(self, name)
            check(value >= 0 and math.isfinite(value), f"router.{name}={value} must be finite and >= 0; use 0 to "
                  f"disable it")
        check(self.routed_scaling_factor > 0 and math.isfinite(self.routed_scaling_factor),
              f"router.routed_scaling_factor={self.routed_scaling_factor} must be positive (1.0 is neutral)")
        check(self.jitter_eps < 1, f"router.jitter_eps={self.jitter_eps} must be < 1 (Switch uses 0.01)")

    def renormalize(self, top_k: int) -> bool:
        """Whether the ``top_k`` selected weights are renormalised (``norm_topk_prob`` resolved for ``top_k``)."""
        if self.norm_topk_prob is None:
            return top_k > 1
        return self.norm_topk_prob

    def validate_for(self, num_experts: int, top_k: int) -> None:
        """Cross-checks that need the layer's expert count and top_k."""
        check(num_experts % self.num_groups == 0,
              f"router.num_groups={self.num_groups} does not divide num_experts={num_experts}; "
              f"choose a divisor of {num_experts}")
        per_group = num_experts // self.num_groups
        if self.selector == "topk" and self.num_groups > 1:
            check(top_k <= self.topk_groups * per_group,
                  f"top_k={top_k} exceeds the {self.topk_groups} kept groups x {per_group} experts each; "
                  f"raise router.topk_groups or lower top_k")
        if self.selector == "expert_choice":
            check(self.bias_update_rate == 0 and self.num_groups == 1 and not self.use_selection_bias,
                  "router.selector='expert_choice' balances by construction; set bias_update_rate=0, "
                  "use_selection_bias=False and num_groups=1")
