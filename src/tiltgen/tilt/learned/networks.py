"""Guidance networks: scalar potentials F_psi(z, t, e) with a cheap gradient in z.

Each network maps a preconditioned state z [N, ...], times t [N] and an optional condition
embedding e [N, E] to one scalar per sample [N]. ``value_and_grad`` also returns dF/dz
(shaped like z); the guidance needs it at every sampler step, so the MLP computes it in
closed form (one extra pass of small matmuls, no autograd graph) while the conv net falls
back to autograd. Both are differentiable, so training can back-propagate through the
gradient (the consistency loss needs that).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ...errors import TiltgenError


class FourierTime(nn.Module):
    """t [N] -> [N, 2 * freqs] sin/cos features at log-spaced frequencies (fixed, not trained)."""

    def __init__(self, freqs: int = 8, max_freq: float = 64.0):
        super().__init__()
        self.register_buffer("freqs", torch.logspace(0, math.log10(max_freq), freqs) * math.pi, persistent=False)

    @property
    def dim(self) -> int:
        return 2 * self.freqs.numel()

    def forward(self, t: Tensor) -> Tensor:
        angle = t[:, None].to(self.freqs.dtype) * self.freqs
        return torch.cat([angle.sin(), angle.cos()], 1)


def _tanh_and_slope(a: Tensor) -> tuple[Tensor, Tensor]:
    h = torch.tanh(a)
    return h, torch.addcmul(torch.ones((), dtype=h.dtype), h, h, value=-1)  # 1 - h^2 in one op


@dataclass(frozen=True)
class MLPConfig:
    """Potential MLP for vector data [N, dim]."""

    dim: int
    hidden: int = 32
    depth: int = 2
    cond_dim: int = 0
    time_freqs: int = 8
    kind: str = "mlp"
    linear_skip: bool = False  # add z . (A phi(t) + B e + b) (see PotentialMLP)
    quadratic_skip: bool = False  # add 1/2 sum_i q_i z_i^2, q = Q phi(t) + C e + c (see PotentialMLP)


class PotentialMLP(nn.Module):
    """F(z, t, e) = w . h_L + v . phi(t) [+ z . (A phi(t) + B e + b)] [+ 1/2 sum_i q_i(t, e) z_i^2],
    h_l = tanh(W_l h_{l-1} + U_l phi(t) + C_l e + b_l).

    The optional linear skip (``linear_skip``) carries the part of log h_t that is linear in
    z: for a linear reward on a Gaussian mode log h_t is exactly linear in x_t, with a slope
    that grows like 1/beta, and bounded tanh units need large weights to build a wide-range
    linear function. On the analytic bench the skip halved the 32-D cases' distance.
    The optional diagonal quadratic skip (``quadratic_skip``) does the same for the part that is
    quadratic: for a concave quadratic reward on a Gaussian mode log h_t is exactly quadratic
    in x_t, with a curvature that grows like 1/beta (docs/learned-guidance.md, "Quadratic skip").

    Time (and the condition) enter every layer as an additive bias, so the gradient in z
    is the plain chain of the layer Jacobians and is written out by hand. tanh because its
    slope 1 - h^2 costs two element-wise ops: at sampling time this network runs at every
    step next to the generator, and for cheap generators its element-wise ops dominate.
    """

    def __init__(self, config: MLPConfig):
        super().__init__()
        if config.dim < 1 or config.hidden < 1 or config.depth < 1:
            raise TiltgenError(f"MLP guidance network needs dim, hidden, depth >= 1, got {config}")
        self.config = config
        self.time = FourierTime(config.time_freqs)
        widths = [config.dim] + [config.hidden] * config.depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.time_in = nn.ModuleList(nn.Linear(self.time.dim, config.hidden, bias=False) for _ in widths[1:])
        self.cond_in = nn.ModuleList(nn.Linear(config.cond_dim, config.hidden, bias=False) for _ in widths[1:]) \
            if config.cond_dim else None
        self.out = nn.Linear(config.hidden, 1)
        self.time_out = nn.Linear(self.time.dim, 1, bias=False)
        nn.init.zeros_(self.out.weight)  # start at F = 0: no guidance until trained
        nn.init.zeros_(self.out.bias)
        # per-coordinate skip coefficients A phi(t) + B e + b (linear) and Q phi(t) + C e + c (quadratic)
        self.skip, self.skip_cond = self._coefficient_layers(config.linear_skip)
        self.quad, self.quad_cond = self._coefficient_layers(config.quadratic_skip)

    def _coefficient_layers(self, enabled: bool) -> tuple[nn.Linear | None, nn.Linear | None]:
        """(phi(t) -> [dim] with bias, e -> [dim] without; None where absent), zero-initialised so an
        untrained network gives no guidance."""
        if not enabled:
            return None, None
        config = self.config
        from_time = nn.Linear(self.time.dim, config.dim)
        from_cond = nn.Linear(config.cond_dim, config.dim, bias=False) if config.cond_dim else None
        for layer in (from_time, from_cond):
            if layer is not None:
                nn.init.zeros_(layer.weight)
        nn.init.zeros_(from_time.bias)
        return from_time, from_cond

    @staticmethod
    def _coefficients(from_time: nn.Linear | None, from_cond: nn.Linear | None, phi: Tensor,
                      emb: Tensor | None) -> Tensor | None:
        """[1 or N, dim] skip coefficients, or None without that skip."""
        if from_time is None:
            return None
        value = from_time(phi)
        return value if from_cond is None else value + from_cond(emb)

    def _biases(self, t: Tensor, emb: Tensor | None, n: int
                ) -> tuple[list[Tensor], Tensor, Tensor | None, Tensor | None]:
        """Per-layer biases b_l + U_l phi(t) (+ C_l e), [1 or N, H], the t-only term of F [N],
        the skip slope A phi(t) + b and the skip curvature q [1 or N, dim] (None without them)."""
        # During sampling every row shares t: embed it once and broadcast.
        same_t = t.numel() > 1 and bool((t == t[0]).all())
        phi = self.time(t[:1] if same_t else t)
        biases = [layer.bias + proj(phi) for layer, proj in zip(self.layers, self.time_in)]
        if self.cond_in is not None:
            if emb is None:
                raise TiltgenError("this guidance network is conditional: pass a condition embedding")
            biases = [b + proj(emb) for b, proj in zip(biases, self.cond_in)]
        slope = self._coefficients(self.skip, self.skip_cond, phi, emb)
        curve = self._coefficients(self.quad, self.quad_cond, phi, emb)
        return biases, self.time_out(phi)[:, 0].expand(n), slope, curve

    def _check(self, z: Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.config.dim:
            raise TiltgenError(f"guidance network expects samples [N, {self.config.dim}], got {tuple(z.shape)}")

    def forward(self, z: Tensor, t: Tensor, emb: Tensor | None = None) -> Tensor:
        """F [N]."""
        self._check(z)
        biases, f_t, slope, curve = self._biases(t, emb, z.shape[0])
        h = z
        for layer, bias in zip(self.layers, biases):
            h = torch.tanh(self._affine(layer, h, bias))
        value = self.out(h)[:, 0] + f_t
        if slope is not None:
            value = value + (z * slope).sum(1)
        return value if curve is None else value + 0.5 * (curve * z * z).sum(1)

    @staticmethod
    def _affine(layer: nn.Linear, h: Tensor, bias: Tensor) -> Tensor:
        # one fused op: bias (incl. the time term) + h W^T
        return torch.addmm(bias, h, layer.weight.t())

    def value_and_grad(self, z: Tensor, t: Tensor, emb: Tensor | None = None,
                       need_value: bool = True) -> tuple[Tensor, Tensor]:
        """(F [N], dF/dz [N, dim]) with the backward pass written out (F is only its t-term
        when ``need_value`` is False: sampling needs the gradient alone)."""
        self._check(z)
        biases, f_t, skip, curve = self._biases(t, emb, z.shape[0])
        h, slopes = z, []
        for layer, bias in zip(self.layers, biases):
            h, slope = _tanh_and_slope(self._affine(layer, h, bias))
            slopes.append(slope)
        value = self.out(h)[:, 0] + f_t if need_value else f_t
        delta = self.out.weight  # [1, H], broadcast over rows
        for layer, slope in zip(reversed(self.layers), reversed(slopes)):
            delta = (delta * slope) @ layer.weight
        if skip is not None:
            if need_value:
                value = value + (z * skip).sum(1)
            delta = delta + skip
        if curve is not None:
            cz = curve * z
            if need_value:
                value = value + 0.5 * (cz * z).sum(1)
            delta = delta + cz
        return value, delta


@dataclass(frozen=True)
class ConvConfig:
    """Potential conv net for images [N, channels, H, W] conditioned on t and a text embedding."""

    channels: int
    width: int = 32
    depth: int = 3
    cond_dim: int = 0
    time_freqs: int = 8
    coords: bool = False  # append x/y coordinate channels (CoordConv): rewards that depend on layout
    kind: str = "conv"


class PotentialConvNet(nn.Module):
    """Strided 3x3 convs with FiLM-style biases from (t, e), global average pool, linear head.

    With ``coords`` the input gets two coordinate channels in [-1, 1], so features can encode
    *where* things are (the average pool alone is almost translation invariant, and rewards
    such as centring or composition depend on position)."""

    def __init__(self, config: ConvConfig):
        super().__init__()
        if config.channels < 1 or config.width < 1 or config.depth < 1:
            raise TiltgenError(f"conv guidance network needs channels, width, depth >= 1, got {config}")
        self.config = config
        self.time = FourierTime(config.time_freqs)
        widths = [config.channels + 2 * config.coords] + [config.width * 2 ** min(i, 2) for i in range(config.depth)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
                                   for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])))
        cond_in = self.time.dim + config.cond_dim
        self.film = nn.ModuleList(nn.Linear(cond_in, w) for w in widths[1:])
        self.norms = nn.ModuleList(nn.GroupNorm(min(8, w), w) for w in widths[1:])
        self.head = nn.Linear(widths[-1] + cond_in, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, z: Tensor, t: Tensor, emb: Tensor | None = None) -> Tensor:
        """F [N]."""
        if z.ndim != 4 or z.shape[1] != self.config.channels:
            raise TiltgenError(f"guidance network expects images [N, {self.config.channels}, H, W], got {tuple(z.shape)}")
        ctx = self.time(t).to(z.dtype)
        if self.config.cond_dim:
            if emb is None or emb.shape != (z.shape[0], self.config.cond_dim):
                raise TiltgenError(f"conv guidance network needs a condition embedding [N, {self.config.cond_dim}]")
            ctx = torch.cat([ctx, emb.to(z.dtype)], 1)
        h = torch.cat([z, _coordinates(z)], 1) if self.config.coords else z
        for conv, norm, film in zip(self.convs, self.norms, self.film):
            h = torch.nn.functional.silu(norm(conv(h)) + film(ctx)[:, :, None, None])
        return self.head(torch.cat([h.mean((2, 3)), ctx], 1))[:, 0]

    def value_and_grad(self, z: Tensor, t: Tensor, emb: Tensor | None = None,
                       need_value: bool = True) -> tuple[Tensor, Tensor]:
        """(F [N], dF/dz) by autograd; keeps the graph when gradients are enabled (training)."""
        training_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z_in = z if z.requires_grad else z.detach().requires_grad_(True)
            value = self.forward(z_in, t, emb)
            (grad,) = torch.autograd.grad(value.sum(), z_in, create_graph=training_graph)
        return (value, grad) if training_graph else (value.detach(), grad.detach())


def _coordinates(z: Tensor) -> Tensor:
    """[N, 2, H, W] pixel-centre coordinates in [-1, 1] (x then y)."""
    n, _, h, w = z.shape
    ys = torch.linspace(-1, 1, h, dtype=z.dtype, device=z.device)
    xs = torch.linspace(-1, 1, w, dtype=z.dtype, device=z.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(n, 2, h, w)


def build_network(config: dict) -> nn.Module:
    """A network from its JSON config (``kind`` = ``mlp`` or ``conv``)."""
    config = dict(config)
    kind = config.get("kind")
    if kind == "mlp":
        return PotentialMLP(MLPConfig(**config))
    if kind == "conv":
        return PotentialConvNet(ConvConfig(**config))
    raise TiltgenError(f"unknown guidance network kind {kind!r}; choose 'mlp' or 'conv'")


def network_config(net: nn.Module) -> dict:
    return asdict(net.config)  # type: ignore[arg-type]
