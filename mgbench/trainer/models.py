"""The networks: DiT (adaLN-Zero, official parameter names) and a small MLP for 2D points.

Interface shared by every model: `model(x, t_net, y, w=None)` returns a tensor shaped like `x`
(with `learn_sigma`, twice the channels: first half eps, second half the variance interpolation).
- `t_net` (float, (B,)): the network time: the DDPM step index 0..T-1, or 1000 * t on the flow path.
- `y` (long, (B,)): class 0..num_classes-1; `num_classes` is the empty class when `empty_class=True`.
- `w` (float, (B,)): the paper's guidance weight (w = 1 vanilla), only for `w_input=True` models.

A DiT built with `w_input=False` has exactly the keys and shapes of facebookresearch/DiT, so
`DiT-XL-2-256x256.pt` loads with `strict=True` (see `load_pretrained`).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mgbench.archs import MODELS, ModelSpec  # noqa: F401  (the registry of names; re-exported)


def build_model(arch: str, *, input_shape: tuple[int, ...], num_classes: int, empty_class: bool = True,
                learn_sigma: bool = False, w_input: bool = False) -> nn.Module:
    """Build a registry model for inputs of `input_shape` ((D,) points or (C, H, W) images/latents)."""
    if arch not in MODELS:
        raise ValueError(f"unknown model {arch!r} (choose from {', '.join(MODELS)})")
    spec = MODELS[arch]
    common = dict(num_classes=num_classes, empty_class=empty_class, learn_sigma=learn_sigma, w_input=w_input)
    if spec.kind == "mlp":
        if len(input_shape) != 1:
            raise ValueError(f"{arch}: MLP models take points of shape (D,), got input_shape {input_shape}")
        return MLP(dim=input_shape[0], depth=spec.depth, width=spec.width, **common)
    if len(input_shape) != 3:
        raise ValueError(f"{arch}: DiT models take (C, H, W) inputs, got input_shape {input_shape}")
    c, h, w = input_shape
    if h % spec.patch or w % spec.patch:
        raise ValueError(f"{arch}: input {h}x{w} is not divisible by the patch size {spec.patch}")
    return DiT(in_channels=c, height=h, width=w, patch=spec.patch, depth=spec.depth, hidden=spec.width,
               heads=spec.heads, **common)


def load_pretrained(model: nn.Module, path: str | Path, *, strict: bool | None = None) -> None:
    """Load a local state dict (e.g. the official `DiT-XL-2-256x256.pt`); a w-input model may lack `w_embedder.*`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found (download it yourself; mgbench never fetches weights)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("ema", "model"):  # our own and DiT's training checkpoints hold the weights under a key
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if strict is None:
        strict = not getattr(model, "w_input", False)
    missing, unexpected = model.load_state_dict(state, strict=strict)
    bad = [k for k in missing if not k.startswith("w_embedder.")] + list(unexpected)
    if bad:
        raise ValueError(f"checkpoint {path} does not fit the model: {', '.join(bad[:5])}")


# ----------------------------------------------------------------------------- shared embeddings


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT/ADM frequency embedding of a scalar per sample: [cos(t f), sin(t f)], f geometric in [1/max_period, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ScalarEmbedder(nn.Module):
    """Sinusoidal features of a scalar (times `scale`) followed by a 2-layer MLP (DiT's TimestepEmbedder)."""

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.scale = scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(t * self.scale, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Label table; row `num_classes` is the empty class when there is one (label dropout is the objective's job)."""

    def __init__(self, num_classes: int, hidden: int, empty_class: bool) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(empty_class), hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


W_SCALE = 100.0  # w is embedded as sin/cos of 100 * w, so w in [0, 10] spans the range t_net covers


def _w_embedder(hidden: int, freq_dim: int) -> ScalarEmbedder:
    """The scalar w embedding (initialised by `_init_w_embedder`)."""
    emb = ScalarEmbedder(hidden, freq_dim, scale=W_SCALE)
    _init_w_embedder(emb)
    return emb


def _init_w_embedder(emb: ScalarEmbedder) -> None:
    """Zero last layer, so a fresh w-input model equals the plain one (and learns from there)."""
    nn.init.normal_(emb.mlp[0].weight, std=0.02)
    nn.init.zeros_(emb.mlp[0].bias)
    nn.init.zeros_(emb.mlp[2].weight)
    nn.init.zeros_(emb.mlp[2].bias)


def _conditioning(model: nn.Module, t_net: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """c = emb(t) + emb(y) (+ emb(w) for w-input models)."""
    c = model.t_embedder(t_net) + model.y_embedder(y)
    if model.w_input:
        if w is None:
            raise ValueError("this model takes w as an input (w_input=True) but w is None")
        c = c + model.w_embedder(w)
    return c


# ----------------------------------------------------------------------------- DiT


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2D sin-cos position table (grid_h * grid_w, dim), row-major tokens, layout of MAE/DiT."""
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    # DiT embeds the column coordinate in the first half and the row coordinate in the second.
    return torch.cat([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], dim=1).float()


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens (timm's PatchEmbed: a strided conv named `proj`)."""

    def __init__(self, patch: int, in_channels: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with timm's names (`qkv`, `proj`)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two linear layers with tanh-GELU (timm's Mlp names `fc1`, `fc2`)."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patches."""

    def __init__(self, hidden: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie) with an optional scalar w input."""

    def __init__(self, *, in_channels: int, height: int, width: int, patch: int, depth: int, hidden: int,
                 heads: int, num_classes: int, empty_class: bool = True, learn_sigma: bool = False,
                 w_input: bool = False, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.in_channels, self.patch, self.grid = in_channels, patch, (height // patch, width // patch)
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.num_classes, self.empty_class = num_classes, empty_class
        self.learn_sigma, self.w_input = learn_sigma, w_input
        self.x_embedder = PatchEmbed(patch, in_channels, hidden)
        self.t_embedder = ScalarEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden, empty_class)
        if w_input:
            self.w_embedder = _w_embedder(hidden, 256)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], hidden), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch, self.out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialisation: xavier linears, fixed pos_embed, adaLN-Zero (zero modulation and output)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], *self.grid).unsqueeze(0))
        proj = self.x_embedder.proj
        nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.w_input:
            _init_w_embedder(self.w_embedder)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, tokens, p*p*C) -> (B, C, H, W)."""
        (gh, gw), p, c = self.grid, self.patch, self.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward(self, x: torch.Tensor, t_net: torch.Tensor, y: torch.Tensor,
                w: torch.Tensor | None = None) -> torch.Tensor:
        h = self.x_embedder(x) + self.pos_embed
        c = _conditioning(self, t_net, y, w)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


# ----------------------------------------------------------------------------- MLP for 2D points


class ResBlock(nn.Module):
    """Pre-norm residual MLP block with the conditioning vector added inside."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.cond = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.cond(c)))


class MLP(nn.Module):
    """Residual MLP for points (B, D) with t, y (and w) embeddings; the 2D-toy model."""

    def __init__(self, *, dim: int, depth: int, width: int, num_classes: int, empty_class: bool = True,
                 learn_sigma: bool = False, w_input: bool = False) -> None:
        super().__init__()
        self.num_classes, self.empty_class = num_classes, empty_class
        self.learn_sigma, self.w_input = learn_sigma, w_input
        self.x_embedder = nn.Linear(dim, width)
        self.t_embedder = ScalarEmbedder(width, freq_dim=128)
        self.y_embedder = LabelEmbedder(num_classes, width, empty_class)
        if w_input:
            self.w_embedder = _w_embedder(width, 128)
        self.blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim * (2 if learn_sigma else 1))

    def forward(self, x: torch.Tensor, t_net: torch.Tensor, y: torch.Tensor,
                w: torch.Tensor | None = None) -> torch.Tensor:
        c = F.silu(_conditioning(self, t_net, y, w))
        h = self.x_embedder(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(self.norm_out(h))
