"""
SiT on CoordTok's triplanes: a diffusion transformer trained with flow matching on the three
normalised planes (z_xy, z_xt, z_yt) of the tokens file that `tokenizer.py --encode` writes.
The presets S/2 to XL/2 are the authors' SiT (L/2: the paper's generator); SiT.from_official
loads their released weights.

  python dit.py --tokens out/tokens.pt                         # CPU-sized model, a few minutes
  python dit.py --resume --max_iters 6000                      # continue out/dit.pt, flags from its checkpoint
  torchrun --nproc_per_node=8 dit.py --tokens out/tokens.pt --preset L/2 \
      --learning_rate 1e-4 --lr_schedule constant --warmup_iters 0 --batch_size 8 --max_iters 600000
                                                               # the paper: SiT-L/2, batch 64, 600K steps

Then `python sample.py` draws clips from out/dit.pt and decodes them with the tokenizer it names.

Conventions (SiT's linear path with velocity prediction):
  t = 0 is noise, t = 1 is data;  x_t = (1 - t) * noise + t * x1;  the model predicts v = x1 - noise.
  Sampling integrates dx/dt = v(x, t) from t = 0 to t = 1 (Euler or Heun), or SiT's SDE with the same
  marginals (Euler-Maruyama, see `integrate`).

Each plane is cut into 2x2 patches by its own conv; the xy plane gets a fixed 2D sin-cos position
table, the two time planes share one learned table, every plane adds a learned type vector; their
tokens form one sequence (the paper: 64 + 128 + 128 = 320 tokens) through adaLN-Zero blocks; one
output head per plane maps tokens back.

The tokens file of the built-in synthetic set holds one clip per video: the default run partly memorises
them, which is what a short CPU run can do. Its samples should look like training clips.

The file reads top to bottom: configuration and presets, the model and the conversion of the authors'
weights, flow matching, guidance and the samplers, EMA and loading, the training loop, main().
"""

import copy
import dataclasses
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data as D
from tokenizer import (MLP, Attention, autocast, check_out_dir, cleanup_distributed, configure_torch, explicit_flags,
                       load_checkpoint, load_model_file, load_official, lr_at, make_optimizer, mfu_text,
                       official_state_dict, optimizer_step, parse_config, resumed_config, run_lock, setup_distributed,
                       time_is_up, use_compile)

# -----------------------------------------------------------------------------
# configuration


@dataclass
class SiTConfig:
    width: int = 128
    depth: int = 4
    heads: int = 4
    patch_size: int = 2
    mlp_ratio: float = 4.0
    conditional: bool = False    # condition on the tokens file's classes (the paper's UCF-101 generator does not)
    class_dropout: float = 0.0   # fraction of labels replaced by the null class in training (for guidance)
    learn_sigma: bool = True     # the authors' heads also output an unused variance half (kept: their weights load)
    time_shift: float = 1.0      # > 1: more training times and sampler steps near the noise end (1: SiT's uniform)


PRESETS = {
    # sized for a 2-core CPU on the tiny tokenizer's triplanes (~9 steps/s), class-conditional with guidance
    # (time_shift 3 was A/B-tested here and did not help: README, "Departures from the paper")
    "cpu": SiTConfig(conditional=True, class_dropout=0.1),
    # the authors' SiT sizes; L/2 is the paper's generator (unconditional on UCF-101)
    "S/2": SiTConfig(width=384, depth=12, heads=6),
    "B/2": SiTConfig(width=768, depth=12, heads=12),
    "L/2": SiTConfig(width=1024, depth=24, heads=16),
    "XL/2": SiTConfig(width=1152, depth=28, heads=16),
}


@dataclass
class DiTTrainConfig:
    tokens: str = "out/tokens.pt"  # the tokens file of `tokenizer.py --encode`
    out_dir: str = "out"         # writes out_dir/dit.pt
    resume: bool = False         # continue out_dir/dit.pt exactly where it stopped
    max_iters: int = 3000
    batch_size: int = 32         # clips per step on each process
    grad_accum: int = 1
    learning_rate: float = 1e-3  # the paper: 1e-4 (constant) at batch 64
    min_lr: float = 1e-4
    lr_schedule: str = "cosine"  # constant | cosine
    warmup_iters: int = 100
    lr_decay_iters: int = 0      # 0: max_iters
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0       # 0: no clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True      # decay min(ema_decay, (1 + step) / (10 + step)): a short run still gets a useful EMA
    log_interval: int = 10
    ckpt_interval: int = 500
    max_time: float = 0.0        # minutes; stop (and save) once exceeded, 0: no limit
    max_bad_steps: int = 20      # consecutive non-finite steps before the run stops
    peak_flops: float = 989e12   # for MFU: the accelerator's dense bf16 FLOP/s (H100 SXM)
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    compile: str = "auto"        # auto (on for CUDA) | true | false


def validate_sit_config(cfg):
    """Fail at start, naming the flag, instead of with a NaN or a reshape error later."""
    problems = [f"--{n} must be >= 1, got {getattr(cfg, n)}" for n in ("width", "heads", "patch_size")
                if getattr(cfg, n) < 1]
    if not problems and cfg.width % cfg.heads:
        problems.append(f"--width {cfg.width} is not divisible by --heads {cfg.heads}")
    if cfg.depth < 0 or cfg.mlp_ratio <= 0:
        problems.append(f"--depth must be >= 0 and --mlp_ratio > 0, got {cfg.depth} and {cfg.mlp_ratio}")
    if not 0 <= cfg.class_dropout < 1:
        problems.append(f"--class_dropout must be in [0, 1), got {cfg.class_dropout}")
    if not cfg.time_shift > 0:  # shift_time divides by u + shift (1 - u)
        problems.append(f"--time_shift must be > 0 (1: no shift), got {cfg.time_shift}")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def validate_plane_shapes(plane_shapes, patch_size):
    """Fail at start, naming what to change, when the planes are not a triplane the SiT can cut into patches."""
    problems = [f"plane {name} is {h}x{w}, not divisible by --patch_size {patch_size}"
                for name, (_, h, w) in zip(D.PLANES, plane_shapes) if h % patch_size or w % patch_size]
    if len(plane_shapes) != 3 or tuple(plane_shapes[1]) != tuple(plane_shapes[2]):
        problems.append(f"expected a triplane (xy plane, then two time planes of one shape), got {plane_shapes}")
    if problems:
        raise ValueError("; ".join(problems) + ". Use --patch_size 1, or encode with a tokenizer whose "
                         "--triplane_rs and --triplane_rt are multiples of the patch size.")


# -----------------------------------------------------------------------------
# the model
#
# The layers follow the authors' SiT (github.com/huiwon-jang/CoordTok, models/diffusion/sit_models.py) so
# that their weights load; `SiT.from_official` maps their parameter names onto ours.


def sincos_2d(height, width, dim):
    """Fixed 2D sin-cos position table (height*width, dim), rows of the grid in row-major order. As in MAE
    and SiT, the first half of the channels encodes the column, the second half the row; each half is
    sin then cos of the position times dim/4 frequencies from 1 down to 1/10000."""
    if dim % 4:
        raise ValueError(f"--width {dim} must be divisible by 4 for the 2D sin-cos position embedding")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))   # (dim/4,)

    def embed(pos):  # (n,) -> (n, dim/2)
        angles = pos[:, None].double() * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([embed(cols.flatten()), embed(rows.flatten())], dim=1).float()     # (h*w, dim)


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal features of t in [0, 1] (SiT feeds t itself, not t x 1000): cos then sin at dim/2
    frequencies from 1 down to 1/max_period. (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]                                            # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulate(x, shift, scale):  # x (B, N, D), shift / scale (B, D)
    return x * (1 + scale[:, None]) + shift[:, None]


class SiTBlock(nn.Module):
    """Transformer block whose norms are shifted, scaled and gated by the conditioning (adaLN-Zero):
    the modulation starts at zero, so every block starts as the identity."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio, approximate="tanh")
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x, c):  # x (B, N, D), c (B, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(c)).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class OutputHead(nn.Module):
    """Final adaLN norm and the projection of each token to its patch of one plane."""

    def __init__(self, dim, patch_size, channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, patch_size * patch_size * channels)

    def forward(self, x, c):
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=1)
        return self.proj(modulate(self.norm(x), shift, scale))


class SiT(nn.Module):
    """Velocity of the flow at (planes, t, y): planes (z_xy, z_xt, z_yt) of (B, C, Rs, Rs), (B, C, Rt, Rs) x2
    in, the same shapes out (the authors' plane order xy, yt, xt: their "x" is the row axis).

    Each plane is cut into patches by its own conv; the xy plane gets a fixed 2D sin-cos position table, the
    two time planes share one learned table, each plane adds a learned type vector; the 320 tokens (at the
    paper's size) form one sequence. num_classes: rows of the class embedding, plus a null class (the "no
    label" of classifier-free guidance) when class_dropout > 0. An unconditional model (num_classes = 1) adds
    its one learned row to every time embedding, as the authors' does.
    """

    def __init__(self, config: SiTConfig, plane_shapes, num_classes=1):
        super().__init__()
        self.config = cfg = config
        self.plane_shapes = [tuple(int(s) for s in shape) for shape in plane_shapes]
        self.num_classes = num_classes
        validate_sit_config(cfg)
        validate_plane_shapes(self.plane_shapes, cfg.patch_size)
        p, D = cfg.patch_size, cfg.width
        self.grids = [(h // p, w // p) for _, h, w in self.plane_shapes]               # token grid per plane
        self.embeds = nn.ModuleList(nn.Conv2d(c, D, kernel_size=p, stride=p) for c, _, _ in self.plane_shapes)
        # a Parameter that is not trained (as the authors'), so that it counts and loads like theirs
        self.pos_xy = nn.Parameter(sincos_2d(*self.grids[0], D)[None], requires_grad=False)
        self.pos_t = nn.Parameter(torch.zeros(1, math.prod(self.grids[1]), D))
        self.plane_type = nn.Parameter(torch.randn(1, 3, D))
        self.time_mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.class_embed = nn.Embedding(num_classes + (cfg.class_dropout > 0), D)
        self.blocks = nn.ModuleList(SiTBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        out_channels = [c * (2 if cfg.learn_sigma else 1) for c, _, _ in self.plane_shapes]
        self.heads = nn.ModuleList(OutputHead(D, p, c) for c in out_channels)
        self._init_weights()

    @property
    def conditional(self):
        return self.num_classes > 1

    @property
    def null_class(self):  # the label that means "no label", or None when the model never learned one
        return self.num_classes if self.config.class_dropout > 0 else None

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):  # a conv patch embedding is initialised as the linear map it is
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every block's modulation and every output head start at zero, so the
        # untrained network is the identity on its tokens and predicts zero velocity
        for m in [b.modulation for b in self.blocks] + [m for h in self.heads for m in (h.modulation, h.proj)]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, planes, t, y):
        positions = (self.pos_xy, self.pos_t, self.pos_t)
        tokens = [rearrange(embed(z), "b d h w -> b (h w) d") + pos + self.plane_type[:, i]
                  for i, (embed, z, pos) in enumerate(zip(self.embeds, planes, positions))]
        x = torch.cat(tokens, dim=1)                                                    # (B, N, D) one sequence
        c = self.time_mlp(timestep_embedding(t).to(x.dtype)) + self.class_embed(y)      # (B, D)
        for block in self.blocks:
            x = block(x, c)
        p, out = self.config.patch_size, []
        for head, x_plane, (gh, gw), (channels, _, _) in zip(self.heads, x.split([h * w for h, w in self.grids], 1),
                                                             self.grids, self.plane_shapes):
            patches = head(x_plane, c)                                                  # (B, gh*gw, p*p*C')
            plane = rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=gh, w=gw, p1=p, p2=p)
            out.append(plane[:, :channels])                                   # learn_sigma: the variance half goes
        return tuple(out)

    def flops_per_sample(self):
        """Forward FLOPs of the matmuls for one sample (for MFU)."""
        n, d, r = sum(gh * gw for gh, gw in self.grids), self.config.width, self.config.mlp_ratio
        per_block = 2 * n * (4 + 2 * r) * d * d + 4 * n * n * d                          # qkv, proj, MLP; q@k, a@v
        embed = sum(2 * gh * gw * c * self.config.patch_size ** 2 * d
                    for (gh, gw), (c, _, _) in zip(self.grids, self.plane_shapes))
        return self.config.depth * per_block + 2 * embed                                 # heads ~ embeddings

    @classmethod
    def from_official(cls, path_or_state_dict, official_kwargs=None):
        """Our SiT carrying the authors' weights: their released `CoordTok_SiT_L_2_UCF101_600K.pt` (its EMA
        weights are taken), or a state dict of their SiT (bare, or under "ema" or "model").

        official_kwargs: the arguments their `SiT(...)` was built with; missing ones are the paper's SiT-L/2
        (OFFICIAL_SIT_PAPER_KWARGS). The file holds no token statistics: they come from a tokens file."""
        state = official_state_dict(path_or_state_dict, "x_embedder_xy.proj.weight", "SiT", prefer=("ema", "model"))
        unknown = set(official_kwargs or {}) - set(OFFICIAL_SIT_PAPER_KWARGS)
        if unknown:
            raise ValueError(f"unknown official SiT arguments {sorted(unknown)}; "
                             f"they are {', '.join(OFFICIAL_SIT_PAPER_KWARGS)}")
        k = {**OFFICIAL_SIT_PAPER_KWARGS, **(official_kwargs or {})}
        rt, rs = k["input_size"]
        config = SiTConfig(width=k["hidden_size"], depth=k["depth"], heads=k["num_heads"], patch_size=k["patch_size"],
                           mlp_ratio=k["mlp_ratio"], conditional=k["num_classes"] > 1,
                           class_dropout=k["class_dropout_prob"], learn_sigma=k["learn_sigma"])
        c = k["in_channels"]
        model = cls(config, [(c, rs, rs), (c, rt, rs), (c, rt, rs)], num_classes=k["num_classes"])
        ours = {}
        for name, tensor in state.items():
            for pattern, replacement in OFFICIAL_SIT_NAMES:
                name = re.sub(pattern, replacement, name)
            ours[name] = tensor
        load_official(model, ours, "SiT", official_kwargs)
        return model


# The authors' constructor arguments for the paper's generator, SiT-L/2 on the (Rt=32, Rs=16, C=8) triplane.
OFFICIAL_SIT_PAPER_KWARGS = dict(input_size=(32, 16), patch_size=2, in_channels=8, hidden_size=1024, depth=24,
                                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.0, num_classes=1, learn_sigma=True)

# Their parameter names -> ours (their planes xy, yt, xt are our z_xy, z_xt, z_yt: index 0, 1, 2).
OFFICIAL_SIT_NAMES = [
    (r"^x_embedder_xy\.proj\.", "embeds.0."), (r"^x_embedder_yt\.proj\.", "embeds.1."),
    (r"^x_embedder_xt\.proj\.", "embeds.2."),
    (r"^pos_embed_xy$", "pos_xy"), (r"^pos_embed_t$", "pos_t"), (r"^type_embed$", "plane_type"),
    (r"^t_embedder\.mlp\.", "time_mlp."), (r"^y_embedder\.embedding_table\.", "class_embed."),
    (r"\.adaLN_modulation\.1\.", ".modulation."),
    (r"^final_layer_xy\.", "heads.0."), (r"^final_layer_yt\.", "heads.1."), (r"^final_layer_xt\.", "heads.2."),
    (r"^(heads\.\d)\.linear\.", r"\1.proj."),
]


# -----------------------------------------------------------------------------
# flow matching: the linear path from noise (t = 0) to data (t = 1), velocity prediction


def shift_time(u, shift):
    """Map u in [0, 1] to t = u / (u + shift * (1 - u)). shift = 1 is the identity; shift > 1 moves times
    towards the noise end (t = 0), where the layout of a clip is decided: with thousands of correlated
    floats per clip, a little signal already fixes it, so uniform times spend most of the effort late."""
    return u / (u + shift * (1 - u))


def randn_planes(shapes, generator=None, device="cpu"):
    """Standard normal planes of the given (B, C, H, W) shapes. generator: one torch.Generator, or a list of
    one per sample, so that sample k's noise does not depend on the batch it is drawn in."""
    if isinstance(generator, (list, tuple)):
        return tuple(torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
                     for shape in shapes)
    gen_device = generator.device if generator is not None else device
    return tuple(torch.randn(shape, generator=generator, device=gen_device).to(device) for shape in shapes)


def flow_matching_loss(model, x1, y, null_class=None, class_dropout=0.0, generator=None, time_shift=1.0, share=(0, 1)):
    """Mean squared error between the predicted and the true velocity x1 - noise at a random time, averaged
    per plane and then over the three planes (as SiT's training loss on the authors' triplanes).

    x1: tuple of data planes (B, C, H, W); y (B,) labels. With class_dropout > 0, that fraction of the
    labels becomes null_class, so the same network also learns the unconditional velocity (for guidance).
    share (rank, world_size): times, noise and dropped labels are drawn for the global batch of world_size x B
    samples and this process takes rows rank B ... (rank + 1) B, so a run is the same on any number of processes.
    """
    (rank, world), B, device = share, x1[0].shape[0], x1[0].device
    mine = slice(rank * B, (rank + 1) * B)
    draw = lambda n: torch.rand(n, generator=generator, device=device)
    t = shift_time(draw(B * world), time_shift)[mine]                                   # (B,) in [0, 1)
    noise = tuple(n[mine] for n in randn_planes([(B * world, *x.shape[1:]) for x in x1], generator, device))
    t_ = t[:, None, None, None]
    x_t = tuple((1 - t_) * n + t_ * x for n, x in zip(noise, x1))
    if class_dropout > 0 and null_class is not None:
        y = torch.where(draw(B * world)[mine] < class_dropout, torch.full_like(y, null_class), y)
    v = model(x_t, t, y)
    return sum((vi.float() - (x - n)).pow(2).mean() for vi, x, n in zip(v, x1, noise)) / len(x1)


# -----------------------------------------------------------------------------
# guidance and samplers


def guided_velocity(model, x, t, y, cfg_scale, null_class):
    """Classifier-free guidance: v_null + cfg_scale * (v_y - v_null), on every channel of every plane.
    The conditional and null halves go through the model as one batch."""
    both = tuple(torch.cat([xi, xi]) for xi in x)
    v = model(both, torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    return tuple(v_null + cfg_scale * (v_cond - v_null) for v_cond, v_null in (vi.float().chunk(2) for vi in v))


SAMPLERS = ("euler", "heun", "sde")


@torch.no_grad()
def integrate(velocity, noise, sampler="sde", steps=250, generator=None, diffusion=1.0, time_shift=1.0,
              last_step=0.04, progress=False, desc=None):
    """Carry planes from noise at t = 0 to data at t = 1; velocity(x, t) takes a tuple of planes and t (B,).

    euler, heun: the ODE dx = v dt in `steps` steps (first and second order).
    sde: SiT's default sampler (its `sample_sde`: Euler-Maruyama, diffusion form "sigma", last step "Mean"):
        dx = [v + w(t) score] dt + sqrt(2 w(t)) dW,   w(t) = diffusion * (1 - t),
    which has the ODE's marginals for any w >= 0. On the linear path the noise is estimated as x - t v, so
    score(x, t) = -(x - t v) / (1 - t) and the drift is v + diffusion * (t v - x). steps - 1 Euler-Maruyama
    steps go from t = 0 to t = 1 - last_step, then one noise-free step of the drift of size last_step ends at
    t = 1: `steps` calls of the model in all (SiT: 250, last step 0.04, diffusion 1).
    Times are uniform in u and placed at t = shift_time(u), so time_shift > 1 puts more of them near the
    noise end, as in training. generator: as in `randn_planes`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if steps < (2 if sampler == "sde" else 1):
        raise ValueError(f"--steps must be >= {2 if sampler == 'sde' else 1} for the {sampler} sampler, got {steps}")
    x = tuple(n.float() for n in noise)
    B, device = x[0].shape[0], x[0].device
    end = 1 - last_step if sampler == "sde" else 1.0
    points = steps if sampler == "sde" else steps + 1
    times = (end * shift_time(torch.linspace(0, 1, points, dtype=torch.float64), time_shift)).tolist()
    at = lambda t: torch.full((B,), t, device=device)
    sde_drift = lambda x, v, t: tuple(vi + diffusion * (t * vi - xi) for xi, vi in zip(x, v))
    for i in tqdm(range(points - 1), disable=not progress, desc=desc, leave=False, dynamic_ncols=True):
        t, dt = times[i], times[i + 1] - times[i]
        v = velocity(x, at(t))
        if sampler == "heun":
            x_euler = tuple(xi + dt * vi for xi, vi in zip(x, v))
            v_next = velocity(x_euler, at(times[i + 1]))
            x = tuple(xi + dt / 2 * (vi + vn) for xi, vi, vn in zip(x, v, v_next))
        elif sampler == "sde":
            std = math.sqrt(2 * diffusion * (1 - t) * dt)
            dw = randn_planes([xi.shape for xi in x], generator, device)
            x = tuple(xi + dt * di + std * n for xi, di, n in zip(x, sde_drift(x, v, t), dw))
        else:
            x = tuple(xi + dt * vi for xi, vi in zip(x, v))
    if sampler == "sde" and last_step > 0:  # SiT's "Mean" step: the drift without noise, to t = 1
        x = tuple(xi + last_step * di for xi, di in zip(x, sde_drift(x, velocity(x, at(end)), end)))
    return x


@torch.no_grad()
def sample_planes(model, labels, cfg_scale=1.0, sampler="sde", steps=250, generator=None, diffusion=1.0,
                  progress=False, desc=None):
    """Normalised planes (tuple of (B, C, H, W)) drawn from a SiT (or its torch.compile wrapper).

    labels (B,) long: class indices, or model.null_class for unconditional samples of a conditional model;
    zeros for an unconditional one. Guidance is used when cfg_scale != 1 and the model has a null class.
    generator: one torch.Generator, or one per sample (then sample k is the same whatever the batch);
    CPU generators give the same samples on any device. diffusion scales the SDE's noise (see `integrate`).
    Undo the normalisation with `denormalize(planes, ckpt["mean"], ckpt["std"])`.
    """
    device = next(model.parameters()).device
    labels = labels.to(device)
    B = labels.shape[0]
    noise = randn_planes([(B, *shape) for shape in model.plane_shapes], generator, device)
    guided = model.null_class is not None and cfg_scale != 1.0

    def velocity(x, t):
        with autocast(device):
            if guided:
                return guided_velocity(model, x, t, labels, cfg_scale, model.null_class)
            return tuple(v.float() for v in model(x, t, labels))

    return integrate(velocity, noise, sampler, steps, generator, diffusion, model.config.time_shift,
                     progress=progress, desc=desc)


def normalize(planes, mean, std):
    """Per plane and channel to zero mean, unit std; mean / std: dicts plane name -> (C,)."""
    return tuple((z - mean[k].to(z)[:, None, None]) / std[k].to(z)[:, None, None] for k, z in zip(D.PLANES, planes))


def denormalize(planes, mean, std):
    return tuple(z * std[k].to(z)[:, None, None] + mean[k].to(z)[:, None, None] for k, z in zip(D.PLANES, planes))


# -----------------------------------------------------------------------------
# EMA and loading


def ema_decay_at(step, decay, warmup=True):
    """The EMA's decay after `step` optimizer steps: with warmup, min(decay, (1 + step) / (10 + step)),
    so the average forgets the random initial weights within a short run."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def load_dit(path, device="cpu"):
    """The EMA weights of a SiT (eval mode) and its checkpoint dict (mean, std, class_names, num_classes,
    tokenizer_ckpt, tokenizer_config, ...). Also takes the authors' released SiT (the paper's SiT-L/2); its
    dict says kind "official" and has no token statistics, class names or tokenizer: those must be given."""
    def build(ckpt):
        model = SiT(SiTConfig(**ckpt["model_config"]), ckpt["plane_shapes"], ckpt["num_classes"])
        model.load_state_dict(ckpt["ema"])
        return model

    model, ckpt = load_model_file(path, "coordtok_dit", SiT, build, "SiT")
    if ckpt["kind"] == "official":
        ckpt.update(plane_shapes=model.plane_shapes, num_classes=model.num_classes, class_names=[])
    return model.to(device).eval().requires_grad_(False), ckpt


# -----------------------------------------------------------------------------
# training


def load_token_planes(path):
    """The tokens file's planes normalised per plane and channel, with its labels and metadata."""
    tokens = D.load_tokens(path)
    missing = [k for k in (*D.PLANES, "labels", "class_names", "mean", "std") if k not in tokens]
    if missing:
        raise ValueError(f"tokens file {path!r} lacks {', '.join(missing)}; re-create it with "
                         f"`python tokenizer.py --encode {path}`")
    bad = ", ".join(f"{n} in {k}" for k in D.PLANES if (n := int((~torch.isfinite(tokens[k])).sum())))
    if bad:
        raise ValueError(f"tokens file {path!r} holds non-finite values ({bad}): "
                         f"the tokenizer that wrote it ({tokens.get('tokenizer_ckpt', '?')}) diverged or the file "
                         f"is damaged; check that tokenizer's held-out PSNR and encode again")
    planes = normalize(tuple(tokens[k].float() for k in D.PLANES), tokens["mean"], tokens["std"])
    if planes[0].shape[0] == 0:
        raise ValueError(f"tokens file {path!r} holds no clips")
    return planes, tokens["labels"].long(), tokens


def batch_indices(step, batch_size, num_items, seed):
    """The clips of global batch number `step`: consecutive slices of an endless sequence of permutations
    (one per epoch, seeded by seed and the epoch), so any step's batch is known without replaying the run."""
    position = step * batch_size + torch.arange(batch_size)                             # (B,)
    epoch = position // num_items
    first = int(epoch[0])
    perms = torch.stack([torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
                         for e in range(first, int(epoch[-1]) + 1)])                    # (epochs, N)
    return perms[epoch - first, position % num_items]


def validate_train_config(tc):
    problems = [f"--{name} must be >= 1, got {getattr(tc, name)}" for name in
                ("max_iters", "batch_size", "grad_accum", "log_interval", "ckpt_interval", "max_bad_steps")
                if getattr(tc, name) < 1]
    if tc.lr_schedule not in ("constant", "cosine"):
        problems.append(f"--lr_schedule must be constant or cosine, got {tc.lr_schedule}")
    if not 0 <= tc.ema_decay < 1:
        problems.append(f"--ema_decay must be in [0, 1), got {tc.ema_decay}")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def train(cfg: SiTConfig, tc: DiTTrainConfig, explicit=frozenset()):
    dist = setup_distributed(tc.device)
    device = dist.device
    configure_torch(device)
    ckpt_path = os.path.join(tc.out_dir, "dit.pt")
    step, overrides = 0, []
    if tc.resume:  # the checkpoint's model and training flags, but for those written on this command line
        resume_ckpt = load_checkpoint(ckpt_path, "coordtok_dit")
        saved = SiTConfig(**resume_ckpt["model_config"])
        changed = [f"--{n}" for n in explicit if hasattr(saved, n) and getattr(cfg, n) != getattr(saved, n)]
        if changed:
            raise ValueError(f"--resume continues {ckpt_path} with its own model, but {', '.join(changed)} differ "
                             f"from it; drop them, or start a new run with another --out_dir")
        cfg, step = saved, resume_ckpt["step"]
        tc, overrides = resumed_config(resume_ckpt["train_config"], tc, explicit, keep=("resume", "out_dir"))
    validate_train_config(tc)
    if dist.is_main:
        check_out_dir(tc.out_dir)

    planes, labels, tokens = load_token_planes(tc.tokens)
    tc = dataclasses.replace(tc, tokens=os.path.abspath(tc.tokens))  # saved, so that --resume reads the same file
    plane_shapes = [tuple(z.shape[1:]) for z in planes]
    class_names = list(tokens["class_names"]) if cfg.conditional else []
    num_classes = max(len(class_names), 1)
    if num_classes == 1:  # unconditional: the one class row is a learned constant added to the time embedding
        labels = torch.zeros_like(labels)
    if tc.resume and ([tuple(s) for s in resume_ckpt["plane_shapes"]] != plane_shapes
                      or resume_ckpt["num_classes"] != num_classes):
        raise ValueError(f"{ckpt_path} was trained on planes {resume_ckpt['plane_shapes']} with "
                         f"{resume_ckpt['num_classes']} classes, but {tc.tokens} has {plane_shapes} with "
                         f"{num_classes}; resume with the same --tokens or drop --resume")
    planes = tuple(z.to(device) for z in planes)                                        # whole set on the device
    labels = labels.to(device)
    num_clips = labels.shape[0]

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = SiT(cfg, plane_shapes, num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, tc.learning_rate, tc.weight_decay, (tc.beta1, tc.beta2), device)
    if tc.resume:
        model.load_state_dict(resume_ckpt["model"])
        ema.load_state_dict(resume_ckpt["ema"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
    raw_model = model
    if use_compile(tc.compile, device):
        model = torch.compile(model)
    if dist.ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    flops_per_step = 3 * raw_model.flops_per_sample() * tc.batch_size * tc.grad_accum  # on one device
    if dist.is_main:
        n_params = sum(p.numel() for p in raw_model.parameters())
        n_tokens = sum(gh * gw for gh, gw in raw_model.grids)
        mode = f"{num_classes} classes, label dropout {cfg.class_dropout}" if raw_model.conditional \
            else "unconditional"
        print(f"SiT {n_params / 1e6:.2f}M params, {n_tokens} tokens per clip from planes {plane_shapes}; "
              f"{num_clips} clips from {tc.tokens}, {mode}; on {device} x{dist.world_size}")
        if tc.resume:
            print(f"resuming {ckpt_path} at step {step}" + "".join(f"\n  override: {o}" for o in overrides))

    def save(step):
        D.atomic_save({"kind": "coordtok_dit", "model": raw_model.state_dict(), "ema": ema.state_dict(),
                       "optimizer": optimizer.state_dict(), "step": step, "model_config": asdict(cfg),
                       "train_config": asdict(tc), "plane_shapes": [list(s) for s in plane_shapes],
                       "num_classes": num_classes, "class_names": class_names,
                       "mean": tokens["mean"], "std": tokens["std"], "tokens": tc.tokens,
                       "tokenizer_ckpt": tokens["tokenizer_ckpt"], "tokenizer_config": tokens["tokenizer_config"]},
                      ckpt_path)

    with run_lock(ckpt_path, tc.resume) if dist.is_main else nullcontext():
        start_step, bad_steps, t_start = step, 0, time.time()
        global_batch = tc.batch_size * dist.world_size
        bar = tqdm(total=tc.max_iters, initial=step, disable=not dist.is_main, dynamic_ncols=True)
        while step < tc.max_iters:
            lr = lr_at(step, tc.learning_rate, tc.warmup_iters, tc.lr_decay_iters or tc.max_iters, tc.lr_schedule,
                       tc.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # noise, times and label dropout are drawn for the global batch, seeded by (seed, step): a resumed
            # run draws the same, and so does a run on any number of processes
            gen = torch.Generator(device).manual_seed(tc.seed * 1_000_003 + step)
            loss_sum = torch.zeros((), device=device)
            for micro in range(tc.grad_accum):
                index = batch_indices(step * tc.grad_accum + micro, global_batch, num_clips, tc.seed)
                index = index[dist.rank * tc.batch_size:(dist.rank + 1) * tc.batch_size].to(device)  # this rank's
                x1 = tuple(z[index] for z in planes)                                    # (B, C, H, W) each
                sync = nullcontext() if not dist.ddp or micro == tc.grad_accum - 1 else model.no_sync()
                with sync:
                    with autocast(device):
                        loss = flow_matching_loss(model, x1, labels[index], raw_model.null_class, cfg.class_dropout,
                                                  gen, cfg.time_shift, share=(dist.rank, dist.world_size))
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.detach() / tc.grad_accum
            bad_steps = optimizer_step(raw_model, optimizer, tc.grad_clip, step, bad_steps, tc.max_bad_steps, ckpt_path)
            if not bad_steps:
                ema_update(ema, raw_model, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
            step += 1  # a skipped step moves on too: the next one draws other clips and noise
            bar.update(1)

            if dist.is_main and (step % tc.log_interval == 0 or step == tc.max_iters):
                post = {"loss": f"{loss_sum.item():.4f}", "lr": f"{lr:.1e}"}
                if device.type == "cuda":
                    post["mfu"] = mfu_text(bar, start_step, flops_per_step, tc.peak_flops)
                bar.set_postfix(post)
            out_of_time = time_is_up(tc, step, t_start, device, dist.ddp)
            done = step == tc.max_iters or out_of_time
            if dist.is_main and (step % tc.ckpt_interval == 0 or done):
                save(step)
            if out_of_time:
                bar.write(f"stopping after {tc.max_time} minutes (--max_time) at step {step}")
                break
        bar.close()
    if dist.is_main:
        if step == start_step:  # nothing to train (already at --max_iters): keep the checkpoint as it is
            print(f"{ckpt_path} is already at step {step} (--max_iters {tc.max_iters}); nothing to do")
        else:
            print(f"saved {ckpt_path} (step {step}); sample with `python sample.py --ckpt {ckpt_path}`")
    cleanup_distributed(dist)


def main(argv=None):
    cfg, tc = parse_config((SiTConfig, DiTTrainConfig), PRESETS, argv, description=__doc__.split("\n\n")[0],
                           default_preset="cpu")
    try:
        train(cfg, tc, explicit_flags(argv))
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
