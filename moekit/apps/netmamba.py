"""NetMamba (no spec section; the issue's summary is the spec): a unidirectional Mamba over a byte-level traffic
representation, classifying flows of several protocol classes, with an optional MoE feed-forward.

Traffic representation (:func:`flow_bytes`; choices ours, after the paper's abstract): the first ``packets``
packets of a flow, each as its IPv4 header + transport header (TCP 20 bytes; UDP 8 bytes zero-padded to 20) and
the first ``payload_bytes`` payload bytes (zero-padded), concatenated; missing packets are all-zero. *Header fields
are kept* (version/IHL, TOS, total length, TTL, protocol, TCP offset/flags/window, UDP length); *address-like and
random identifiers are removed* (zeroed): IP source/destination, ports, IP identification, checksums and TCP
sequence/acknowledgement numbers — ports would make the label trivial and the others are per-flow noise, the
"biases" a classifier should not learn. Each byte value has a learned 8-dim embedding; each run of ``patch`` bytes
is one token (the ``patch`` embeddings concatenated and projected: a stride-``patch`` patch embedding; choice:
scaling bytes to ``v/255`` made the length fields that separate the two TLS classes nearly invisible), so a flow is ``T = packets·(40 + payload_bytes)/patch`` tokens.

Flows (:func:`make_flows`) are built with ``dpkt`` packet classes (``dpkt.ip.IP``, ``dpkt.tcp.TCP``,
``dpkt.udp.UDP``, ``dpkt.dns.DNS``, ``dpkt.ntp.NTP``) for six classes: HTTP (plain-text request/response),
TLS browsing (handshake, small records), TLS streaming (handshake, then full-size application-data records),
SSH (version banners, then binary), DNS (query/response) and NTP (client/server); lengths, TTLs, windows and
payload contents are randomised per flow.

Model (:class:`NetMamba`): patch embedding + learned positions → ``depth`` pre-norm residual blocks of
:class:`Mamba` (selective SSM, Mamba-1) and, when ``ffn`` is ``"dense"`` or ``"moe"``, a residual feed-forward
(moekit's :class:`~moekit.layers.moe.MoE`, top-1, for ``"moe"``) → RMSNorm → mean over positions → linear
classifier. Mamba mixer (Gu & Dao 2023, Alg. 2): ``[x, z] = W_in u``; ``x ← SiLU(causal depthwise conv(x))``;
``Δ = softplus(W_Δ W_r x + b_Δ)``, ``B = W_B x``, ``C = W_C x``; ``A = −exp(A_log)``;
``h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t B_t) x_t``, ``y_t = C_t·h_t + D ⊙ x_t``; out ``= W_out (y ⊙ SiLU(z))``. The scan
(:func:`selective_scan`) is a pure-PyTorch loop over time, batched over everything else; :meth:`Mamba.step` is the
token-by-token recurrent form (conv and SSM state carried), the readable reference it is tested against.

Dims: B flows, T tokens, D model, I inner (expand·D), N state, K conv width, R Δ rank, Y classes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.moe import MoE, MoEConfig
from ..routing import RouterConfig
from ..types import RoutingContext
from .common import AppRun, check_field, median
from .registry import register_app

__all__ = ["CLASSES", "Mamba", "NetMamba", "NetMambaConfig", "flow_bytes", "make_flows", "run", "selective_scan",
           "train_eval"]

CLASSES = ("http", "tls_browsing", "tls_streaming", "ssh", "dns", "ntp")
HEADER_BYTES = 40


@dataclass(frozen=True, kw_only=True)
class NetMambaConfig:
    """NetMamba application settings."""

    seeds: int = 3
    flows_per_class: int = 120
    test_fraction: float = 0.3
    packets: int = 5
    payload_bytes: int = 24
    patch: int = 8
    dim: int = 32
    state: int = 8
    expand: int = 2
    conv: int = 4
    depth: int = 2
    ffn: Literal["none", "dense", "moe"] = "moe"
    num_experts: int = 4
    aux_loss_coef: float = 0.01
    epochs: int = 5
    batch_size: int = 32
    lr: float = 5e-3

    def __post_init__(self) -> None:
        n = type(self).__name__
        for f in ("seeds", "flows_per_class", "packets", "patch", "dim", "state", "expand", "conv", "depth",
                  "num_experts", "epochs", "batch_size"):
            check_field(getattr(self, f) >= 1, n, f, getattr(self, f), ">= 1")
        check_field(self.payload_bytes >= 0, n, "payload_bytes", self.payload_bytes, ">= 0")
        per = HEADER_BYTES + self.payload_bytes
        check_field(per % self.patch == 0, n, "patch", self.patch,
                    f"a divisor of the packet length {HEADER_BYTES} + payload_bytes = {per}",
                    "change patch or payload_bytes")
        check_field(0 < self.test_fraction < 1, n, "test_fraction", self.test_fraction, "in (0, 1)")
        check_field(self.ffn in ("none", "dense", "moe"), n, "ffn", self.ffn, "none, dense or moe")
        check_field(self.aux_loss_coef >= 0, n, "aux_loss_coef", self.aux_loss_coef, ">= 0")
        check_field(self.lr > 0, n, "lr", self.lr, "> 0")


# ---------------------------------------------------------------- flows (dpkt)

def _ip(proto_payload, proto: int, ttl: int):
    import dpkt
    ip = dpkt.ip.IP(src=bytes(random.randrange(256) for _ in range(4)),
                    dst=bytes(random.randrange(256) for _ in range(4)), p=proto, ttl=ttl,
                    id=random.randrange(65536), data=proto_payload)
    ip.len = len(ip)
    return ip


def _tcp(payload: bytes, sport: int, dport: int, flags: int, window: int):
    import dpkt
    return dpkt.tcp.TCP(sport=sport, dport=dport, seq=random.randrange(2 ** 32), ack=random.randrange(2 ** 32),
                        flags=flags, win=window, data=payload)


def _udp(payload: bytes, sport: int, dport: int):
    import dpkt
    u = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    u.ulen = len(u)
    return u


def _rand(n: int) -> bytes:
    return bytes(random.randrange(256) for _ in range(n))


def _flow_packets(cls: str, rng: random.Random) -> list:
    """The packets (``dpkt.ip.IP``) of one flow of class ``cls``; ``random`` is seeded by the caller."""
    import dpkt
    ttl = rng.choice((64, 128, 255)) - rng.randrange(0, 20)
    eph = rng.randrange(1024, 65535)
    psh_ack = dpkt.tcp.TH_PUSH | dpkt.tcp.TH_ACK
    win = rng.randrange(1000, 65535)
    pk = []
    if cls == "http":
        path = "/" + "".join(rng.choice("abcdefghij/") for _ in range(rng.randrange(1, 20)))
        req = f"GET {path} HTTP/1.1\r\nHost: ex{rng.randrange(99)}.org\r\n\r\n".encode()
        pk.append(_tcp(req, eph, 80, psh_ack, win))
        body = b"<html>" + _rand(rng.randrange(50, 1200))
        pk.append(_tcp(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body, 80, eph, psh_ack, win))
        pk += [_tcp(_rand(rng.randrange(200, 1400)), 80, eph, psh_ack, win) for _ in range(rng.randrange(0, 4))]
    elif cls in ("tls_browsing", "tls_streaming"):
        hello = b"\x16\x03\x01" + (rng.randrange(180, 520)).to_bytes(2, "big") + b"\x01" + _rand(rng.randrange(180, 400))
        pk.append(_tcp(hello, eph, 443, psh_ack, win))
        pk.append(_tcp(b"\x16\x03\x03" + (1300).to_bytes(2, "big") + b"\x02" + _rand(rng.randrange(800, 1400)),
                       443, eph, psh_ack, win))
        for _ in range(rng.randrange(2, 5)):
            n = rng.randrange(1360, 1448) if cls == "tls_streaming" else rng.randrange(60, 700)
            pk.append(_tcp(b"\x17\x03\x03" + n.to_bytes(2, "big") + _rand(n), 443 if cls == "tls_streaming"
                           or rng.random() < 0.5 else eph, eph, psh_ack, win))
    elif cls == "ssh":
        pk.append(_tcp(b"SSH-2.0-OpenSSH_%d.%d\r\n" % (rng.randrange(5, 10), rng.randrange(10)), eph, 22, psh_ack, win))
        pk.append(_tcp(b"SSH-2.0-OpenSSH_%d.%dp1\r\n" % (rng.randrange(5, 10), rng.randrange(10)), 22, eph, psh_ack,
                       win))
        pk += [_tcp(_rand(4 * rng.randrange(10, 200)), 22, eph, psh_ack, win) for _ in range(rng.randrange(1, 4))]
    elif cls == "dns":
        name = "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randrange(3, 15))) + ".com"
        q = dpkt.dns.DNS(id=rng.randrange(65536), qd=[dpkt.dns.DNS.Q(name=name, type=rng.choice((1, 28)))])
        pk.append(_udp(bytes(q), eph, 53))
        q.op = dpkt.dns.DNS_RA
        q.qr = dpkt.dns.DNS_R
        q.an = [dpkt.dns.DNS.RR(name=name, type=1, ttl=rng.randrange(60, 3600), rdata=_rand(4))]
        pk.append(_udp(bytes(q), 53, eph))
    else:  # ntp
        for mode in (3, 4):
            n = dpkt.ntp.NTP(flags=(4 << 3) | mode, stratum=0 if mode == 3 else rng.randrange(1, 4),
                             interval=rng.randrange(4, 10), precision=rng.randrange(232, 256), id=_rand(4),
                             update_time=_rand(8), originate_time=_rand(8), receive_time=_rand(8),
                             transmit_time=_rand(8))
            pk.append(_udp(bytes(n), eph if mode == 3 else 123, 123 if mode == 3 else eph))
    proto = 17 if cls in ("dns", "ntp") else 6
    return [_ip(p, proto, ttl) for p in pk]


def flow_bytes(packets: list, num_packets: int, payload_bytes: int) -> bytes:
    """The anonymised byte representation of one flow: ``num_packets·(40 + payload_bytes)`` bytes."""
    out = bytearray()
    for ip in packets[:num_packets]:
        raw = bytearray(bytes(ip))
        ihl = (raw[0] & 0x0F) * 4
        raw[4:6] = b"\0\0"      # identification
        raw[10:20] = bytes(10)  # header checksum, source, destination
        trans = raw[ihl:]
        proto = raw[9]
        th = ((trans[12] >> 4) * 4) if proto == 6 else 8
        head = bytearray(trans[:th])
        head[0:4] = bytes(4)  # ports
        if proto == 6:
            head[4:12] = bytes(8)    # sequence, acknowledgement
            head[16:18] = b"\0\0"    # checksum
        else:
            head[6:8] = b"\0\0"      # checksum
        head = (head + bytes(20))[:20]
        payload = bytes(trans[th:th + payload_bytes])
        out += bytes(raw[:20]) + bytes(head) + payload + bytes(payload_bytes - len(payload))
    out += bytes((num_packets - min(len(packets), num_packets)) * (HEADER_BYTES + payload_bytes))
    return bytes(out)


def make_flows(cfg: NetMambaConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bytes [n, L] uint8, labels [n])``, ``flows_per_class`` flows of each class, shuffled."""
    rng = random.Random(seed)
    state = random.getstate()
    random.seed(seed + 7919)  # the dpkt helpers use the module's RNG for addresses and payload bytes
    try:
        rows, labels = [], []
        for c, cls in enumerate(CLASSES):
            for _ in range(cfg.flows_per_class):
                rows.append(flow_bytes(_flow_packets(cls, rng), cfg.packets, cfg.payload_bytes))
                labels.append(c)
    finally:
        random.setstate(state)
    x = torch.tensor([list(r) for r in rows], dtype=torch.uint8)
    y = torch.tensor(labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm], y[perm]


# ---------------------------------------------------------------- Mamba

def selective_scan(x_BTI: torch.Tensor, delta_BTI: torch.Tensor, a_IN: torch.Tensor, b_BTN: torch.Tensor,
                   c_BTN: torch.Tensor, d_I: torch.Tensor, h0_BIN: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [B, T, I], last state [B, I, N])`` of ``h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t x_t``,
    ``y_t = C_t·h_t + D x_t``: discretisation for all ``t`` at once, then a loop over ``t``."""
    bsz, t_len, inner = x_BTI.shape
    da_BTIN = torch.exp(delta_BTI[..., None] * a_IN)
    dbx_BTIN = (delta_BTI * x_BTI)[..., None] * b_BTN[:, :, None, :]
    h = h0_BIN if h0_BIN is not None else x_BTI.new_zeros(bsz, inner, a_IN.shape[1])
    ys = []
    for t in range(t_len):
        h = da_BTIN[:, t] * h + dbx_BTIN[:, t]
        ys.append((h * c_BTN[:, t, None, :]).sum(-1))
    y_BTI = torch.stack(ys, 1) if ys else x_BTI.new_zeros(bsz, 0, inner)
    return y_BTI + x_BTI * d_I, h


class Mamba(nn.Module):
    """The Mamba-1 mixer: in-projection, causal depthwise conv, selective SSM, SiLU gate, out-projection."""

    def __init__(self, dim: int, state: int = 8, expand: int = 2, conv: int = 4) -> None:
        super().__init__()
        inner, rank = expand * dim, max(1, math.ceil(dim / 16))
        self.inner, self.state, self.rank, self.k = inner, state, rank, conv
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, conv, groups=inner, padding=conv - 1)
        self.x_proj = nn.Linear(inner, rank + 2 * state, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt), dt ∈ [1e-3, 0.1]
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def _ssm_inputs(self, x_BTI: torch.Tensor):
        r, n = self.rank, self.state
        dbc = self.x_proj(x_BTI)
        delta = F.softplus(self.dt_proj(dbc[..., :r]))
        return delta, dbc[..., r:r + n], dbc[..., r + n:], -torch.exp(self.A_log)

    def forward(self, u_BTD: torch.Tensor) -> torch.Tensor:
        t_len = u_BTD.shape[1]
        x_BTI, z_BTI = self.in_proj(u_BTD).chunk(2, -1)
        x_BTI = F.silu(self.conv(x_BTI.transpose(1, 2))[..., :t_len].transpose(1, 2))
        delta, b, c, a = self._ssm_inputs(x_BTI)
        y, _ = selective_scan(x_BTI, delta, a, b, c, self.D)
        return self.out_proj(y * F.silu(z_BTI))

    def init_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(conv window [B, I, K], SSM state [B, I, N])``, both zero."""
        return torch.zeros(batch, self.inner, self.k), torch.zeros(batch, self.inner, self.state)

    def step(self, u_BD: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One token: the recurrent reference form (an explicit conv window and ``h``, no ``selective_scan``)."""
        win_BIK, h_BIN = cache
        x_BI, z_BI = self.in_proj(u_BD).chunk(2, -1)
        win_BIK = torch.cat([win_BIK[..., 1:], x_BI[..., None]], -1)
        assert self.conv.bias is not None
        x_BI = F.silu((win_BIK * self.conv.weight[:, 0]).sum(-1) + self.conv.bias)
        delta_BI, b_BN, c_BN, a_IN = self._ssm_inputs(x_BI)
        h_BIN = torch.exp(delta_BI[..., None] * a_IN) * h_BIN + (delta_BI * x_BI)[..., None] * b_BN[:, None]
        y_BI = (h_BIN * c_BN[:, None]).sum(-1) + self.D * x_BI
        return self.out_proj(y_BI * F.silu(z_BI)), (win_BIK, h_BIN)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _DenseFFN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class NetMamba(nn.Module):
    """Patch embedding → ``depth`` × (Mamba [+ FFN or MoE FFN]) → RMSNorm → mean pool → classifier."""

    def __init__(self, cfg: NetMambaConfig, num_tokens: int, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        d = cfg.dim
        self.patch = cfg.patch
        self.byte_embed = nn.Embedding(256, 8)
        self.embed = nn.Linear(8 * cfg.patch, d)
        self.pos = nn.Parameter(0.02 * torch.randn(num_tokens, d))
        self.mixers = nn.ModuleList([Mamba(d, cfg.state, cfg.expand, cfg.conv) for _ in range(cfg.depth)])
        self.norms = nn.ModuleList([_RMSNorm(d) for _ in range(cfg.depth)])
        self.ffns = nn.ModuleList()
        self.ffn_norms = nn.ModuleList()
        if cfg.ffn != "none":
            moe_cfg = MoEConfig(dim=d, hidden_dim=4 * d, num_experts=cfg.num_experts, top_k=1, activation="gelu",
                                router=RouterConfig(aux_loss_coef=cfg.aux_loss_coef))
            for i in range(cfg.depth):
                self.ffns.append(MoE(moe_cfg, name=f"block{i}") if cfg.ffn == "moe" else _DenseFFN(d))
                self.ffn_norms.append(_RMSNorm(d))
        self.out_norm = _RMSNorm(d)
        self.head = nn.Linear(d, num_classes)

    def tokens(self, bytes_BL: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` uint8 → patch tokens ``[B, T, D]``: byte embeddings (8 each) of a patch, concatenated and
        projected, plus learned positions."""
        e = self.byte_embed(bytes_BL.long()).view(bytes_BL.shape[0], -1, 8 * self.patch)
        return self.embed(e) + self.pos[: e.shape[1]]

    def forward(self, bytes_BL: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        h_BTD = self.tokens(bytes_BL)
        for i, (norm, mixer) in enumerate(zip(self.norms, self.mixers, strict=True)):
            h_BTD = h_BTD + mixer(norm(h_BTD))
            if len(self.ffns):
                h_BTD = h_BTD + self.ffns[i](self.ffn_norms[i](h_BTD), ctx)
        return self.head(self.out_norm(h_BTD).mean(1))


def train_eval(cfg: NetMambaConfig, seed: int, data=None) -> dict:
    """Train one NetMamba on a seeded train/test split; test accuracy, macro-F1 and per-class recall."""
    x, y = data if data is not None else make_flows(cfg, seed)
    n_test = max(1, int(round(cfg.test_fraction * len(y))))
    x_tr, y_tr, x_te, y_te = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    torch.manual_seed(seed)
    model = NetMamba(cfg, x.shape[1] // cfg.patch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen)
        for i in range(0, len(y_tr), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            ctx = RoutingContext()
            loss = F.cross_entropy(model(x_tr[idx], ctx), y_tr[idx]) + ctx.total_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x_te[i:i + 128]).argmax(-1) for i in range(0, len(y_te), 128)])
    recall, f1 = [], []
    for c in range(len(CLASSES)):
        tp = int(((pred == c) & (y_te == c)).sum())
        p_n, t_n = int((pred == c).sum()), int((y_te == c).sum())
        recall.append(tp / t_n if t_n else 0.0)
        f1.append(2 * tp / (p_n + t_n) if p_n + t_n else 0.0)
    return {"accuracy": float((pred == y_te).float().mean()), "macro_f1": sum(f1) / len(f1),
            "recall": dict(zip(CLASSES, recall, strict=True)),
            "params": sum(p.numel() for p in model.parameters())}


@register_app("netmamba", config=NetMambaConfig, requires=("dpkt",),
              summary="NetMamba (no spec): unidirectional Mamba over anonymised packet bytes of dpkt-built flows "
                      "(6 protocol classes), without vs with an MoE feed-forward")
def run(config: NetMambaConfig, out_dir: Path) -> dict:
    import dataclasses
    rec = AppRun(out_dir, "netmamba", config)
    variants: tuple[Literal["none", "dense", "moe"], ...] = ("none", "moe")
    res: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in range(config.seeds):
        data = make_flows(config, seed)
        for v in variants:
            m = train_eval(dataclasses.replace(config, ffn=v), seed, data)
            res[v].append(m)
            rec.log({"seed": seed, "ffn": v, **m})
    med = {v: {f: median([r[f] for r in rs]) for f in ("accuracy", "macro_f1")} for v, rs in res.items()}

    def draw(fig, ax):
        for i, v in enumerate(variants):
            ax.scatter([i] * len(res[v]), [r["accuracy"] for r in res[v]], color=f"C{i}")
        ax.set_xticks(range(len(variants)), [f"Mamba, FFN: {v}" for v in variants])
        ax.set_ylabel("test accuracy")
        ax.set_title("6 protocol classes, anonymised packet bytes, one point per seed")
        ax.grid(alpha=0.3)
    rec.plot("accuracy", draw)
    return rec.finish({"app": "netmamba", "seeds": config.seeds, "median": med,
                       "params": {v: res[v][0]["params"] for v in variants}})
