"""
SiT on CoordTok's triplanes: a diffusion transformer trained with flow matching on the three
normalised planes (z_xy, z_xt, z_yt) of the tokens file that `tokenizer.py --encode` writes.
Presets S/2 to XL/2 are the authors' SiT (L/2: the paper's generator).

  python dit.py --tokens out/tokens.pt           # CPU-sized model, a few minutes
  python dit.py --resume --max_iters 6000        # continue out/dit.pt, flags from its checkpoint
  torchrun --nproc_per_node=8 dit.py --tokens out/tokens.pt --preset L/2 --batch_size 8 \\
      --learning_rate 1e-4 --lr_schedule constant --warmup_iters 0 --max_iters 600000

Conventions (SiT's linear path, velocity prediction): t = 0 is noise, t = 1 is data;
x_t = (1 - t) noise + t x1; the model predicts v = x1 - noise. Sampling integrates dx/dt = v from
t = 0 to 1 (Euler or Heun), or SiT's SDE with the same marginals (Euler-Maruyama, `integrate`).

Reading order: config, the model, flow matching, guidance and the samplers, EMA, the training
loop. harness.py maps the authors' weights onto the model (from_official).
"""

import copy
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data
import harness as H
from tokenizer import MLP, Attention  # the transformer layers, shared with the tokenizer


@dataclass
class SiTConfig:
    width: int = 128
    depth: int = field(default=4, metadata={"min": 0})
    heads: int = 4
    patch_size: int = 2
    mlp_ratio: float = 4.0
    conditional: bool = False    # condition on the tokens file's classes (the paper: no)
    class_dropout: float = field(default=0.0, metadata={"below": 1})  # labels made null (guidance)
    learn_sigma: bool = True     # the authors' heads also output an unused variance half
    time_shift: float = 1.0      # > 1: more training times and sampler steps near the noise end


PRESETS = {
    # a 2-core CPU on the tiny tokenizer's triplanes, class-conditional (guidance)
    "cpu": SiTConfig(conditional=True, class_dropout=0.1),
    # the authors' sizes; L/2 is the paper's generator (unconditional on UCF-101)
    "S/2": SiTConfig(width=384, depth=12, heads=6),
    "B/2": SiTConfig(width=768, depth=12, heads=12),
    "L/2": SiTConfig(width=1024, depth=24, heads=16),
    "XL/2": SiTConfig(width=1152, depth=28, heads=16),
}

# -----------------------------------------------------------------------------
# the model


def sincos_2d(height, width, dim):
    """Fixed 2D sin-cos position table (height*width, dim), row-major. As in MAE and SiT, the
    first half of the channels encodes the column, the second the row; each half is sin, then
    cos, of the position at dim/4 frequencies from 1 down to 1/10000."""
    if dim % 4:
        raise ValueError(f"--width {dim} must be divisible by 4 for the sin-cos positions.")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def embed(pos):  # (n,) -> (n, dim/2)
        angles = pos[:, None].double() * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cat([embed(cols.flatten()), embed(rows.flatten())], dim=1).float()


def timestep_embedding(t, dim=256, max_period=10000):
    """Sinusoidal features of t in [0, 1] (SiT feeds t itself, not 1000 t): cos, then sin, at
    dim/2 frequencies from 1 down to 1/max_period. (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]                                 # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulate(x, shift, scale):  # x (B, N, D), shift / scale (B, D)
    return x * (1 + scale[:, None]) + shift[:, None]


class SiTBlock(nn.Module):
    """A transformer block whose norms the conditioning shifts, scales and gates (adaLN-Zero):
    the modulation starts at zero, so every block starts as the identity."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, mlp_ratio, approximate="tanh")
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x, c):  # x (B, N, D), c (B, D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(c)).chunk(6, 1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class OutputHead(nn.Module):
    """The final adaLN norm and the projection of each token to its patch of one plane."""

    def __init__(self, dim, patch_size, channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, patch_size * patch_size * channels)

    def forward(self, x, c):
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=1)
        return self.proj(modulate(self.norm(x), shift, scale))


class SiT(nn.Module):
    """The velocity at (planes, t, y): planes (z_xy, z_xt, z_yt) in, the same shapes out. Each
    plane is cut into patches by its own conv and gets positions (xy: a fixed 2D sin-cos table;
    the time planes: one learned table on their common time axis, each reading its first columns)
    and a learned type vector; the tokens form one sequence (the paper: 64 + 128 + 128 = 320).
    num_classes: rows of the class embedding, plus a null class (guidance's "no label")."""

    def __init__(self, config: SiTConfig, plane_shapes, num_classes=1):
        super().__init__()
        self.config = cfg = config
        self.plane_shapes = [tuple(int(s) for s in shape) for shape in plane_shapes]
        self.num_classes = num_classes
        validate_config(cfg, self.plane_shapes)
        p, width = cfg.patch_size, cfg.width
        self.grids = [(h // p, w // p) for _, h, w in self.plane_shapes]       # tokens per plane
        self.embeds = nn.ModuleList(nn.Conv2d(c, width, kernel_size=p, stride=p)
                                    for c, _, _ in self.plane_shapes)
        # a Parameter that is not trained, as the authors' (it counts and loads like theirs)
        self.pos_xy = nn.Parameter(sincos_2d(*self.grids[0], width)[None], requires_grad=False)
        self.time_columns = max(self.grids[1][1], self.grids[2][1])
        self.pos_t = nn.Parameter(torch.zeros(1, self.grids[1][0] * self.time_columns, width))
        self.plane_type = nn.Parameter(torch.randn(1, 3, width))
        self.time_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        null_rows = 1 if cfg.class_dropout > 0 else 0  # the row of "no label", for guidance
        self.class_embed = nn.Embedding(num_classes + null_rows, width)
        self.blocks = nn.ModuleList(SiTBlock(width, cfg.heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.heads = nn.ModuleList(OutputHead(width, p, c * (1 + cfg.learn_sigma))
                                   for c, _, _ in self.plane_shapes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):  # a conv patch embedding is a linear map
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: the untrained network is the identity on its tokens, predicting zero
        for m in [b.modulation for b in self.blocks] + [m for h in self.heads
                                                        for m in (h.modulation, h.proj)]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def conditional(self):
        return self.num_classes > 1

    @property
    def null_class(self):  # the label that means "no label": None without one, or without classes
        return self.num_classes if self.config.class_dropout > 0 and self.conditional else None

    def forward(self, planes, t, y):
        pos_t = rearrange(self.pos_t, "1 (t s) d -> t s d", s=self.time_columns)
        positions = [self.pos_xy] + [rearrange(pos_t[:, :cols], "t s d -> 1 (t s) d")
                                     for _, cols in self.grids[1:]]
        tokens = [rearrange(embed(z), "b d h w -> b (h w) d") + pos + self.plane_type[:, i]
                  for i, (embed, z, pos) in enumerate(zip(self.embeds, planes, positions))]
        x = torch.cat(tokens, dim=1)                                          # (B, N, D)
        c = self.time_mlp(timestep_embedding(t).to(x.dtype)) + self.class_embed(y)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        p, out = self.config.patch_size, []
        for head, x_plane, (gh, gw), (channels, _, _) in zip(
                self.heads, x.split([h * w for h, w in self.grids], 1), self.grids,
                self.plane_shapes):
            plane = rearrange(head(x_plane, c), "b (h w) (p1 p2 c) -> b c (h p1) (w p2)",
                              h=gh, w=gw, p1=p, p2=p)
            out.append(plane[:, :channels])  # the first C channels: learn_sigma's other half unused
        return tuple(out)

    def flops_per_sample(self):
        """Forward FLOPs of the matmuls for one sample (for MFU)."""
        n, d, r = sum(gh * gw for gh, gw in self.grids), self.config.width, self.config.mlp_ratio
        per_block = 2 * n * (4 + 2 * r) * d * d + 4 * n * n * d              # linear maps; q@k, a@v
        embed = sum(2 * gh * gw * c * self.config.patch_size ** 2 * d
                    for (gh, gw), (c, _, _) in zip(self.grids, self.plane_shapes))
        return self.config.depth * per_block + 2 * embed                     # heads ~ embeddings

    @classmethod
    def from_official(cls, path_or_state_dict, official_kwargs=None):
        """Our SiT carrying the authors' weights: their release's EMA (or its name,
        "coordtok_sit_l2_ucf101") or state dict; official_kwargs: their arguments, else L/2's."""
        fields, shapes, classes, state, hint = H.official_sit(path_or_state_dict, official_kwargs)
        with torch.device("meta"):
            model = cls(SiTConfig(**fields), shapes, num_classes=classes)
        return H.load_state(model, state, "official SiT", hint)


def validate_config(cfg, plane_shapes):
    """Fail at start, naming the flag, instead of with a NaN or a reshape error later."""
    problems = [f"--{n} must be > 0" for n in ("mlp_ratio", "time_shift") if getattr(cfg, n) <= 0]
    if cfg.heads > 0 and cfg.width % cfg.heads:
        problems.append(f"--width {cfg.width} is not divisible by --heads {cfg.heads}")
    if len(plane_shapes) != 3 or plane_shapes[1][:2] != plane_shapes[2][:2]:
        problems.append(f"the planes {plane_shapes} are not a triplane (two time planes of one "
                        f"length and channels)")
    problems += [f"plane {name} ({h}x{w}) is not divisible by --patch_size {cfg.patch_size}"
                 for name, (_, h, w) in zip(data.PLANES, plane_shapes)
                 if cfg.patch_size > 0 and (h % cfg.patch_size or w % cfg.patch_size)]
    H.check_config(cfg, problems)


# -----------------------------------------------------------------------------
# flow matching (the linear path from noise at t = 0 to data at t = 1), guidance, the samplers


def shift_time(u, shift):
    """u in [0, 1] -> t = u / (u + shift (1 - u)); shift > 1 moves times toward the noise end,
    where a clip's layout is decided."""
    return u / (u + shift * (1 - u))


def randn_planes(shapes, generator=None, device="cpu"):
    """Standard normal planes of the given (B, C, H, W) shapes. generator: one, or a list of one
    per sample, so that sample k's noise does not depend on the batch it is drawn in."""
    if isinstance(generator, (list, tuple)):
        return tuple(torch.stack([torch.randn(s[1:], generator=g, device=g.device)
                                  for g in generator]).to(device) for s in shapes)
    where = generator.device if generator is not None else device
    return tuple(torch.randn(s, generator=generator, device=where).to(device) for s in shapes)


def flow_matching_loss(model, x1, y, null_class=None, class_dropout=0.0, generator=None,
                       time_shift=1.0, share=(0, 1)):
    """Mean over the planes of the squared error of the predicted velocity x1 - noise at a random
    time. x1: data planes (B, C, H, W); y (B,) labels, of which class_dropout become null_class
    (so the network also learns the unconditional velocity). share (rank, world): times, noise
    and dropped labels are drawn for the global batch, the same on any number of processes."""
    (rank, world), B, device = share, x1[0].shape[0], x1[0].device
    mine = slice(rank * B, (rank + 1) * B)
    t = shift_time(torch.rand(B * world, generator=generator, device=device), time_shift)[mine]
    noise = tuple(n[mine] for n in randn_planes([(B * world, *x.shape[1:]) for x in x1],
                                                generator, device))
    t_ = t[:, None, None, None]
    x_t = tuple((1 - t_) * n + t_ * x for n, x in zip(noise, x1))
    if class_dropout > 0 and null_class is not None:
        drop = torch.rand(B * world, generator=generator, device=device)[mine] < class_dropout
        y = torch.where(drop, torch.full_like(y, null_class), y)
    v = model(x_t, t, y)
    return sum((vi.float() - (x - n)).pow(2).mean() for vi, x, n in zip(v, x1, noise)) / len(x1)


def guided_velocity(model, x, t, y, cfg_scale, null_class):
    """Classifier-free guidance: v_null + cfg_scale (v_y - v_null), both halves in one batch."""
    both = tuple(torch.cat([xi, xi]) for xi in x)
    v = model(both, torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    return tuple(v_null + cfg_scale * (v_cond - v_null)
                 for v_cond, v_null in (vi.float().chunk(2) for vi in v))


SAMPLERS = ("euler", "heun", "sde")


@torch.no_grad()
def integrate(velocity, noise, sampler="sde", steps=250, generator=None, diffusion=1.0,
              time_shift=1.0, last_step=0.04, progress=False, desc=None):
    """Carry planes from noise at t = 0 to data at t = 1; velocity(x, t) takes planes and t (B,).
    euler, heun: the ODE dx = v dt in `steps` steps (first and second order).
    sde: SiT's default sampler (Euler-Maruyama, diffusion form "sigma", last step "Mean"):
        dx = [v + w(t) score] dt + sqrt(2 w(t)) dW,   w(t) = diffusion (1 - t),
    which has the ODE's marginals for any w >= 0. On the linear path the noise is estimated as
    x - t v, so score = -(x - t v) / (1 - t) and the drift is v + diffusion (t v - x). steps - 1
    Euler-Maruyama steps go from t = 0 to 1 - last_step, then one noise-free step of the drift
    ends at t = 1: `steps` model calls in all (SiT: 250, last step 0.04, diffusion 1). Times are
    uniform in u and placed at t = shift_time(u), as in training."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}.")
    fewest = 2 if sampler == "sde" else 1  # the SDE's last step is a step of its own
    if steps < fewest:
        raise ValueError(f"--steps must be >= {fewest} for the {sampler} sampler.")
    x = tuple(n.float() for n in noise)
    B, device = x[0].shape[0], x[0].device
    end = 1 - last_step if sampler == "sde" else 1.0
    points = steps if sampler == "sde" else steps + 1
    times = (end * shift_time(torch.linspace(0, 1, points, dtype=torch.float64),
                              time_shift)).tolist()

    def at(t):
        return torch.full((B,), t, device=device)

    def sde_drift(x, v, t):
        return tuple(vi + diffusion * (t * vi - xi) for xi, vi in zip(x, v))

    for i in tqdm(range(points - 1), disable=not progress, desc=desc, leave=False):
        t, dt = times[i], times[i + 1] - times[i]
        v = velocity(x, at(t))
        if sampler == "heun":
            v_next = velocity(tuple(xi + dt * vi for xi, vi in zip(x, v)), at(times[i + 1]))
            x = tuple(xi + dt / 2 * (vi + vn) for xi, vi, vn in zip(x, v, v_next))
        elif sampler == "sde":
            std = math.sqrt(2 * diffusion * (1 - t) * dt)
            dw = randn_planes([xi.shape for xi in x], generator, device)
            x = tuple(xi + dt * di + std * n for xi, di, n in zip(x, sde_drift(x, v, t), dw))
        else:
            x = tuple(xi + dt * vi for xi, vi in zip(x, v))
    if sampler == "sde" and last_step > 0:  # SiT's "Mean" step: the drift without noise
        x = tuple(xi + last_step * di for xi, di in zip(x, sde_drift(x, velocity(x, at(end)), end)))
    return x


@torch.no_grad()
def sample_planes(model, labels, cfg_scale=1.0, sampler="sde", steps=250, generator=None,
                  diffusion=1.0, progress=False, desc=None):
    """Normalised planes (undo with denormalize) drawn from a SiT or its compiled wrapper. labels
    (B,): classes, or model.null_class for unconditional samples (zeros without classes); guidance
    when cfg_scale != 1 and there is a null class. generator: as in randn_planes."""
    device = next(model.parameters()).device
    labels = labels.to(device)
    noise = randn_planes([(len(labels), *s) for s in model.plane_shapes], generator, device)
    guided = model.null_class is not None and cfg_scale != 1.0

    def velocity(x, t):
        with H.autocast(device):
            if guided:
                return guided_velocity(model, x, t, labels, cfg_scale, model.null_class)
            return tuple(v.float() for v in model(x, t, labels))

    return integrate(velocity, noise, sampler, steps, generator, diffusion,
                     model.config.time_shift, progress=progress, desc=desc)


def normalize(planes, mean, std):
    """Per plane and channel to zero mean, unit std; mean / std: plane name -> (C,)."""
    return tuple((z - mean[k].to(z)[:, None, None]) / std[k].to(z)[:, None, None]
                 for k, z in zip(data.PLANES, planes))


def denormalize(planes, mean, std):
    return tuple(z * std[k].to(z)[:, None, None] + mean[k].to(z)[:, None, None]
                 for k, z in zip(data.PLANES, planes))


# -----------------------------------------------------------------------------
# training: the EMA of the weights, the loop


def ema_decay_at(step, decay, warmup=True):
    """The EMA's decay after `step` steps: with warmup min(decay, (1 + step) / (10 + step)), so
    a short run's average forgets the random initial weights."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


@dataclass
class DiTTrainConfig(H.LoopConfig):  # with LoopConfig's: schedule, AdamW, record, stopping
    tokens: str = "out/tokens.pt"  # the tokens file of `tokenizer.py --encode`
    batch_size: int = 32         # clips per step on each process (the paper: 64, at 1e-4 constant)
    ema_decay: float = field(default=0.9999, metadata={"below": 1})
    ema_warmup: bool = True      # decay min(ema_decay, (1 + step) / (10 + step))


def load_dit(path, device="cpu"):
    """The EMA weights of a SiT (eval mode; only they are read) and its checkpoint dict, ours or
    the authors' release (kind "official": no token statistics, classes or tokenizer: give them)."""
    model, ckpt = H.load_model_file(path, "coordtok_dit", SiTConfig,
                                    lambda cfg, c: SiT(cfg, c["plane_shapes"], c["num_classes"]),
                                    "ema", SiT.from_official, "SiT")
    if ckpt["kind"] == "official":
        ckpt.update(plane_shapes=model.plane_shapes, num_classes=model.num_classes, class_names=[])
    return model.to(device).eval().requires_grad_(False), ckpt


def train(cfg: SiTConfig, tc: DiTTrainConfig, explicit=frozenset()):
    ckpt_path = os.path.join(tc.out_dir, "dit.pt")
    step, overrides = 0, []
    if tc.resume:
        resume_ckpt, cfg, tc, overrides = H.resume_from(ckpt_path, "coordtok_dit", cfg, tc,
                                                        explicit, keep=("resume", "out_dir"))
        step = resume_ckpt["step"]
        if step >= tc.max_iters:
            return print(f"{ckpt_path} is at step {step}: nothing to train below --max_iters "
                         f"{tc.max_iters}.")
    H.check_config(tc)
    tokens = data.load_tokens(tc.tokens)
    planes = normalize(tuple(tokens[k].float() for k in data.PLANES), tokens["mean"], tokens["std"])
    tc = replace(tc, tokens=os.path.abspath(tc.tokens))  # --resume reads the same file
    plane_shapes = [tuple(z.shape[1:]) for z in planes]
    class_names = list(tokens["class_names"]) if cfg.conditional else []
    num_classes, labels = max(len(class_names), 1), tokens["labels"].long()
    if num_classes == 1:  # unconditional: the one class row is a learned constant
        labels = torch.zeros_like(labels)
    if tc.resume and (resume_ckpt.get("tokenizer_fingerprint") != tokens["tokenizer_fingerprint"]
                      or [tuple(s) for s in resume_ckpt["plane_shapes"]] != plane_shapes):
        raise ValueError(f"{tc.tokens} is not the tokens file {ckpt_path} was trained on (another "
                         f"tokenizer or planes); resume with its own --tokens.")
    dist = H.setup_distributed(tc.device)
    device, cuda = dist.device, dist.device.type == "cuda"
    lock = H.lock_run(ckpt_path, tc.resume, dist)  # two runs never write one checkpoint
    planes, labels = tuple(z.to(device) for z in planes), labels.to(device)  # all on the device

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = SiT(cfg, plane_shapes, num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(H.decay_groups(model, tc.weight_decay), lr=tc.learning_rate,
                                  betas=(tc.beta1, tc.beta2), fused=cuda)
    if tc.resume:
        model.load_state_dict(resume_ckpt["model"])
        ema.load_state_dict(resume_ckpt["ema"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
    raw_model = model  # what is saved and averaged; `model` is what the loop calls
    if tc.compile == "true" or (tc.compile == "auto" and cuda):  # on for CUDA by default
        model = torch.compile(model)
    if dist.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, [dist.local_rank] if cuda
                                                          else None)
    clips_per_step = tc.batch_size * tc.grad_accum * dist.world_size
    flops_per_step = 3 * raw_model.flops_per_sample() * tc.batch_size * tc.grad_accum
    log = H.RunLog(tc.out_dir, "dit", step, dist.is_main, tc.wandb_project, asdict(tc))
    if dist.is_main:
        mode = f"{num_classes} classes, label dropout {cfg.class_dropout}" \
            if raw_model.conditional else "unconditional"
        print(f"SiT {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M params, "
              f"{sum(h * w for h, w in raw_model.grids)} tokens per clip from planes "
              f"{plane_shapes}; {len(labels)} clips from {tc.tokens}, {mode}; on {device} "
              f"x{dist.world_size}; the record of the run: {log.path}")
        if tc.resume:  # and the flags this command line changes
            print(f"resuming {ckpt_path} at step {step}", *overrides, sep="\n")

    def save(step):
        H.atomic_save({"kind": "coordtok_dit", "model": raw_model.state_dict(),
                       "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                       "model_config": asdict(cfg), "train_config": asdict(tc),
                       "plane_shapes": [list(s) for s in plane_shapes], "num_classes": num_classes,
                       "class_names": class_names, "mean": tokens["mean"], "std": tokens["std"],
                       "tokens": tc.tokens, "tokenizer_ckpt": tokens["tokenizer_ckpt"],
                       "tokenizer_config": tokens["tokenizer_config"],
                       "tokenizer_fingerprint": tokens["tokenizer_fingerprint"]}, ckpt_path)

    # the clips of each global batch: data.ClipSampler's permutations, as the tokenizer's loader
    clips = iter(data.ClipSampler(len(labels), True, tc.seed, dist.rank, dist.world_size,
                                  tc.batch_size, start=step * tc.grad_accum * tc.batch_size))
    start_step, bad_steps, done, t_start = step, 0, False, time.time()
    t_log, step_log = t_start, step
    bar = tqdm(total=tc.max_iters, initial=step, disable=not dist.is_main, dynamic_ncols=True)
    with H.stop_signals() as signals, bar:  # SIGTERM (preemption), Ctrl-C: finish, save, exit
        while True:  # forward and backward; a checkpoint when due; the step (not after the last)
            lr = H.lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # seeded by (seed, step): a resumed run draws the same noise, times and dropped labels
            gen = torch.Generator(device).manual_seed(tc.seed * 1_000_003 + step)
            loss_sum = torch.zeros((), device=device)
            for micro in range(tc.grad_accum):
                index = torch.tensor([next(clips)[0] for _ in range(tc.batch_size)], device=device)
                x1 = tuple(z[index] for z in planes)                          # (B, C, H, W) each
                last = not dist.ddp or micro == tc.grad_accum - 1  # DDP syncs on the last only
                with nullcontext() if last else model.no_sync():
                    with torch.autocast(device.type, torch.bfloat16, enabled=cuda):  # bf16 on GPU
                        loss = flow_matching_loss(model, x1, labels[index], raw_model.null_class,
                                                  cfg.class_dropout, gen, cfg.time_shift,
                                                  share=(dist.rank, dist.world_size))
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.detach() / tc.grad_accum
            # clip the gradient's norm; skip a step whose gradient is not finite (every rank)
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                  tc.grad_clip if tc.grad_clip > 0 else math.inf)
            finite = bool(torch.isfinite(norm))
            # a checkpoint holds weights whose gradient was just found finite: none that diverged
            due = step % tc.ckpt_interval == 0 or done
            if dist.is_main and due and finite and step > start_step:
                save(step)
            if done:
                break
            if finite:
                optimizer.step()
                ema_update(ema, raw_model, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
                bad_steps = 0
            else:  # the next step draws other clips and noise
                bad_steps += 1
                H.warn_skipped_step(bad_steps, tc.max_bad_steps, ckpt_path)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            out_of_time = tc.max_time > 0 and time.time() - t_start > tc.max_time * 60
            signum, out_of_time = H.agree(dist, signals[0] if signals else 0, out_of_time)
            done = step == tc.max_iters or signum or out_of_time
            if dist.is_main and (step % tc.log_interval == 0 or done):
                seconds = (time.time() - t_log) / (step - step_log)
                record = dict(step=step, loss=loss_sum.item(), lr=lr, seconds_per_step=seconds,
                              clips_per_s=clips_per_step / seconds)
                if cuda:
                    record["mfu"] = flops_per_step / seconds / tc.peak_flops
                log.write(record)
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "lr", "mfu")
                                 if k in record})
                t_log, step_log = time.time(), step
    if not finite:  # the run ended in a non-finite streak: nothing was saved since it began
        raise H.diverged(bad_steps + 1, ckpt_path)
    H.end_run(dist, tc, lock, log, step, signum, ckpt_path,
              f"; sample with `python sample.py --ckpt {ckpt_path}`")


def main(argv=None):
    (cfg, tc), explicit = H.parse_config((SiTConfig, DiTTrainConfig), PRESETS, argv,
                                         description=__doc__.split("\n\n")[1], default_preset="cpu")
    with H.errors_as_exit():
        train(cfg, tc, explicit)


if __name__ == "__main__":
    main()
