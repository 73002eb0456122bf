"""Dense feed-forward -> MoE: sparse upcycling and fine-grained splitting (MoEfication).

Dim legend: N calibration tokens, T tokens, D model dim, F dense hidden dim, E experts, K experts per token,
G = F / E neurons per split expert.

- **Sparse upcycling** (Komatsuzaki et al. 2023, arXiv 2212.05055): every expert is a copy of the dense FFN,
  the router is new (small random), combine weights are renormalised top-k. Because the experts are equal and
  the weights sum to 1, the layer equals the dense FFN for any router and any k, until training (or the
  optional noise) makes the experts differ.
- **Fine-grained splitting** (MoEfication, Zhang et al. 2022, arXiv 2110.01786; Read-ME, arXiv 2410.19123):
  the F hidden neurons are partitioned into E groups of G; expert e keeps rows ``S_e`` of ``W_up`` (and
  ``b_up``), columns ``S_e`` of ``W_down``. The dense output bias is added once, outside the experts, and
  selected experts are summed with weight 1, so with all E experts active the layer *is* the dense FFN
  (up to float summation order). The groups come from co-activation clustering of the neurons on
  calibration text (neurons that fire together share an expert, so few experts carry most of a token's
  activation). The router is a ridge-regression fit of each expert's output norm ``||W_down[:, S_e] h_{S_e}||``
  from the FFN input: MoEfication trains a small MLP to predict the same ranking; a linear fit keeps this
  closed-form. Top-k selection then drops the experts predicted to matter least.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..experts import Activation, FeedForward, hidden
from ..layers import MoE, MoEConfig
from ..routing import RouterConfig
from ..types import Routing, RoutingContext

__all__ = ["DenseFFN", "sparse_upcycle", "cluster_neurons", "random_partition", "expert_importance",
           "fit_router", "SplitFFN", "split_ffn", "moefy", "set_top_k"]


@dataclass(frozen=True)
class DenseFFN:
    """A dense FFN ``W_down act(W_gate x + b_gate, W_up x + b_up) + b_down`` in moekit's vocabulary.

    Shapes: ``w_up, w_gate [F, D]``, ``w_down [D, F]``, ``b_up, b_gate [F]``, ``b_down [D]``.
    """

    w_up: torch.Tensor
    w_down: torch.Tensor
    activation: str
    w_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    b_down: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.w_up.shape[1]

    @property
    def hidden_dim(self) -> int:
        return self.w_up.shape[0]

    @classmethod
    def from_feedforward(cls, ff: FeedForward) -> DenseFFN:
        return cls(w_up=ff.w_up.detach(), w_down=ff.w_down.detach(), activation=ff.activation,
                   w_gate=None if ff.w_gate is None else ff.w_gate.detach())

    def hidden(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The hidden activations ``[T, F]``."""
        gate = F.linear(x_TD, self.w_gate, self.b_gate) if self.w_gate is not None else None
        return hidden(self.activation, gate, F.linear(x_TD, self.w_up, self.b_up))

    def __call__(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(x_TD), self.w_down, self.b_down)


def _has_bias(ffn: DenseFFN) -> bool:
    return ffn.b_up is not None or ffn.b_down is not None or ffn.b_gate is not None


def _fill_bank(moe: MoE, ffn: DenseFFN, groups_EG: torch.Tensor | None, with_down_bias: bool) -> None:
    """Copy the dense weights into the expert bank: whole (upcycling) or neuron groups (splitting)."""
    E = moe.config.num_experts
    pick = (lambda t, dim: t.unsqueeze(0).expand(E, *t.shape)) if groups_EG is None else \
        (lambda t, dim: torch.stack([t.index_select(dim, g) for g in groups_EG]))
    bank = moe.experts
    with torch.no_grad():
        bank.w_up.copy_(pick(ffn.w_up, 0))
        bank.w_down.copy_(pick(ffn.w_down, 1))
        if bank.w_gate is not None:
            bank.w_gate.copy_(pick(ffn.w_gate, 0))
        if bank.use_bias:
            assert bank.b_up is not None and bank.b_down is not None, "a bank with use_bias has its biases"
            zeros_F, zeros_D = ffn.w_up.new_zeros(ffn.hidden_dim), ffn.w_up.new_zeros(ffn.dim)
            bank.b_up.copy_(pick(ffn.b_up if ffn.b_up is not None else zeros_F, 0))
            if bank.b_gate is not None:
                bank.b_gate.copy_(pick(ffn.b_gate if ffn.b_gate is not None else zeros_F, 0))
            down = ffn.b_down if (ffn.b_down is not None and with_down_bias) else zeros_D
            bank.b_down.copy_(down.unsqueeze(0).expand(E, -1))


def sparse_upcycle(ffn: DenseFFN, num_experts: int, top_k: int, *, noise_std: float = 0.0,
                   router_std: float = 0.02, seed: int = 0, engine: str = "auto", name: str = "moe",
                   router: RouterConfig | None = None) -> MoE:
    """Sparse upcycling: E copies of ``ffn`` behind a new top-k router with renormalised weights.

    Args:
        noise_std: multiplicative Gaussian noise on each expert's copy (``w * (1 + noise_std * n)``) to break
            the experts' symmetry; 0 keeps the layer exactly equal to ``ffn``.
        router_std: standard deviation of the new router's weights.
        router: router settings; must keep ``norm_topk_prob=True`` for the layer to equal ``ffn``.
    """
    router = router or RouterConfig(norm_topk_prob=True)
    cfg = MoEConfig(dim=ffn.dim, hidden_dim=ffn.hidden_dim, num_experts=num_experts, top_k=top_k,
                    activation=cast(Activation, ffn.activation), use_ffn_bias=_has_bias(ffn), engine=engine, router=router)
    moe = MoE(cfg, name=name).to(ffn.w_up.device, ffn.w_up.dtype)
    _fill_bank(moe, ffn, None, with_down_bias=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=gen) * router_std)
        if noise_std > 0:
            for w in (moe.experts.w_up, moe.experts.w_gate, moe.experts.w_down):
                if w is not None:
                    w.mul_(1 + noise_std * torch.randn(w.shape, generator=gen).to(w))
    return moe


def random_partition(hidden_dim: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """A random equal partition of ``hidden_dim`` neurons: ``[E, G]`` indices (the baseline to beat)."""
    _check_divisible(hidden_dim, num_experts)
    perm = torch.randperm(hidden_dim, generator=torch.Generator().manual_seed(seed))
    return perm.view(num_experts, -1).sort(dim=1).values


def _check_divisible(hidden_dim: int, num_experts: int) -> None:
    if hidden_dim % num_experts:
        raise ValueError(f"num_experts={num_experts} does not divide the FFN's hidden_dim={hidden_dim}; "
                         f"choose a divisor of {hidden_dim}")


def _balanced_assign(sim_FE: torch.Tensor, size: int) -> torch.Tensor:
    """Each neuron to one cluster, exactly ``size`` per cluster, greedily by descending similarity."""
    F_, E = sim_FE.shape
    order = sim_FE.flatten().argsort(descending=True)
    assign, fill, done = [-1] * F_, [0] * E, 0
    for f, e in zip((order // E).tolist(), (order % E).tolist()):  # plain lists: no per-item tensor ops
        if assign[f] < 0 and fill[e] < size:
            assign[f] = e
            fill[e] += 1
            done += 1
            if done == F_:
                break
    return torch.tensor(assign)


def cluster_neurons(active_NF: torch.Tensor, num_experts: int, *, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Balanced co-activation clustering of neurons (MoEfication's co-activation split).

    Each neuron is described by its centred, normalised activity pattern over the N calibration tokens, so
    that the similarity of two neurons is the correlation of their firing. Spherical k-means with an exact
    balance constraint (E groups of ``F / E``) groups neurons that fire together.

    Args:
        active_NF: activity of every neuron on every calibration token (bool or float, e.g. ``h > 0``).

    Returns:
        ``[E, G]`` neuron indices, each row sorted.
    """
    N, F_ = active_NF.shape
    _check_divisible(F_, num_experts)
    X_FN = active_NF.float().T
    X_FN = X_FN - X_FN.mean(1, keepdim=True)
    X_FN = X_FN / X_FN.norm(dim=1, keepdim=True).clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    centroids_EN = X_FN[torch.randperm(F_, generator=gen)[:num_experts]]
    assign = torch.zeros(F_, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(X_FN @ centroids_EN.T, F_ // num_experts)
        if torch.equal(new, assign):
            break
        assign = new
        centroids_EN = torch.zeros_like(centroids_EN).index_add_(0, assign, X_FN)  # sums; normalised below
        centroids_EN = centroids_EN / centroids_EN.norm(dim=1, keepdim=True).clamp_min(1e-6)
    return torch.stack([torch.nonzero(assign == e).flatten() for e in range(num_experts)])


def expert_importance(ffn: DenseFFN, groups_EG: torch.Tensor, x_ND: torch.Tensor, chunk: int = 2048
                      ) -> torch.Tensor:
    """``[N, E]``: the norm of each split expert's contribution ``||W_down[:, S_e] h_{S_e}(x)||`` per token."""
    out = []
    w_down_EDG = torch.stack([ffn.w_down[:, g] for g in groups_EG])
    for start in range(0, x_ND.shape[0], chunk):
        h_NF = ffn.hidden(x_ND[start:start + chunk])
        h_ENG = torch.stack([h_NF[:, g] for g in groups_EG])
        out.append(torch.einsum("edg,eng->ned", w_down_EDG, h_ENG).norm(dim=-1))
    return torch.cat(out)


def fit_router(x_ND: torch.Tensor, target_NE: torch.Tensor, ridge: float = 1e-2
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (ridge) linear map predicting ``target_NE`` from ``x_ND``: ``(weight [E, D], bias [E])``."""
    x = x_ND.double()
    mean_x, mean_t = x.mean(0), target_NE.double().mean(0)
    xc, tc = x - mean_x, target_NE.double() - mean_t
    gram = xc.T @ xc + ridge * x.shape[0] * torch.eye(x.shape[1], dtype=torch.float64)
    w_DE = torch.linalg.solve(gram, xc.T @ tc)
    return w_DE.T.float(), (mean_t - mean_x @ w_DE).float()


class SplitFFN(nn.Module):
    """A dense FFN split into neuron-group experts: ``y = sum_{e in topk} E_e(x) + b_down``.

    The selected experts are summed with weight 1 (they are parts of one function, not alternatives); the
    router only chooses which parts to compute. Reuses moekit's Router (logit bias on) and engines.
    """

    def __init__(self, moe: MoE, b_down_D: torch.Tensor | None) -> None:
        super().__init__()
        self.moe = moe
        self.register_parameter("b_down", None if b_down_D is None else nn.Parameter(b_down_D.clone()))

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.moe.route(x_TD, ctx)
        ones = Routing(expert_ids_TK=routing.expert_ids_TK, weights_TK=(routing.expert_ids_TK >= 0).to(x.dtype),
                       scores_TE=routing.scores_TE, logits_TE=routing.logits_TE)
        y_TD = self.moe.combine(x_TD, ones, ctx)
        b_down = self.b_down
        assert b_down is None or isinstance(b_down, torch.Tensor)
        return (y_TD if b_down is None else y_TD + b_down).view(x.shape)


def split_ffn(ffn: DenseFFN, groups_EG: torch.Tensor, top_k: int, *,
              router: tuple[torch.Tensor, torch.Tensor] | None = None, engine: str = "auto",
              name: str = "moe") -> SplitFFN:
    """Split ``ffn`` into ``E = len(groups_EG)`` experts; ``router = (weight [E, D], bias [E])`` or zeros."""
    flat = groups_EG.flatten().sort().values
    if not torch.equal(flat, torch.arange(ffn.hidden_dim, device=flat.device)):
        raise ValueError(f"groups_EG must partition the {ffn.hidden_dim} neurons exactly once each")
    E, G = groups_EG.shape
    cfg = MoEConfig(dim=ffn.dim, hidden_dim=G, num_experts=E, top_k=top_k, activation=cast(Activation, ffn.activation),
                    use_ffn_bias=_has_bias(ffn), engine=engine,
                    router=RouterConfig(use_logit_bias=True, norm_topk_prob=False, aux_loss_coef=0.0))
    moe = MoE(cfg, name=name).to(ffn.w_up.device, ffn.w_up.dtype)
    _fill_bank(moe, ffn, groups_EG, with_down_bias=False)
    with torch.no_grad():
        w, b = router if router is not None else (torch.zeros(E, ffn.dim), torch.zeros(E))
        moe.router.weight.copy_(w)
        assert moe.router.bias is not None, "the split router has a logit bias"
        moe.router.bias.copy_(b)
    return SplitFFN(moe, ffn.b_down)


def moefy(ffn: DenseFFN, calib_x_ND: torch.Tensor, num_experts: int, top_k: int, *,
          method: str = "coactivation", seed: int = 0, engine: str = "auto", name: str = "moe") -> SplitFFN:
    """Split ``ffn`` with groups from calibration inputs (``coactivation`` clustering or ``random``), and a
    router fitted to predict each group's output norm on the same inputs."""
    if method == "coactivation":
        groups = cluster_neurons(ffn.hidden(calib_x_ND) > 0, num_experts, seed=seed)
    elif method == "random":
        groups = random_partition(ffn.hidden_dim, num_experts, seed=seed)
    else:
        raise ValueError(f"method={method!r} is not one of ['coactivation', 'random']")
    router = fit_router(calib_x_ND, expert_importance(ffn, groups, calib_x_ND))
    return split_ffn(ffn, groups, top_k, router=router, engine=engine, name=name)


def set_top_k(module: nn.Module, top_k: int) -> None:
    """Change how many experts each token uses, in every MoE inside ``module`` (e.g. for a k sweep)."""
    for moe in [m for m in module.modules() if isinstance(m, MoE)]:
        moe.config = replace(moe.config, top_k=top_k)  # validates top_k against num_experts
        moe.router.top_k = top_k
