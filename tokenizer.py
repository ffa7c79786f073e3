"""
CoordTok: a video tokenizer that encodes a clip into a factorized triplane and learns to
reconstruct the patches at (t, y, x) coordinates sampled at random, so the cost of training
does not grow with the length of the clip.

  python tokenizer.py                                    # tiny model on the synthetic set, CPU, minutes
  torchrun --nproc_per_node=8 tokenizer.py --preset large --data DIR
  python tokenizer.py --stage 2 --init_from out/tokenizer.pt --out_dir out/stage2 --data DIR
  python tokenizer.py --encode out/tokens.pt            # triplanes of every clip, for dit.py

The file reads top to bottom: configuration and presets, the model (encoder, triplane lookup,
decoder), the LPIPS loss of stage 2, the training infrastructure shared with dit.py
(distributed set-up, flags, checkpoints), then the training loop and the encode command.
"""

import argparse
import dataclasses
import math
import os
import socket
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data as D

# -----------------------------------------------------------------------------
# configuration


@dataclass
class CoordTokConfig:
    # the clip
    num_frames: int = 16
    img_size: int = 32
    # encoder: 3D patches of the clip -> ViT -> learned triplane queries cross-attend to them
    enc_patch_t: int = 4
    enc_patch_s: int = 8
    enc_width: int = 192
    enc_heads: int = 4
    enc_layers: int = 2          # ViT blocks over the video tokens
    query_layers: int = 2        # (cross-attn, self-attn, MLP) blocks over the triplane queries
    # triplane: z_xy (C, Rs, Rs), z_xt and z_yt (C, Rt, Rs)
    triplane_rs: int = 8         # = the decoder's patch grid (32 / 4), as in the paper (128 / 8 = 16)
    triplane_rt: int = 16
    triplane_c: int = 16
    query_patch_s: int = 2       # a query token covers query_patch_s x query_patch_s of z_xy
    query_patch_t: int = 4       # and query_patch_t x query_patch_s of z_xt / z_yt
    # decoder: self-attention over the queried coordinates, each token -> one patch of pixels
    dec_width: int = 192
    dec_heads: int = 4
    dec_layers: int = 4
    dec_patch_t: int = 1
    dec_patch_s: int = 4
    decode_chunk: int = 16       # temporal patches decoded together by decode_video
    mlp_ratio: float = 4.0


def _paper(**kw):
    """The paper's clip, triplane and decoder patch (DESIGN.md), with the sizes in kw."""
    base = dict(num_frames=128, img_size=128, enc_patch_t=8, enc_patch_s=16,
                triplane_rs=16, triplane_rt=32, triplane_c=8, query_patch_s=8, query_patch_t=16,
                dec_patch_t=1, dec_patch_s=8, decode_chunk=4)
    return CoordTokConfig(**{**base, **kw})


PRESETS = {
    "tiny": CoordTokConfig(),  # sized for a 2-core CPU: 16 frames of 32x32, 320 tokens of 16 channels
    "small": _paper(enc_width=512, enc_heads=8, enc_layers=8, query_layers=8,
                    dec_width=512, dec_heads=8, dec_layers=8),
    "base": _paper(enc_width=768, enc_heads=12, enc_layers=8, query_layers=12,
                   dec_width=768, dec_heads=12, dec_layers=12),
    "large": _paper(enc_width=1024, enc_heads=16, enc_layers=8, query_layers=24,
                    dec_width=1024, dec_heads=16, dec_layers=24),
}


@dataclass
class TrainConfig:
    data: str = ""               # folder of videos (class = parent folder); empty: the synthetic set
    out_dir: str = "out"
    stage: int = 1               # 1: random patches, L2. 2: whole frames, L2 + LPIPS
    init_from: str = ""          # checkpoint whose weights start the run (stage 2)
    resume: bool = False         # continue out_dir/tokenizer.pt exactly where it stopped
    encode: str = ""             # write the tokens file of every clip to this path, then exit
    max_iters: int = 2500
    batch_size: int = 8          # clips per step on each process
    grad_accum: int = 1
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    lr_schedule: str = "cosine"  # constant | cosine
    warmup_iters: int = 100
    lr_decay_iters: int = 0      # 0: max_iters
    weight_decay: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    num_samples: int = 128       # stage 1: patches reconstructed per clip (the paper: 1024 of 32768)
    num_frames_stage2: int = 4   # stage 2: whole frames (temporal patches) reconstructed per clip
    lpips_weight: float = 1.0    # stage 2
    lpips_vgg: str = ""          # path of torchvision's vgg16 state dict (default: fetched to the hub cache)
    lpips_lin: str = ""          # path of LPIPS v0.1 vgg.pth (default: fetched to the hub cache)
    eval_interval: int = 500
    eval_clips: int = 32          # held-out clips scored at each evaluation (the synthetic set holds out 20)
    ckpt_interval: int = 500
    log_interval: int = 10
    num_workers: int = 2
    val_fraction: float = 0.1
    max_time: float = 0.0        # minutes; stop (and save) once exceeded, 0: no limit
    max_bad_steps: int = 20      # consecutive non-finite steps before the run stops
    peak_flops: float = 989e12   # for MFU: the accelerator's dense bf16 FLOP/s (H100 SXM)
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    compile: str = "auto"        # auto (on for CUDA) | true | false


def validate_config(cfg, train=None):
    """Fail at start, naming the flag to change, instead of deep inside a reshape."""
    problems = []

    def divisible(a, a_name, b, b_name):
        if a % b:
            problems.append(f"--{a_name} {a} is not divisible by --{b_name} {b}")

    divisible(cfg.img_size, "img_size", cfg.enc_patch_s, "enc_patch_s")
    divisible(cfg.num_frames, "num_frames", cfg.enc_patch_t, "enc_patch_t")
    divisible(cfg.img_size, "img_size", cfg.dec_patch_s, "dec_patch_s")
    divisible(cfg.num_frames, "num_frames", cfg.dec_patch_t, "dec_patch_t")
    divisible(cfg.triplane_rs, "triplane_rs", cfg.query_patch_s, "query_patch_s")
    divisible(cfg.triplane_rt, "triplane_rt", cfg.query_patch_t, "query_patch_t")
    divisible(cfg.enc_width, "enc_width", cfg.enc_heads, "enc_heads")
    divisible(cfg.dec_width, "dec_width", cfg.dec_heads, "dec_heads")
    if cfg.decode_chunk < 1:
        problems.append(f"--decode_chunk must be >= 1, got {cfg.decode_chunk}")
    if train is not None:
        gt = cfg.num_frames // cfg.dec_patch_t
        patches = gt * (cfg.img_size // cfg.dec_patch_s) ** 2
        if not 1 <= train.num_samples <= patches:
            problems.append(f"--num_samples {train.num_samples} must be between 1 and the "
                            f"{patches} decoder patches of a clip")
        if train.stage not in (1, 2):
            problems.append(f"--stage must be 1 or 2, got {train.stage}")
        if train.stage == 2 and not 1 <= train.num_frames_stage2 <= gt:
            problems.append(f"--num_frames_stage2 {train.num_frames_stage2} must be between 1 and "
                            f"the {gt} temporal patches of a clip")
        if train.lr_schedule not in ("constant", "cosine"):
            problems.append(f"--lr_schedule must be constant or cosine, got {train.lr_schedule}")
        if train.batch_size < 1 or train.grad_accum < 1:
            problems.append("--batch_size and --grad_accum must be >= 1")
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


# -----------------------------------------------------------------------------
# the model


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.cross = context_dim is not None
        if self.cross:
            self.to_q = nn.Linear(dim, dim)
            self.to_kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim)  # one matmul for q, k and v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):  # x (B, N, C), context (B, M, Cc), mask (B, 1, 1, M)
        if self.cross:
            q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)
            k, v = rearrange(self.to_kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        else:
            q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.fc = nn.Linear(dim, int(dim * ratio))
        self.proj = nn.Linear(int(dim * ratio), dim)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, then MLP."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.ln_attn, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_mlp, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_ratio)

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln_attn(x), mask=mask)
        return x + self.mlp(self.ln_mlp(x))


class QueryBlock(nn.Module):
    """Triplane queries read the video (cross-attention), talk to each other, then an MLP."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.ln_cross, self.ln_context = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = Attention(dim, heads, context_dim=dim)
        self.block = Block(dim, heads, mlp_ratio)

    def forward(self, q, context, mask=None):
        q = q + self.cross(self.ln_cross(q), self.ln_context(context), mask=mask)
        return self.block(q)


def lookup_triplane(triplane, coords, grid_size):
    """Bilinear lookup of each (t, y, x) patch coordinate in the three planes.

    The patch index is normalised to [0, 1] by (grid_size - 1): the first and last patch sit
    on the planes' corner texels (align_corners=True), whatever the two resolutions are.
    Returns the three C-vectors concatenated: (B, N, 3C).
    """
    z_xy, z_xt, z_yt = triplane                                   # (B, C, Rs, Rs), (B, C, Rt, Rs) x2
    gt, gh, gw = grid_size
    scale = coords.new_tensor([max(gt - 1, 1), max(gh - 1, 1), max(gw - 1, 1)]).to(z_xy.dtype)
    t, y, x = (coords.to(z_xy.dtype) / scale * 2 - 1).unbind(-1)  # each (B, N) in [-1, 1]

    def sample(plane, col, row):  # grid_sample reads (x=column, y=row) pairs
        grid = torch.stack([col, row], dim=-1).unsqueeze(1)       # (B, 1, N, 2)
        out = F.grid_sample(plane, grid, mode="bilinear", align_corners=True)  # (B, C, 1, N)
        return rearrange(out, "b c 1 n -> b n c")

    return torch.cat([sample(z_xy, x, y), sample(z_xt, x, t), sample(z_yt, y, t)], dim=-1)


class CoordTok(nn.Module):
    def __init__(self, config: CoordTokConfig):
        super().__init__()
        validate_config(config)
        self.config = cfg = config
        # encoder: 3D patches of the clip -> tokens -> ViT
        self.enc_grid = (cfg.num_frames // cfg.enc_patch_t, cfg.img_size // cfg.enc_patch_s,
                         cfg.img_size // cfg.enc_patch_s)
        n_video = math.prod(self.enc_grid)
        self.patch_embed = nn.Linear(cfg.enc_patch_t * cfg.enc_patch_s ** 2 * 3, cfg.enc_width)
        self.enc_pos = nn.Parameter(torch.zeros(1, n_video, cfg.enc_width))
        self.enc_blocks = nn.ModuleList(Block(cfg.enc_width, cfg.enc_heads, cfg.mlp_ratio)
                                        for _ in range(cfg.enc_layers))
        # the learnable triplane, patchified into query tokens: a learned plane cut into patches
        # and embedded linearly is exactly one learned vector per patch, so we store those
        self.n_xy = (cfg.triplane_rs // cfg.query_patch_s) ** 2
        self.n_time = (cfg.triplane_rt // cfg.query_patch_t) * (cfg.triplane_rs // cfg.query_patch_s)
        self.queries = nn.Parameter(torch.zeros(1, self.n_xy + 2 * self.n_time, cfg.enc_width))
        self.query_blocks = nn.ModuleList(QueryBlock(cfg.enc_width, cfg.enc_heads, cfg.mlp_ratio)
                                          for _ in range(cfg.query_layers))
        self.ln_query = nn.LayerNorm(cfg.enc_width)
        # queries -> triplane patches of C channels (the time planes have taller patches)
        self.to_xy = nn.Linear(cfg.enc_width, cfg.query_patch_s ** 2 * cfg.triplane_c)
        self.to_time = nn.Linear(cfg.enc_width, cfg.query_patch_t * cfg.query_patch_s * cfg.triplane_c)
        # decoder: triplane features + learned position of the coordinate -> ViT -> patch pixels
        gt, gh, gw = self.grid_size
        self.dec_embed = nn.Linear(3 * cfg.triplane_c, cfg.dec_width)
        # factorised position embedding: one table per axis, summed (gt + gh + gw rows, not gt*gh*gw)
        self.dec_pos_t = nn.Parameter(torch.zeros(gt, cfg.dec_width))
        self.dec_pos_y = nn.Parameter(torch.zeros(gh, cfg.dec_width))
        self.dec_pos_x = nn.Parameter(torch.zeros(gw, cfg.dec_width))
        self.dec_blocks = nn.ModuleList(Block(cfg.dec_width, cfg.dec_heads, cfg.mlp_ratio)
                                        for _ in range(cfg.dec_layers))
        self.ln_dec = nn.LayerNorm(cfg.dec_width)
        self.to_pixels = nn.Linear(cfg.dec_width, math.prod(self.patch_size) * 3)
        self.apply(self._init_weights)
        for p in (self.enc_pos, self.queries, self.dec_pos_t, self.dec_pos_y, self.dec_pos_x):
            nn.init.trunc_normal_(p, std=0.02)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def patch_size(self):  # decoder patch (pt, ph, pw)
        c = self.config
        return (c.dec_patch_t, c.dec_patch_s, c.dec_patch_s)

    @property
    def grid_size(self):  # decoder patch grid (gt, gh, gw)
        c = self.config
        return (c.num_frames // c.dec_patch_t, c.img_size // c.dec_patch_s, c.img_size // c.dec_patch_s)

    def num_tokens(self):
        c = self.config
        return c.triplane_rs ** 2 + 2 * c.triplane_rt * c.triplane_rs

    def num_floats(self):
        return self.num_tokens() * self.config.triplane_c

    def encode(self, video, n_frames=None):
        """video (B, T, H, W, 3) in [-1, 1] -> triplane (z_xy, z_xt, z_yt).

        n_frames (B,) marks padded clips: their padded frames are zeroed and the encoder tokens
        made only of padding are masked out of attention, so padding never changes the code.
        """
        cfg, (et, eh, ew) = self.config, self.enc_grid
        mask = None
        if n_frames is not None:
            frame = torch.arange(video.shape[1], device=video.device)
            video = video * (frame[None, :] < n_frames[:, None]).to(video.dtype)[:, :, None, None, None]
            token_t = torch.arange(et, device=video.device).repeat_interleave(eh * ew)  # (Nv,)
            mask = (token_t[None, :] * cfg.enc_patch_t < n_frames[:, None])[:, None, None, :]  # (B, 1, 1, Nv)
        x = rearrange(video, "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)",
                      pt=cfg.enc_patch_t, ph=cfg.enc_patch_s, pw=cfg.enc_patch_s)
        x = self.patch_embed(x) + self.enc_pos                          # (B, Nv, We)
        for block in self.enc_blocks:
            x = block(x, mask=mask)
        q = self.queries + self.pooled_queries(x, mask)                 # (B, Nq, We)
        for block in self.query_blocks:
            q = block(q, x, mask=mask)
        q = self.ln_query(q)
        q_xy, q_xt, q_yt = q.split([self.n_xy, self.n_time, self.n_time], dim=1)
        qs, qt, rs_q = cfg.query_patch_s, cfg.query_patch_t, cfg.triplane_rs // cfg.query_patch_s
        z_xy = rearrange(self.to_xy(q_xy), "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=rs_q, ph=qs, pw=qs)
        z_xt, z_yt = (rearrange(self.to_time(q_t), "b (t s) (pt ps c) -> b c (t pt) (s ps)", s=rs_q, pt=qt, ps=qs)
                      for q_t in (q_xt, q_yt))
        return z_xy, z_xt, z_yt                                         # (B, C, Rs, Rs), (B, C, Rt, Rs) x2

    def pooled_queries(self, x, mask=None):
        """The video tokens averaged along each plane's missing axis, one vector per query token.

        Added to the learned queries, this starts every query from the content of its own region of
        the clip; with learned queries alone, all queries begin alike and take many steps to tell
        the regions of the clip apart.
        """
        cfg, (et, eh, ew) = self.config, self.enc_grid
        rs_q, rt_q = cfg.triplane_rs // cfg.query_patch_s, cfg.triplane_rt // cfg.query_patch_t
        x = rearrange(x, "b (t h w) c -> b c t h w", t=et, h=eh, w=ew)
        real = torch.ones(1, 1, et, 1, 1, device=x.device, dtype=x.dtype)
        if mask is not None:  # average over real time steps only
            real = rearrange(mask[:, 0, 0].to(x.dtype), "b (t h w) -> b 1 t h w", t=et, h=eh, w=ew)[..., :1, :1]
        xy = (x * real).sum(2) / real.sum(2)                            # (B, C, eh, ew)
        xt, yt = x.mean(3), x.mean(4)                                   # (B, C, et, ew), (B, C, et, eh)
        pooled = [F.adaptive_avg_pool2d(xy, rs_q), F.adaptive_avg_pool2d(xt, (rt_q, rs_q)),
                  F.adaptive_avg_pool2d(yt, (rt_q, rs_q))]
        return torch.cat([rearrange(p, "b c h w -> b (h w) c") for p in pooled], dim=1)  # (B, Nq, We)

    def decode(self, triplane, coords):
        """coords (B, N, 3) integer (t, y, x) patch indices -> patch pixels (B, N, pt*ph*pw*3)."""
        x = self.dec_embed(lookup_triplane(triplane, coords, self.grid_size))  # (B, N, Wd)
        t, y, xx = coords.unbind(-1)
        x = x + self.dec_pos_t[t] + self.dec_pos_y[y] + self.dec_pos_x[xx]
        for block in self.dec_blocks:
            x = block(x)
        return self.to_pixels(self.ln_dec(x))

    @torch.no_grad()
    def decode_video(self, triplane, chunk_frames=None):
        """Decode every patch of the clip, decode_chunk temporal patches at a time -> (B, T, H, W, 3)."""
        (gt, gh, gw), B = self.grid_size, triplane[0].shape[0]
        chunk = chunk_frames or self.config.decode_chunk
        grid = D.full_grid(self.grid_size, device=triplane[0].device)   # (gt*gh*gw, 3), frame-major
        per_frame = gh * gw
        patches = torch.cat([self.decode(triplane, grid[s * per_frame:(s + chunk) * per_frame].expand(B, -1, -1))
                             for s in range(0, gt, chunk)], dim=1)      # (B, gt*gh*gw, D)
        patches = rearrange(patches, "b (t h w) d -> b t h w d", t=gt, h=gh, w=gw)
        return D.unpatchify(patches.float(), self.patch_size)

    def forward(self, video, coords, targets, n_frames=None):
        """One reconstruction: encode the clip, decode the patches at coords, L2 to the targets."""
        pred = self.decode(self.encode(video, n_frames), coords)        # (B, N, D)
        return F.mse_loss(pred.float(), targets.float()), pred

    def flops_per_clip(self, num_decoded):
        """Forward FLOPs of the matmuls for one clip decoding num_decoded patches (for MFU)."""
        cfg = self.config

        def blocks(n, width, layers, context=0):
            per_layer = 24 * n * width ** 2 + 4 * n * n * width         # qkv, proj, 4x MLP; q@k, a@v
            if context:                                                 # cross-attention
                per_layer += 4 * n * width ** 2 + 4 * context * width ** 2 + 4 * n * context * width
            return layers * per_layer

        n_video, n_query = math.prod(self.enc_grid), self.queries.shape[1]
        embed = 2 * n_video * self.patch_embed.in_features * cfg.enc_width
        head = 2 * num_decoded * cfg.dec_width * self.to_pixels.out_features
        return (embed + blocks(n_video, cfg.enc_width, cfg.enc_layers)
                + blocks(n_query, cfg.enc_width, cfg.query_layers, context=n_video)
                + blocks(num_decoded, cfg.dec_width, cfg.dec_layers) + head)


# -----------------------------------------------------------------------------
# LPIPS (VGG16, v0.1) for stage 2, also used by eval.py


VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
VGG16_CHANNELS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # torchvision indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


class WeightsUnavailable(RuntimeError):
    pass


class LPIPS(nn.Module):
    """Learned perceptual distance: unit-normalised VGG16 features, weighted per channel, averaged.

    Module names mirror the published files so their state dicts load as they are:
    `features.N.*` are torchvision's vgg16 layers, `linK.model.1.weight` LPIPS v0.1's weights.
    """

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for c in VGG16_CHANNELS:  # same indices as torchvision's vgg16().features
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
                c_in = c
        self.features = nn.Sequential(*layers[:LPIPS_TAPS[-1] + 1])
        for k, c in enumerate((64, 128, 256, 512, 512)):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(c, 1, 1, bias=False))
            setattr(self, f"lin{k}", lin)
        # LPIPS's input scaling: ImageNet statistics expressed for inputs in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def load_published(self, vgg_state, lin_state):
        vgg = {k: v for k, v in vgg_state.items()
               if k.startswith("features.") and int(k.split(".")[1]) <= LPIPS_TAPS[-1]}
        self.load_state_dict({**vgg, **lin_state, "shift": self.shift, "scale": self.scale})
        return self

    @classmethod
    def from_pretrained(cls, vgg_path="", lin_path=""):
        """LPIPS with torchvision's VGG16 and the v0.1 linear layers, from paths or the hub cache."""
        def load(path, url, name):
            try:
                if path:
                    return torch.load(path, map_location="cpu", weights_only=True)
                previous = socket.getdefaulttimeout()
                socket.setdefaulttimeout(60)  # a silent network fails in a minute instead of hanging
                try:
                    return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False)
                finally:
                    socket.setdefaulttimeout(previous)
            except Exception as e:
                cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
                raise WeightsUnavailable(
                    f"LPIPS needs {name} and could not read it ({type(e).__name__}: {e}). Download {url} "
                    f"to {cache}, or pass its path with --lpips_{'vgg' if 'vgg16' in url else 'lin'} PATH") from None
        model = cls().load_published(load(vgg_path, VGG16_URL, "torchvision's VGG16 weights"),
                                     load(lin_path, LPIPS_LIN_URL, "the LPIPS v0.1 linear weights"))
        return model.eval().requires_grad_(False)

    def forward(self, x, y):  # (N, 3, H, W) in [-1, 1] -> (N,)
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        dist, k = 0.0, 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
                fx, fy = f.chunk(2)
                dist = dist + getattr(self, f"lin{k}").model((fx - fy) ** 2).mean(dim=(1, 2, 3))
                k += 1
        return dist


# -----------------------------------------------------------------------------
# training infrastructure (also imported by dit.py)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ddp: bool

    @property
    def is_main(self):
        return self.rank == 0


def pick_device(flag="auto"):
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {flag} was asked for but CUDA is not available; use --device cpu")
    return torch.device(flag)


def setup_distributed(device_flag="auto"):
    """Single process, or one rank of `torchrun` (NCCL on CUDA, gloo on CPU)."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world, local = (int(os.environ.get(k, d)) for k, d in
                          (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))
    device = pick_device(device_flag)
    if ddp and device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device, ddp)


def cleanup_distributed(dist):
    if dist.ddp:
        torch.distributed.destroy_process_group()


def configure_torch(device):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu" and torch.get_num_threads() > (os.cpu_count() or 1):
        torch.set_num_threads(os.cpu_count())


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def use_compile(flag, device):
    if flag not in ("auto", "true", "false", "1", "0"):
        raise ValueError(f"--compile must be auto, true or false, got {flag}")
    return device.type == "cuda" if flag == "auto" else flag in ("true", "1")


def lr_at(step, learning_rate, warmup_iters, max_iters, schedule="constant", min_lr=0.0):
    """Linear warmup, then constant or cosine decay to min_lr at max_iters."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    if schedule == "constant" or step >= max_iters:
        return learning_rate if schedule == "constant" else min_lr
    progress = (step - warmup_iters) / max(1, max_iters - warmup_iters)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def make_optimizer(model, learning_rate, weight_decay, betas, device):
    """AdamW; matrices decay, biases / norms / embeddings do not. Fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2 and p.shape[0] > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if not (p.dim() >= 2 and p.shape[0] > 1)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device.type == "cuda")


def guarded_step(optimizer, grad_norm, step, bad_steps, max_bad_steps, advice):
    """Take the optimizer step, or skip it when the gradient norm is not finite (the norm is the same on
    every rank after the all-reduce, so every rank skips together; reading it is the one sync per step).
    Returns how many steps in a row have now been skipped; raises with advice after max_bad_steps."""
    if torch.isfinite(grad_norm):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return 0
    optimizer.zero_grad(set_to_none=True)
    bad_steps += 1
    warnings.warn(f"step {step}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
    if bad_steps >= max_bad_steps:
        raise RuntimeError(f"{bad_steps} non-finite steps in a row; {advice}")
    return bad_steps


def mfu_text(bar, start_step, flops_per_step, peak_flops):
    """Model FLOPs utilisation since the loop started (nanoGPT's estimate): model FLOPs per step divided by
    the mean step time from the tqdm bar, as a fraction of the device's peak."""
    seconds_per_step = bar.format_dict["elapsed"] / max(bar.n - start_step, 1)
    return f"{flops_per_step / seconds_per_step / peak_flops:.1%}"


def time_is_up(t_start, max_time, device, ddp):
    """True once max_time minutes have passed since t_start. Rank 0's clock decides and is broadcast, so
    that every rank stops at the same step; call it at the same steps on every rank."""
    flag = torch.tensor(float(time.time() - t_start > max_time * 60), device=device)
    if ddp:
        torch.distributed.broadcast(flag, 0)
    return bool(flag)


def load_checkpoint(path, kind):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"could not read checkpoint {path} ({type(e).__name__}: {e}); "
                         f"it is corrupt or not a torch file") from None
    found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != kind:
        raise ValueError(f"{path} is a {found!r} file, not a {kind!r} checkpoint")
    return ckpt


def load_tokenizer(path, device="cpu"):
    """A trained CoordTok (eval mode) and its checkpoint dict."""
    ckpt = load_checkpoint(path, "coordtok_tokenizer")
    model = CoordTok(CoordTokConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_config(config_classes, presets, argv=None, description="", default_preset="tiny"):
    """Every field of every dataclass becomes a flag; `--preset NAME` picks the first class's base."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=default_preset)
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in presets:
        raise SystemExit(f"unknown --preset {preset!r}; choose one of {', '.join(presets)}")
    parser = argparse.ArgumentParser(description=description, parents=[pre])
    bases = [presets[preset]] + [cls() for cls in config_classes[1:]]
    for base in bases:
        group = parser.add_argument_group(type(base).__name__)
        for f in dataclasses.fields(base):
            default = getattr(base, f.name)
            if isinstance(default, bool):  # `--resume` alone means true
                group.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=default)
            else:
                group.add_argument(f"--{f.name}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    return tuple(type(b)(**{f.name: args[f.name] for f in dataclasses.fields(b)}) for b in bases)


# -----------------------------------------------------------------------------
# training


def psnr_per_frame(pred, target):
    """PSNR of each frame on [0, 1] after clamping: (B, T, H, W, 3) in [-1, 1] -> (B, T)."""
    pred, target = ((v.float().clamp(-1, 1) + 1) / 2 for v in (pred, target))
    mse = (pred - target).pow(2).mean(dim=(2, 3, 4))
    return -10 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_psnr(model, val_set, num_clips, batch_size, device):
    """Mean full-clip PSNR (every patch decoded) over the first num_clips held-out clips, real frames only."""
    total, count = 0.0, 0
    indices = list(range(min(num_clips, len(val_set))))
    for i in range(0, len(indices), batch_size):
        items = [val_set[j] for j in indices[i:i + batch_size]]
        video = D.from_uint8(torch.stack([it["video"] for it in items]).to(device))
        n_frames = torch.stack([it["n_frames"] for it in items]).to(device)
        with autocast(device):
            recon = model.decode_video(model.encode(video, n_frames))
        real = torch.arange(video.shape[1], device=device)[None, :] < n_frames[:, None]
        psnr = psnr_per_frame(recon, video)
        total += psnr[real].sum().item()
        count += real.sum().item()
    return total / max(count, 1)


def frames_from_patches(patches, k, grid_size, patch_size):
    """Stage 2's K whole temporal patches (B, K*gh*gw, D) -> images (B*K*pt, 3, H, W) for LPIPS."""
    _, gh, gw = grid_size
    frames = D.unpatchify(rearrange(patches, "b (k h w) d -> (b k) 1 h w d", k=k, h=gh, w=gw), patch_size)
    return rearrange(frames, "n t h w c -> (n t) c h w")


def train(cfg: CoordTokConfig, tc: TrainConfig):
    dist = setup_distributed(tc.device)
    device = dist.device
    configure_torch(device)
    ckpt_path = os.path.join(tc.out_dir, "tokenizer.pt")
    resume_ckpt = load_checkpoint(ckpt_path, "coordtok_tokenizer") if tc.resume else None
    if resume_ckpt is not None:
        cfg = CoordTokConfig(**resume_ckpt["model_config"])  # the model is the checkpoint's
    elif tc.init_from:
        init_ckpt = load_checkpoint(tc.init_from, "coordtok_tokenizer")
        cfg = CoordTokConfig(**init_ckpt["model_config"])
    validate_config(cfg, tc)

    # data: only rank 0 writes the synthetic set; each rank reads different clips
    data_dir = tc.data
    if not data_dir:
        data_dir = "data/synthetic"
        if dist.is_main:
            D.ensure_synthetic(data_dir)
        if dist.ddp:
            torch.distributed.barrier()
    train_set = D.VideoDataset(data_dir, cfg.img_size, cfg.num_frames, split="train",
                               random_start=True, val_fraction=tc.val_fraction)
    val_set = D.VideoDataset(data_dir, cfg.img_size, cfg.num_frames, split="val",
                             random_start=False, val_fraction=tc.val_fraction)
    start_step = resume_ckpt["step"] if resume_ckpt else 0
    batches = D.make_loader(train_set, tc.batch_size, shuffle=True, num_workers=tc.num_workers,
                            distributed=dist.ddp, seed=tc.seed, start_step=start_step * tc.grad_accum)

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = CoordTok(cfg).to(device)
    optimizer = make_optimizer(model, tc.learning_rate, tc.weight_decay, (tc.beta1, tc.beta2), device)
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        torch.set_rng_state(resume_ckpt["rng"]["cpu"])
    elif tc.init_from:
        model.load_state_dict(init_ckpt["model"])
    lpips = None
    if tc.stage == 2 and tc.lpips_weight > 0:
        try:
            lpips = LPIPS.from_pretrained(tc.lpips_vgg, tc.lpips_lin).to(device)
        except WeightsUnavailable as e:
            raise WeightsUnavailable(f"{e}; or train stage 2 without LPIPS with --lpips_weight 0") from None
    raw_model = model
    if use_compile(tc.compile, device):
        model = torch.compile(model)
    if dist.ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    decay_iters = tc.lr_decay_iters or tc.max_iters
    n_decoded = tc.num_samples if tc.stage == 1 else tc.num_frames_stage2 * math.prod(raw_model.grid_size[1:])
    flops_per_step = 3 * raw_model.flops_per_clip(n_decoded) * tc.batch_size * tc.grad_accum * dist.world_size
    if dist.is_main:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"CoordTok {n_params / 1e6:.2f}M params, {raw_model.num_tokens()} tokens per clip of "
              f"{cfg.num_frames}x{cfg.img_size}x{cfg.img_size}; {len(train_set)} training / {len(val_set)} "
              f"held-out videos from {data_dir}; stage {tc.stage} on {device} x{dist.world_size}")

    def save(step):
        D.atomic_save({"kind": "coordtok_tokenizer", "model": raw_model.state_dict(),
                     "optimizer": optimizer.state_dict(), "model_config": asdict(cfg),
                     "train_config": asdict(tc), "step": step, "rng": {"cpu": torch.get_rng_state()},
                     "class_names": train_set.class_names, "data": os.path.abspath(data_dir)}, ckpt_path)

    step, bad_steps, t_start = start_step, 0, time.time()
    bar = tqdm(total=tc.max_iters, initial=step, disable=not dist.is_main, dynamic_ncols=True)
    while step < tc.max_iters:
        lr = lr_at(step, tc.learning_rate, tc.warmup_iters, decay_iters, tc.lr_schedule, tc.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # patch sampling is seeded by (seed, step, rank) so a resumed run draws the same patches
        gen = torch.Generator(device).manual_seed(tc.seed * 1_000_003 + step * dist.world_size + dist.rank)
        loss_sum = torch.zeros((), device=device)
        for micro in range(tc.grad_accum):
            batch = next(batches)
            n_frames_cpu = batch["n_frames"]
            # padding mask only when a clip is short (checked on the CPU tensor: no device sync)
            short = bool((n_frames_cpu < cfg.num_frames).any())
            video = D.from_uint8(batch["video"].to(device, non_blocking=True))  # (B, T, H, W, 3)
            n_frames = n_frames_cpu.to(device, non_blocking=True)
            if tc.stage == 1:
                coords, targets = D.sample_patches(video, n_frames, tc.num_samples, raw_model.patch_size, gen)
            else:
                coords, targets = D.sample_frames(video, n_frames, tc.num_frames_stage2, raw_model.patch_size, gen)
            sync = nullcontext() if not dist.ddp or micro == tc.grad_accum - 1 else model.no_sync()
            with sync:
                with autocast(device):
                    loss, pred = model(video, coords, targets, n_frames if short else None)
                    if lpips is not None:
                        to_frames = lambda p: frames_from_patches(p, tc.num_frames_stage2, raw_model.grid_size,
                                                                  raw_model.patch_size)
                        loss = loss + tc.lpips_weight * lpips(to_frames(pred), to_frames(targets)).mean()
                (loss / tc.grad_accum).backward()
            loss_sum += loss.detach() / tc.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip)
        bad_steps = guarded_step(optimizer, grad_norm, step, bad_steps, tc.max_bad_steps,
                                 f"lower --learning_rate or check the data. The last good checkpoint is {ckpt_path}")
        if bad_steps:
            continue
        step += 1
        bar.update(1)

        if dist.is_main and (step % tc.log_interval == 0 or step == tc.max_iters):
            mse = loss_sum.item() if tc.stage == 1 else None
            post = {"loss": f"{loss_sum.item():.4f}", "lr": f"{lr:.1e}"}
            if mse is not None:
                post["psnr"] = f"{-10 * math.log10(max(mse / 4, 1e-10)):.2f}"  # [-1,1] MSE -> [0,1] PSNR
            if device.type == "cuda":
                post["mfu"] = mfu_text(bar, start_step, flops_per_step, tc.peak_flops)
            bar.set_postfix(post)
        out_of_time = (tc.max_time > 0 and step % tc.log_interval == 0
                       and time_is_up(t_start, tc.max_time, device, dist.ddp))
        done = step == tc.max_iters or out_of_time
        if dist.is_main and (step % tc.eval_interval == 0 or done) and len(val_set) > 0:
            raw_model.eval()
            psnr = evaluate_psnr(raw_model, val_set, tc.eval_clips, tc.batch_size, device)
            raw_model.train()
            bar.write(f"step {step}: held-out full-clip PSNR {psnr:.2f} dB "
                      f"({min(tc.eval_clips, len(val_set))} clips)")
        if dist.is_main and (step % tc.ckpt_interval == 0 or done):
            save(step)
        if out_of_time:
            bar.write(f"stopping after {tc.max_time} minutes (--max_time) at step {step}")
            break
    bar.close()
    if dist.is_main:
        print(f"saved {ckpt_path}")
    cleanup_distributed(dist)


@torch.no_grad()
def encode_dataset(tc: TrainConfig):
    """Write the tokens file (data.save_tokens) with the triplane of one clip per video."""
    device = pick_device(tc.device)
    ckpt_path = tc.init_from or os.path.join(tc.out_dir, "tokenizer.pt")
    model, ckpt = load_tokenizer(ckpt_path, device)
    cfg = model.config
    data_dir = tc.data or ckpt["data"]
    dataset = D.VideoDataset(data_dir, cfg.img_size, cfg.num_frames, split="all", random_start=False)
    loader = D.make_loader(dataset, tc.batch_size, shuffle=False, num_workers=tc.num_workers,
                           distributed=False, drop_last=False, infinite=False)
    planes, labels, n_frames = [[], [], []], [], []
    for batch in tqdm(loader, desc=f"encoding {len(dataset)} clips"):
        video = D.from_uint8(batch["video"].to(device))
        with autocast(device):
            triplane = model.encode(video, batch["n_frames"].to(device))
        for store, z in zip(planes, triplane):
            store.append(z.float().cpu())
        labels.append(batch["label"])
        n_frames.append(batch["n_frames"])
    D.save_tokens(tc.encode, tuple(torch.cat(p) for p in planes), torch.cat(labels), dataset.class_names,
                  torch.cat(n_frames), tokenizer_ckpt=os.path.abspath(ckpt_path), tokenizer_config=asdict(cfg))
    print(f"wrote {tc.encode}: {len(dataset)} clips x {model.num_tokens()} tokens of {cfg.triplane_c} channels")


def main(argv=None):
    cfg, tc = parse_config((CoordTokConfig, TrainConfig), PRESETS, argv, description=__doc__.split("\n\n")[0])
    try:
        if tc.encode:
            encode_dataset(tc)
        else:
            train(cfg, tc)
    except (ValueError, FileNotFoundError, WeightsUnavailable) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
