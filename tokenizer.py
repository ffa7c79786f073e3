"""
CoordTok: a video tokenizer that encodes a clip into a factorized triplane and learns to
reconstruct the patches at (t, y, x) coordinates sampled at random, so the cost of training
does not grow with the length of the clip. The presets small, base and large are the authors'
models, layer for layer; CoordTok.from_official loads their released weights.

  python tokenizer.py                                    # tiny model on the synthetic set, CPU, minutes
  torchrun --nproc_per_node=8 tokenizer.py --preset large --data DIR
  python tokenizer.py --stage 2 --init_from out/tokenizer.pt --out_dir out/stage2 --data DIR
  python tokenizer.py --resume --out_dir out/stage2 --max_iters 60000   # continue a run, flags from its checkpoint
  python tokenizer.py --encode out/tokens.pt            # the triplane of every clip, for dit.py
  torchrun --nproc_per_node=8 tokenizer.py --encode out/tokens.pt --init_from CoordTok_UCF101_1M_50K.pth --data DIR

The file reads top to bottom: configuration and presets, the model (encoder, triplane lookup,
decoder) and the conversion of the authors' weights, the LPIPS loss of stage 2, the training
plumbing shared with dit.py (processes, optimizer step, flags, checkpoints and their safety),
then the training loop and the encode command.
"""

import argparse
import dataclasses
import math
import os
import re
import socket
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from tqdm import tqdm

import data as D

# -----------------------------------------------------------------------------
# configuration


@dataclass
class CoordTokConfig:
    # the clip
    num_frames: int = 32
    img_size: int = 32
    # encoder: 3D patches of the clip -> ViT (with a CLS token) -> learned triplane queries cross-attend to it
    enc_patch_t: int = 4
    enc_patch_s: int = 8
    enc_width: int = 192
    enc_heads: int = 4
    enc_layers: int = 2          # ViT blocks over the video tokens (the authors' enc_patch_num_layers)
    query_layers: int = 2        # (cross-attn, self-attn, MLP) blocks over the queries (the authors' enc_num_layers)
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
    decode_chunk: int = 16       # temporal patches decoded together by decode_frames / decode_video
    mlp_ratio: float = 4.0
    block_eps: float = 1e-6      # LayerNorm eps of the ViT and decoder blocks (timm 1.0's Block; 1e-5 in older timm)
    # departures from the paper, off in its presets (README, "Departures from the paper")
    pooled_queries: bool = False  # start each query from the video tokens pooled over its plane's missing axis


def _paper(**kw):
    """The paper's clip, triplane and decoder patch (DESIGN.md), with the sizes in kw."""
    base = dict(num_frames=128, img_size=128, enc_patch_t=8, enc_patch_s=16,
                triplane_rs=16, triplane_rt=32, triplane_c=8, query_patch_s=8, query_patch_t=16,
                dec_patch_t=1, dec_patch_s=8, decode_chunk=4)
    return CoordTokConfig(**{**base, **kw})


PRESETS = {
    # sized for a 2-core CPU: 32 frames of 32x32 (the whole synthetic video), 320 tokens of 16 channels
    "tiny": CoordTokConfig(pooled_queries=True),
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
    encode_stride: int = 0       # --encode: a clip every this many frames (0: the clip length, back to back)
    split_file: str = ""         # a list of videos (UCF-101's trainlist01.txt / testlist01.txt) that sets the split
    max_iters: int = 3500
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
    flip: bool = True            # mirror half the training clips left-right (a departure: the paper does not)
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
    positive = ("num_frames", "img_size", "enc_patch_t", "enc_patch_s", "enc_width", "enc_heads", "triplane_rs",
                "triplane_rt", "triplane_c", "query_patch_s", "query_patch_t", "dec_width", "dec_heads",
                "dec_patch_t", "dec_patch_s", "decode_chunk")
    problems += [f"--{name} must be >= 1, got {getattr(cfg, name)}" for name in positive if getattr(cfg, name) < 1]
    problems += [f"--{name} must be >= 0, got {getattr(cfg, name)}"
                 for name in ("enc_layers", "query_layers", "dec_layers") if getattr(cfg, name) < 0]
    if cfg.mlp_ratio <= 0 or cfg.block_eps <= 0:
        problems.append(f"--mlp_ratio and --block_eps must be > 0, got {cfg.mlp_ratio} and {cfg.block_eps}")
    if not problems:  # divisibility only means something for positive sizes
        for a, b in (("img_size", "enc_patch_s"), ("num_frames", "enc_patch_t"), ("img_size", "dec_patch_s"),
                     ("num_frames", "dec_patch_t"), ("triplane_rs", "query_patch_s"), ("triplane_rt", "query_patch_t"),
                     ("enc_width", "enc_heads"), ("dec_width", "dec_heads")):
            if getattr(cfg, a) % getattr(cfg, b):
                problems.append(f"--{a} {getattr(cfg, a)} is not divisible by --{b} {getattr(cfg, b)}")
    if train is not None and not problems:
        problems += validate_train_config(cfg, train)
    if problems:
        raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))


def validate_train_config(cfg, train):
    """The training flags' problems, as a list of messages."""
    problems = []
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
    at_least = dict(max_iters=1, batch_size=1, grad_accum=1, log_interval=1, ckpt_interval=1, eval_interval=1,
                    max_bad_steps=1, num_workers=0, eval_clips=0, warmup_iters=0)
    problems += [f"--{name} must be >= {low}, got {getattr(train, name)}" for name, low in at_least.items()
                 if getattr(train, name) < low]
    if not 0 <= train.val_fraction < 1:
        problems.append(f"--val_fraction must be in [0, 1), got {train.val_fraction}")
    return problems


# -----------------------------------------------------------------------------
# the model
#
# The layers follow the authors' code (github.com/huiwon-jang/CoordTok, models/coordtok/) so that their
# weights load: the ViT and decoder blocks are timm's `Block`, the query blocks torch's MultiheadAttention
# without biases. `CoordTok.from_official` maps their parameter names onto ours.


class Attention(nn.Module):
    """Multi-head attention with one packed q, k, v projection (timm's `qkv`, torch's `in_proj_weight`).

    Self-attention, or cross-attention when a context is given: queries from x, keys and values from the
    context, through the same packed weight (as torch's MultiheadAttention does when the widths agree).
    """

    def __init__(self, dim, heads, qkv_bias=True, proj_bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x, context=None, mask=None):  # x (B, N, D), context (B, M, D), mask (B, 1, 1, M) bool: attend
        if context is None:
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        else:
            dim = x.shape[-1]
            w_q, w_kv = self.qkv.weight.split([dim, 2 * dim])
            b_q, b_kv = self.qkv.bias.split([dim, 2 * dim]) if self.qkv.bias is not None else (None, None)
            q = rearrange(F.linear(x, w_q, b_q), "b n (h d) -> b h n d", h=self.heads)
            k, v = rearrange(F.linear(context, w_kv, b_kv), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, dim, ratio, approximate="none"):  # approximate="tanh": SiT's GELU
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-norm transformer block, timm's `Block`: self-attention, then MLP."""

    def __init__(self, dim, heads, mlp_ratio, qkv_bias, eps):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, heads, qkv_bias=qkv_bias)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), MLP(dim, mlp_ratio)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class QueryBlock(nn.Module):
    """Triplane queries read the video (cross-attention; the video tokens are not normalised here), talk
    to each other (self-attention), then an MLP. No attention biases, LayerNorm eps 1e-6, as the authors'."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        unbiased = dict(qkv_bias=False, proj_bias=False)
        self.norm1, self.cross_attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads, **unbiased)
        self.norm2, self.self_attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads, **unbiased)
        self.norm3, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, mlp_ratio)
        for attn in (self.cross_attn, self.self_attn):  # torch's MultiheadAttention initialises its in_proj so
            nn.init.xavier_uniform_(attn.qkv.weight)

    def forward(self, q, video, mask=None):
        q = q + self.cross_attn(self.norm1(q), video, mask=mask)
        q = q + self.self_attn(self.norm2(q))
        return q + self.mlp(self.norm3(q))


def lookup_triplane(triplane, coords, grid_size):
    """Bilinear lookup of each (t, y, x) patch coordinate in the three planes.

    The patch index is normalised to [0, 1] by (grid_size - 1): the first and last patch sit on the
    planes' corner texels (align_corners=True), whatever the two resolutions are. Always in fp32, also
    under bf16 autocast: on a 32-texel axis bf16 coordinates would be off by up to 0.06 texel.
    Returns the three C-vectors concatenated (xy, xt, yt): (B, N, 3C).
    """
    z_xy, z_xt, z_yt = (z.float() for z in triplane)             # (B, C, Rs, Rs), (B, C, Rt, Rs) x2
    scale = coords.new_tensor([max(g - 1, 1) for g in grid_size], dtype=torch.float32)
    t, y, x = (coords.float() / scale * 2 - 1).unbind(-1)        # each (B, N) in [-1, 1]

    def sample(plane, col, row):  # grid_sample reads (x=column, y=row) pairs
        grid = torch.stack([col, row], dim=-1).unsqueeze(1)       # (B, 1, N, 2)
        out = F.grid_sample(plane, grid, mode="bilinear", align_corners=True)  # (B, C, 1, N)
        return rearrange(out, "b c 1 n -> b n c")

    with torch.autocast(coords.device.type, enabled=False):
        return torch.cat([sample(z_xy, x, y), sample(z_xt, x, t), sample(z_yt, y, t)], dim=-1)


class CoordTok(nn.Module):
    def __init__(self, config: CoordTokConfig):
        super().__init__()
        validate_config(config)
        self.config = cfg = config
        W, C = cfg.enc_width, cfg.triplane_c
        # encoder: 3D patches of the clip -> tokens ordered (t, row, col) -> a ViT with a CLS token
        self.enc_grid = (cfg.num_frames // cfg.enc_patch_t, cfg.img_size // cfg.enc_patch_s,
                         cfg.img_size // cfg.enc_patch_s)
        n_video = math.prod(self.enc_grid)
        patch = (cfg.enc_patch_t, cfg.enc_patch_s, cfg.enc_patch_s)
        self.patch_embed = nn.Conv3d(3, W, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, W))
        self.enc_pos = nn.Parameter(torch.randn(1, n_video, W))
        self.enc_blocks = nn.ModuleList(Block(W, cfg.enc_heads, cfg.mlp_ratio, qkv_bias=False, eps=cfg.block_eps)
                                        for _ in range(cfg.enc_layers))
        self.ln_enc = nn.LayerNorm(W)
        self.cross_pos = nn.Parameter(torch.randn(1, n_video, W))  # the video tokens' positions for the queries
        # the learnable triplane; each plane cut into patches and embedded by a conv gives the query tokens
        self.plane_xy = nn.Parameter(torch.randn(1, C, cfg.triplane_rs, cfg.triplane_rs))
        self.plane_xt = nn.Parameter(torch.randn(1, C, cfg.triplane_rt, cfg.triplane_rs))
        self.plane_yt = nn.Parameter(torch.randn(1, C, cfg.triplane_rt, cfg.triplane_rs))
        patch_xy, patch_time = (cfg.query_patch_s, cfg.query_patch_s), (cfg.query_patch_t, cfg.query_patch_s)
        self.query_embed_xy = nn.Conv2d(C, W, kernel_size=patch_xy, stride=patch_xy)
        self.query_embed_xt = nn.Conv2d(C, W, kernel_size=patch_time, stride=patch_time)
        self.query_embed_yt = nn.Conv2d(C, W, kernel_size=patch_time, stride=patch_time)
        self.query_blocks = nn.ModuleList(QueryBlock(W, cfg.enc_heads, cfg.mlp_ratio) for _ in range(cfg.query_layers))
        self.ln_query = nn.LayerNorm(W, eps=1e-6)
        # queries -> their patches of the triplane, one projection per plane
        self.to_xy = nn.Linear(W, cfg.query_patch_s ** 2 * C)
        self.to_xt = nn.Linear(W, cfg.query_patch_t * cfg.query_patch_s * C)
        self.to_yt = nn.Linear(W, cfg.query_patch_t * cfg.query_patch_s * C)
        # decoder: triplane features + the learned position of the coordinate -> ViT -> patch pixels
        gt, gh, gw = self.grid_size
        Wd = cfg.dec_width
        self.dec_embed = nn.Linear(3 * C, Wd)
        self.dec_pos = nn.Parameter(Wd ** -0.5 * torch.randn(gt, gh, gw, Wd))  # a row per patch (33.5M at `large`)
        self.dec_blocks = nn.ModuleList(Block(Wd, cfg.dec_heads, cfg.mlp_ratio, qkv_bias=True, eps=cfg.block_eps)
                                        for _ in range(cfg.dec_layers))
        self.ln_dec = nn.LayerNorm(Wd)
        self.to_pixels = nn.Linear(Wd, math.prod(self.patch_size) * 3)

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

    def real_video_tokens(self, n_frames):
        """(B, Nv) bool: the encoder tokens that hold a real frame. n_frames (B,) real frames per clip; a
        temporal patch counts as real when its first frame is, so a clip shorter than one patch keeps one."""
        et, eh, ew = self.enc_grid
        first_frame = torch.arange(et, device=n_frames.device) * self.config.enc_patch_t      # (et,)
        return repeat(first_frame[None] < n_frames[:, None], "b t -> b (t hw)", hw=eh * ew)

    def encode(self, video, n_frames=None):
        """video (B, T, H, W, 3) in [-1, 1] -> triplane (z_xy, z_xt, z_yt), (B, C, Rs, Rs), (B, C, Rt, Rs) x2.

        n_frames (B,) marks padded clips: padded frames are zeroed and the tokens made only of padding are
        masked out of every attention (the ViT's and the queries'), so padding never changes the code.
        """
        cfg, B = self.config, video.shape[0]
        real, vit_mask, cross_mask = None, None, None
        if n_frames is not None:
            frame_is_real = torch.arange(video.shape[1], device=video.device)[None] < n_frames[:, None]  # (B, T)
            video = video * frame_is_real[:, :, None, None, None].to(video.dtype)
            real = self.real_video_tokens(n_frames)                                                # (B, Nv)
            cross_mask = real[:, None, None, :]                                                    # (B, 1, 1, Nv)
            vit_mask = F.pad(real, (1, 0), value=True)[:, None, None, :]                         # CLS is real
        x = self.patch_embed(rearrange(video, "b t h w c -> b c t h w"))                          # (B, W, et, eh, ew)
        x = rearrange(x, "b w t h s -> b (t h s) w") + self.enc_pos                               # (B, Nv, W)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)                  # (B, 1 + Nv, W)
        for block in self.enc_blocks:
            x = block(x, mask=vit_mask)
        video_tokens = self.ln_enc(x[:, 1:]) + self.cross_pos                                     # (B, Nv, W)
        q = self.initial_queries().expand(B, -1, -1)                                              # (B, Nq, W)
        if cfg.pooled_queries:
            q = q + self.pooled_queries(video_tokens, real)
        for block in self.query_blocks:
            q = block(q, video_tokens, mask=cross_mask)
        q = self.ln_query(q)
        q_xy, q_xt, q_yt = q.split(self.query_counts, dim=1)
        rs_q, (qs, qt) = cfg.triplane_rs // cfg.query_patch_s, (cfg.query_patch_s, cfg.query_patch_t)
        z_xy = rearrange(self.to_xy(q_xy), "b (h w) (ph pw c) -> b c (h ph) (w pw)", w=rs_q, ph=qs, pw=qs)
        z_xt = rearrange(self.to_xt(q_xt), "b (t s) (pt ps c) -> b c (t pt) (s ps)", s=rs_q, pt=qt, ps=qs)
        z_yt = rearrange(self.to_yt(q_yt), "b (t s) (pt ps c) -> b c (t pt) (s ps)", s=rs_q, pt=qt, ps=qs)
        return z_xy, z_xt, z_yt

    @property
    def query_counts(self):  # query tokens per plane: xy, xt, yt
        c = self.config
        n_s, n_t = c.triplane_rs // c.query_patch_s, c.triplane_rt // c.query_patch_t
        return [n_s * n_s, n_t * n_s, n_t * n_s]

    def initial_queries(self):
        """The learned planes, each cut into patches and embedded: (1, Nq, W), planes in the order xy, xt, yt."""
        planes = ((self.query_embed_xy, self.plane_xy), (self.query_embed_xt, self.plane_xt),
                  (self.query_embed_yt, self.plane_yt))
        return torch.cat([rearrange(embed(plane), "1 w h s -> 1 (h s) w") for embed, plane in planes], dim=1)

    def pooled_queries(self, video_tokens, real=None):
        """The video tokens averaged along each plane's missing axis, one vector per query token (B, Nq, W).

        Added to the learned queries, this starts every query from the content of its own region of the
        clip instead of from a vector that knows nothing of the clip.
        """
        cfg, (et, eh, ew) = self.config, self.enc_grid
        rs_q, rt_q = cfg.triplane_rs // cfg.query_patch_s, cfg.triplane_rt // cfg.query_patch_t
        x = rearrange(video_tokens, "b (t h w) c -> b c t h w", t=et, h=eh, w=ew)
        weight = torch.ones(1, 1, et, 1, 1, device=x.device, dtype=x.dtype)
        if real is not None:  # average over real time steps only
            weight = rearrange(real.to(x.dtype), "b (t h w) -> b 1 t h w", t=et, h=eh, w=ew)[..., :1, :1]
        xy = (x * weight).sum(2) / weight.sum(2)                        # (B, C, eh, ew)
        xt, yt = x.mean(3), x.mean(4)                                   # (B, C, et, ew), (B, C, et, eh)
        pooled = [F.adaptive_avg_pool2d(xy, rs_q), F.adaptive_avg_pool2d(xt, (rt_q, rs_q)),
                  F.adaptive_avg_pool2d(yt, (rt_q, rs_q))]
        return torch.cat([rearrange(p, "b c h w -> b (h w) c") for p in pooled], dim=1)

    def decode(self, triplane, coords):
        """coords (B, N, 3) integer (t, y, x) patch indices -> patch pixels (B, N, pt*ph*pw*3), in (pt, row,
        col, rgb) order. The coordinates of one clip attend to each other, so decode them together."""
        t, y, x = coords.unbind(-1)
        x = self.dec_embed(lookup_triplane(triplane, coords, self.grid_size)) + self.dec_pos[t, y, x]  # (B, N, Wd)
        for block in self.dec_blocks:
            x = block(x)                                                # (B, N, Wd)
        return self.to_pixels(self.ln_dec(x))

    @torch.no_grad()
    def decode_frames(self, triplane, frames, chunk=None):
        """Decode only the given frames: random access, which a coordinate decoder has and a grid decoder
        lacks. frames: frame indices (any order); returns (B, len(frames), H, W, 3).

        The temporal patches that hold them are decoded, `chunk` (default decode_chunk) temporal patches
        per call: each call is one attention over those patches' coordinates."""
        frames = torch.as_tensor(frames, device=triplane[0].device).long().flatten()
        (_, gh, gw), pt, B = self.grid_size, self.config.dec_patch_t, triplane[0].shape[0]
        slots = torch.unique(frames // pt)                              # temporal patches needed, sorted
        chunk = chunk or self.config.decode_chunk
        frame_grid = D.full_grid((1, gh, gw), device=frames.device)     # (gh*gw, 3), t = 0
        patches = []
        for start in range(0, len(slots), chunk):
            chosen = slots[start:start + chunk]                         # (K,)
            coords = frame_grid[None] + F.pad(chosen[:, None, None], (0, 2))  # (K, gh*gw, 3)
            patches.append(self.decode(triplane, rearrange(coords, "k p d -> 1 (k p) d").expand(B, -1, -1)))
        patches = rearrange(torch.cat(patches, dim=1), "b (k h w) d -> b k h w d", h=gh, w=gw)
        video = D.unpatchify(patches.float(), self.patch_size)          # (B, K*pt, H, W, 3)
        position = torch.searchsorted(slots, frames // pt) * pt + frames % pt
        return video[:, position]

    def decode_video(self, triplane):
        """Every frame of the clip: (B, T, H, W, 3)."""
        return self.decode_frames(triplane, range(self.config.num_frames))

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

        n_video, n_query = math.prod(self.enc_grid), sum(self.query_counts)
        embed = 2 * n_video * 3 * cfg.enc_patch_t * cfg.enc_patch_s ** 2 * cfg.enc_width
        head = 2 * num_decoded * cfg.dec_width * self.to_pixels.out_features
        return (embed + blocks(n_video + 1, cfg.enc_width, cfg.enc_layers)
                + blocks(n_query, cfg.enc_width, cfg.query_layers, context=n_video)
                + blocks(num_decoded, cfg.dec_width, cfg.dec_layers) + head)

    @classmethod
    def from_official(cls, path_or_state_dict, official_kwargs=None):
        """Our CoordTok carrying the authors' weights (github.com/huiwon-jang/CoordTok), the way nanoGPT's
        GPT.from_pretrained carries GPT-2's: build the same architecture, rename and reshape their tensors.

        path_or_state_dict: their released `CoordTok_UCF101_1M_50K.pth`, or a state dict of their CoordTok
        (bare or under a "model" key, with or without DDP's "module." prefix). official_kwargs: the keyword
        arguments their `CoordTok(...)` was built with; missing ones are the paper's (OFFICIAL_PAPER_KWARGS).
        """
        state = official_state_dict(path_or_state_dict, "encoder.encoder.patch_embed.proj.weight", "tokenizer")
        model = cls(config_from_official(official_kwargs))
        ours = {}
        for name, tensor in state.items():
            new_name = name
            for pattern, replacement in OFFICIAL_TOKENIZER_NAMES:
                new_name = re.sub(pattern, replacement, new_name)
            if new_name.startswith("plane_"):                          # (1, R, R', C) -> (1, C, R, R')
                tensor = rearrange(tensor, "1 h w c -> 1 c h w")
            elif new_name == "dec_pos":                                 # (1, gt, gh, gw, D) -> (gt, gh, gw, D)
                tensor = tensor[0]
            ours[new_name] = tensor
        load_official(model, ours, "tokenizer", official_kwargs)
        return model


# The authors' constructor arguments for the paper's CoordTok (their own defaults differ from the paper's).
OFFICIAL_PAPER_KWARGS = dict(
    video_shape=(128, 128, 128), enc_embed_dim=1024, enc_num_layers=24, enc_num_heads=16, enc_patch_size_xy=16,
    enc_patch_size_t=8, enc_patch_type="transformer", enc_patch_num_layers=8, latent_resolution_xy=16,
    latent_resolution_t=32, latent_n_features=8, latent_patch_size_xy=8, latent_patch_size_t=16,
    dec_embed_dim=1024, dec_num_layers=24, dec_num_heads=16, dec_patch_size_xy=8, dec_patch_size_t=1,
    lpips_loss_scale=0.0)

# Their parameter names -> ours. Their planes are (xy, yt, xt), their "x" the row axis: their `yt` plane
# is indexed by (t, column), which is our z_xt, and their `xt` (t, row) is our z_yt.
OFFICIAL_TOKENIZER_NAMES = [
    (r"^encoder\.encoder\.patch_embed\.proj\.", "patch_embed."),
    (r"^encoder\.encoder\.cls_token$", "cls_token"),
    (r"^encoder\.encoder\.pos_emb$", "enc_pos"),
    (r"^encoder\.encoder\.layers\.", "enc_blocks."),
    (r"^encoder\.encoder\.norm\.", "ln_enc."),
    (r"^encoder\.cross_pos_emb$", "cross_pos"),
    (r"^weight_tokens_xy$", "plane_xy"), (r"^weight_tokens_yt$", "plane_xt"), (r"^weight_tokens_xt$", "plane_yt"),
    (r"^encoder\.patch_embeds_xy\.proj\.", "query_embed_xy."),
    (r"^encoder\.patch_embeds_yt\.proj\.", "query_embed_xt."),
    (r"^encoder\.patch_embeds_xt\.proj\.", "query_embed_yt."),
    (r"^encoder\.transformer\.layers\.", "query_blocks."),
    (r"^encoder\.transformer\.norm\.", "ln_query."),
    (r"^encoder\.projectors_xy\.", "to_xy."), (r"^encoder\.projectors_yt\.", "to_xt."),
    (r"^encoder\.projectors_xt\.", "to_yt."),
    (r"^decoder\.transformer\.pos_embed$", "dec_pos"),
    (r"^decoder\.transformer\.patch_embed\.", "dec_embed."),
    (r"^decoder\.transformer\.layers\.", "dec_blocks."),
    (r"^decoder\.transformer\.norm\.", "ln_dec."),
    (r"^decoder\.projector\.", "to_pixels."),
    # inside the query blocks: torch's MultiheadAttention and an nn.Sequential MLP
    (r"_attn\.in_proj_weight$", "_attn.qkv.weight"), (r"_attn\.out_proj\.", "_attn.proj."),
    (r"\.mlp\.0\.", ".mlp.fc1."), (r"\.mlp\.3\.", ".mlp.fc2."),
]


def config_from_official(official_kwargs=None):
    """Our CoordTokConfig for the authors' CoordTok(**official_kwargs); missing arguments are the paper's."""
    unknown = set(official_kwargs or {}) - set(OFFICIAL_PAPER_KWARGS)
    if unknown:
        raise ValueError(f"unknown official CoordTok arguments {sorted(unknown)}; "
                         f"they are {', '.join(OFFICIAL_PAPER_KWARGS)}")
    k = {**OFFICIAL_PAPER_KWARGS, **(official_kwargs or {})}
    frames, height, width = k["video_shape"]
    if height != width or k["enc_patch_type"] != "transformer":
        raise ValueError(f"only square frames and enc_patch_type 'transformer' exist in the authors' code, got "
                         f"video_shape {k['video_shape']} and {k['enc_patch_type']!r}")
    patches_per_frame = (height // k["dec_patch_size_xy"]) ** 2
    return CoordTokConfig(
        num_frames=frames, img_size=height, enc_patch_t=k["enc_patch_size_t"], enc_patch_s=k["enc_patch_size_xy"],
        enc_width=k["enc_embed_dim"], enc_heads=k["enc_num_heads"], enc_layers=k["enc_patch_num_layers"],
        query_layers=k["enc_num_layers"], triplane_rs=k["latent_resolution_xy"], triplane_rt=k["latent_resolution_t"],
        triplane_c=k["latent_n_features"], query_patch_s=k["latent_patch_size_xy"],
        query_patch_t=k["latent_patch_size_t"], dec_width=k["dec_embed_dim"], dec_heads=k["dec_num_heads"],
        dec_layers=k["dec_num_layers"], dec_patch_t=k["dec_patch_size_t"], dec_patch_s=k["dec_patch_size_xy"],
        decode_chunk=max(1, 1024 // patches_per_frame))  # their evaluation decodes 1024 patches per call


def official_state_dict(path_or_state_dict, marker_key, what, prefer=("model",)):
    """The authors' state dict from a file or dict: bare, or under one of the keys in `prefer`; DDP's
    "module." prefix removed. Anything without marker_key is refused with what was found instead."""
    source = path_or_state_dict
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"official {what} file {source} does not exist")
        source = read_torch_file(source)
    state = source
    for key in prefer:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if isinstance(state, dict):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if not isinstance(state, dict) or marker_key not in state:
        found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        name = path_or_state_dict if isinstance(path_or_state_dict, (str, os.PathLike)) else "the state dict"
        raise ValueError(f"{name} is not the authors' {what}: expected a state dict with {marker_key!r} (bare, or "
                         f"under {' or '.join(map(repr, prefer))}), found {found}")
    return state


def load_official(model, state, what, official_kwargs):
    """load_state_dict, with a message that says which of the authors' arguments to pass when shapes differ."""
    missing = sorted(set(model.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    wrong = [f"{k} {tuple(v.shape)} vs ours {tuple(model.state_dict()[k].shape)}" for k, v in state.items()
             if k in model.state_dict() and v.shape != model.state_dict()[k].shape]
    if missing or unexpected or wrong:
        given = "the paper's configuration" if not official_kwargs else f"official_kwargs {official_kwargs}"
        raise ValueError(f"the official {what} weights do not fit {given}: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, other shapes {wrong[:4]}; pass the arguments it was built with as "
                         f"official_kwargs")
    model.load_state_dict(state)


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
        expected = self.state_dict()
        for given, prefix, name in ((vgg, "features.", "torchvision's vgg16 weights (--lpips_vgg)"),
                                    (lin_state, "lin", "the LPIPS v0.1 vgg.pth (--lpips_lin)")):
            keys = [k for k in expected if k.startswith(prefix)]
            wrong = [k for k in keys if k not in given or given[k].shape != expected[k].shape]
            if wrong:
                raise WeightsUnavailable(f"the file given as {name} does not have its layout: {wrong[0]} is missing "
                                         f"or of another shape ({len(wrong)} of {len(keys)} tensors)")
        self.load_state_dict({**vgg, **{k: lin_state[k] for k in expected if k.startswith("lin")},
                              "shift": self.shift, "scale": self.scale})
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
# training plumbing, shared with dit.py
#
# Devices and processes, the learning rate, the optimizer and its guarded step, flags and resumed configs,
# checkpoints and the safety of the files they go to. Nothing here is specific to CoordTok: it lives in the
# first stage's file because dit.py runs the same loop over other data and imports it from here (one home,
# not two copies). The tokenizer's own loop follows in the next section.


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
    if flag != "cpu" and not (flag == "cuda" or (flag.startswith("cuda:") and flag[5:].isdigit())):
        raise ValueError(f"--device {flag!r} is not one of auto, cpu, cuda, cuda:N")
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
    """AdamW (fused on CUDA). One rule for weight decay: the weights of linear and convolution layers decay;
    nothing else does (biases, norms, position tables, learned planes and tokens, class embeddings)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device.type == "cuda")


def optimizer_step(model, optimizer, grad_clip, step, bad_steps, max_bad_steps, ckpt_path):
    """The end of every training step, in both loops: clip the gradient norm to grad_clip (when > 0), then
    step, or skip the step when the gradient is not finite (the norm is the same on every rank after the
    all-reduce, so all ranks skip together; reading it is the one sync per step).

    Returns how many steps in a row have now been skipped; raises with advice after max_bad_steps."""
    grads = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(grads, grad_clip if grad_clip > 0 else math.inf)
    if torch.isfinite(grad_norm):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return 0
    optimizer.zero_grad(set_to_none=True)
    bad_steps += 1
    warnings.warn(f"step {step}: non-finite loss or gradient, step skipped ({bad_steps} in a row)")
    if bad_steps >= max_bad_steps:
        last = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint was saved"
        raise RuntimeError(f"{bad_steps} non-finite steps in a row; lower --learning_rate or check the data ({last})")
    return bad_steps


def mfu_text(bar, start_step, flops_per_step, peak_flops):
    """Model FLOPs utilisation since the loop started (nanoGPT's estimate): one device's model FLOPs per step
    divided by the mean step time from the tqdm bar, as a fraction of that device's peak."""
    seconds_per_step = bar.format_dict["elapsed"] / max(bar.n - start_step, 1)
    return f"{flops_per_step / seconds_per_step / peak_flops:.1%}"


def time_is_up(tc, step, t_start, device, ddp):
    """True once --max_time minutes (tc.max_time > 0) have passed since t_start, looked at every log_interval
    steps. Rank 0's clock decides and is broadcast, so that every rank stops at the same step."""
    if tc.max_time <= 0 or step % tc.log_interval:
        return False
    flag = torch.tensor(float(time.time() - t_start > tc.max_time * 60), device=device)
    if ddp:
        torch.distributed.broadcast(flag, 0)
    return bool(flag)


def check_out_dir(path, flag="--out_dir"):
    """Create the output folder now and check that it takes files, so that a bad folder fails at start,
    not at the first save after hours of work."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: cannot write into {path!r} ({e.strerror or e}); pass a writable folder") from None


@contextmanager
def run_lock(ckpt_path, resume):
    """Hold ckpt_path for this run: a fresh run never replaces a trained checkpoint, and two runs never write
    to the same one. The lock file (ckpt_path + ".lock") names the process; a lock left by a dead process
    is taken over."""
    if not resume and os.path.exists(ckpt_path):
        raise ValueError(f"{ckpt_path} already holds a trained checkpoint; continue it with --resume, or start "
                         f"a new run with another --out_dir (or delete the file)")
    lock, me = ckpt_path + ".lock", f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid, _, host = open(lock).read().partition(" ")
            if host != socket.gethostname() or _process_alive(int(pid or 0)):
                raise ValueError(f"another run (process {pid} on {host or '?'}) is writing {ckpt_path}; wait "
                                 f"for it or use another --out_dir (delete {lock} if no such run exists)") from None
            os.remove(lock)  # left by a run that was killed
    with os.fdopen(fd, "w") as f:
        f.write(me)
    try:
        yield
    finally:
        os.remove(lock)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return pid > 0


def read_torch_file(path, mmap=False):
    """torch.load of a checkpoint-like file, tensors only (no arbitrary pickled objects; the authors' SiT
    files hold an argparse.Namespace, which is allowed), or a clear error. mmap: read tensors lazily."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"could not read checkpoint {path} ({type(e).__name__}: {str(e)[:300]}); "
                         f"it is corrupt or not a torch file") from None


def file_kind(path):
    """The "kind" of the torch file at path, "official" for a state dict of the authors', or a description."""
    try:
        content = read_torch_file(path, mmap=True)
    except ValueError:
        return "non-torch"
    if isinstance(content, dict):
        return content.get("kind") or "official"
    return type(content).__name__


def load_checkpoint(path, kind):
    ckpt = read_torch_file(path)
    found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != kind:
        raise ValueError(f"{path} is a {found!r} file, not a {kind!r} checkpoint")
    return ckpt


def load_model_file(path, kind, model_class, build, what):
    """A model and its checkpoint dict, from a checkpoint of ours of that kind (build(ckpt) makes the model)
    or from the authors' released weights (model_class.from_official; the dict then says kind "official")."""
    ckpt = read_torch_file(path)
    if isinstance(ckpt, dict) and ckpt.get("kind") is None:
        try:
            model = model_class.from_official(ckpt)
        except ValueError:
            raise ValueError(f"{path} is neither a {what} checkpoint of ours nor the authors' released {what} "
                             f"(keys: {sorted(ckpt)[:6]})") from None
        return model, {"kind": "official", "model_config": asdict(model.config), "source": os.path.abspath(path)}
    ckpt = load_checkpoint(path, kind)
    return build(ckpt), ckpt


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_config(config_classes, presets, argv=None, description="", default_preset="tiny"):
    """Every field of every dataclass becomes a flag; `--preset NAME` picks the first class's base."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=default_preset)
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in presets:
        raise SystemExit(f"unknown --preset {preset!r}; choose one of {', '.join(presets)}")
    parser = argparse.ArgumentParser(description=description, parents=[pre], allow_abbrev=False)
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


def explicit_flags(argv=None):
    """The flags written on the command line (argv, default sys.argv[1:]), by name without the dashes."""
    return {a[2:].split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}


def resumed_config(saved, given, explicit, keep=()):
    """The config a resumed run continues with: the checkpoint's values (saved, a dict), except the flags
    written on this command line (explicit) and the fields in keep, which come from `given`. Returns the
    config and the overrides, as lines to print."""
    values, overrides = {}, []
    for f in dataclasses.fields(given):
        mine = getattr(given, f.name)
        if f.name in keep or f.name not in saved:
            values[f.name] = mine
        elif f.name in explicit:
            values[f.name] = mine
            if mine != saved[f.name]:
                overrides.append(f"--{f.name} {mine} (the checkpoint had {saved[f.name]})")
        else:
            values[f.name] = saved[f.name]
    return type(given)(**values), overrides


# -----------------------------------------------------------------------------
# training the tokenizer, and encoding a dataset with it


def load_tokenizer(path, device="cpu"):
    """A trained CoordTok (eval mode) and its checkpoint dict. Takes our checkpoints and the authors' released
    tokenizer (CoordTok_UCF101_1M_50K.pth, the paper's configuration); the latter's dict says kind "official"
    and carries no training metadata (data folder, split, step)."""
    def build(ckpt):
        model = CoordTok(CoordTokConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model

    model, ckpt = load_model_file(path, "coordtok_tokenizer", CoordTok, build, "tokenizer")
    return model.to(device).eval(), ckpt


def psnr_per_frame(pred, target):
    """PSNR of each frame on [0, 1] after clamping: (B, T, H, W, 3) in [-1, 1] -> (B, T)."""
    pred, target = ((v.float().clamp(-1, 1) + 1) / 2 for v in (pred, target))
    mse = (pred - target).pow(2).mean(dim=(2, 3, 4))
    return -10 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruct_clips(model, dataset, indices, device):
    """Inputs, reconstructions (B, T, H, W, 3) in [-1, 1] and real frames (B,) of dataset[indices]."""
    items = [dataset[i] for i in indices]
    video = D.from_uint8(torch.stack([it["video"] for it in items]).to(device))
    n_frames = torch.stack([it["n_frames"] for it in items]).to(device)
    with autocast(device):
        recon = model.decode_video(model.encode(video, n_frames))
    return video, recon, n_frames


def evaluate_psnr(model, val_set, num_clips, batch_size, device):
    """Mean full-clip PSNR (every patch decoded) over the first num_clips held-out clips, real frames only."""
    total, count = 0.0, 0
    for first in range(0, min(num_clips, len(val_set)), batch_size):
        video, recon, n_frames = reconstruct_clips(model, val_set, range(first, min(first + batch_size, num_clips,
                                                                                    len(val_set))), device)
        real = torch.arange(video.shape[1], device=device)[None, :] < n_frames[:, None]
        total += psnr_per_frame(recon, video)[real].sum().item()
        count += real.sum().item()
    return total / max(count, 1)


def frames_from_patches(patches, k, grid_size, patch_size):
    """Stage 2's K whole temporal patches (B, K*gh*gw, D) -> images (B*K*pt, 3, H, W) for LPIPS."""
    _, gh, gw = grid_size
    frames = D.unpatchify(rearrange(patches, "b (k h w) d -> (b k) 1 h w d", k=k, h=gh, w=gw), patch_size)
    return rearrange(frames, "n t h w c -> (n t) c h w")


def continue_run(cfg, tc, ckpt, explicit, ckpt_path):
    """The model and training configs of a resumed run: the checkpoint's, with the training flags written
    on this command line as overrides. Model flags cannot change under a trained model."""
    saved = CoordTokConfig(**ckpt["model_config"])
    changed = [f"--{name}" for name in explicit if hasattr(saved, name) and getattr(cfg, name) != getattr(saved, name)]
    if changed:
        raise ValueError(f"--resume continues {ckpt_path} with its own model, but {', '.join(changed)} differ from it; "
                         f"drop them, or start a new run with another --out_dir")
    tc, overrides = resumed_config(ckpt["train_config"], tc, explicit, keep=("resume", "out_dir", "encode"))
    return saved, tc, overrides


def train(cfg: CoordTokConfig, tc: TrainConfig, explicit=frozenset()):
    dist = setup_distributed(tc.device)
    device = dist.device
    configure_torch(device)
    ckpt_path = os.path.join(tc.out_dir, "tokenizer.pt")
    start_step, overrides, init_model = 0, [], None
    if tc.resume:
        resume_ckpt = load_checkpoint(ckpt_path, "coordtok_tokenizer")
        cfg, tc, overrides = continue_run(cfg, tc, resume_ckpt, explicit, ckpt_path)
        start_step = resume_ckpt["step"]
    elif tc.init_from:  # ours or the authors' released weights
        init_model, init_ckpt = load_tokenizer(tc.init_from)
        cfg = init_model.config
        # stage 2 goes on with the data and held-out split of the run it starts from, unless told otherwise
        inherited = {k: v for k, v in init_ckpt.get("train_config", {}).items()
                     if k in ("data", "split_file", "val_fraction") and k not in explicit}
        tc = dataclasses.replace(tc, **inherited)
    elif tc.stage == 2:
        raise ValueError("--stage 2 fine-tunes a trained tokenizer: pass --init_from PATH (its stage-1 checkpoint)")
    validate_config(cfg, tc)
    if dist.is_main:
        check_out_dir(tc.out_dir)

    # data: only rank 0 writes the synthetic set; each rank reads different clips
    data_dir = tc.data or "data/synthetic"
    if not tc.data and dist.is_main:
        D.ensure_synthetic(data_dir)
    if dist.ddp:
        torch.distributed.barrier()
    tc = dataclasses.replace(tc, data=os.path.abspath(data_dir))  # saved, so that --resume reads the same folder
    train_set, val_set = (D.VideoDataset(tc.data, cfg.img_size, cfg.num_frames, split, random_start=split == "train",
                                         val_fraction=tc.val_fraction, split_file=tc.split_file)
                          for split in ("train", "val"))
    batches = D.make_loader(train_set, tc.batch_size, shuffle=True, num_workers=tc.num_workers,
                            distributed=dist.ddp, seed=tc.seed, start_step=start_step * tc.grad_accum)

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = CoordTok(cfg).to(device)
    optimizer = make_optimizer(model, tc.learning_rate, tc.weight_decay, (tc.beta1, tc.beta2), device)
    if tc.resume:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        torch.set_rng_state(resume_ckpt["rng"]["cpu"])
    elif init_model is not None:
        model.load_state_dict(init_model.state_dict())
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
    flops_per_step = 3 * raw_model.flops_per_clip(n_decoded) * tc.batch_size * tc.grad_accum  # on one device
    if dist.is_main:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"CoordTok {n_params / 1e6:.2f}M params, {raw_model.num_tokens()} tokens per clip of "
              f"{cfg.num_frames}x{cfg.img_size}x{cfg.img_size}; {len(train_set)} training / {len(val_set)} "
              f"held-out videos from {tc.data}; stage {tc.stage} on {device} x{dist.world_size}")
        if tc.resume:
            print(f"resuming {ckpt_path} at step {start_step}" + "".join(f"\n  override: {o}" for o in overrides))

    def save(step):
        D.atomic_save({"kind": "coordtok_tokenizer", "model": raw_model.state_dict(),
                       "optimizer": optimizer.state_dict(), "model_config": asdict(cfg),
                       "train_config": asdict(tc), "step": step, "rng": {"cpu": torch.get_rng_state()},
                       "class_names": train_set.class_names, "data": tc.data}, ckpt_path)

    with run_lock(ckpt_path, tc.resume) if dist.is_main else nullcontext():
        step, bad_steps, t_start = start_step, 0, time.time()
        bar = tqdm(total=tc.max_iters, initial=step, disable=not dist.is_main, dynamic_ncols=True)
        while step < tc.max_iters:
            lr = lr_at(step, tc.learning_rate, tc.warmup_iters, decay_iters, tc.lr_schedule, tc.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # patches are drawn for the global batch, seeded by (seed, step): a resumed run draws the same,
            # and so does a run on any number of processes
            gen = torch.Generator(device).manual_seed(tc.seed * 1_000_003 + step)
            share = (dist.rank, dist.world_size)
            loss_sum = torch.zeros((), device=device)
            for micro in range(tc.grad_accum):
                batch = next(batches)
                n_frames_cpu = batch["n_frames"]
                # padding mask only when a clip is short (checked on the CPU tensor: no device sync)
                short = bool((n_frames_cpu < cfg.num_frames).any())
                video = D.from_uint8(batch["video"].to(device, non_blocking=True))  # (B, T, H, W, 3)
                if tc.flip:
                    video = D.random_flips(video, gen, share)
                n_frames = n_frames_cpu.to(device, non_blocking=True)
                if tc.stage == 1:
                    coords, targets = D.sample_patches(video, n_frames, tc.num_samples, raw_model.patch_size, gen,
                                                       share)
                else:
                    coords, targets = D.sample_frames(video, n_frames, tc.num_frames_stage2, raw_model.patch_size, gen,
                                                     share)
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
            bad_steps = optimizer_step(raw_model, optimizer, tc.grad_clip, step, bad_steps, tc.max_bad_steps, ckpt_path)
            step += 1  # a skipped step moves on too: the next one draws other clips and patches
            bar.update(1)

            if dist.is_main and (step % tc.log_interval == 0 or step == tc.max_iters):
                post = {"loss": f"{loss_sum.item():.4f}", "lr": f"{lr:.1e}"}
                if tc.stage == 1:  # [-1, 1] MSE -> [0, 1] PSNR
                    post["psnr"] = f"{-10 * math.log10(max(loss_sum.item() / 4, 1e-10)):.2f}"
                if device.type == "cuda":
                    post["mfu"] = mfu_text(bar, start_step, flops_per_step, tc.peak_flops)
                bar.set_postfix(post)
            out_of_time = time_is_up(tc, step, t_start, device, dist.ddp)
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
        if len(val_set) > 0:
            picture = os.path.join(tc.out_dir, "tokenizer.png")
            write_reconstruction_picture(raw_model.eval(), val_set, picture, device)
            print(f"wrote {picture}: held-out clips, three rows each: input, reconstruction, error x4")
    cleanup_distributed(dist)


def write_reconstruction_picture(model, dataset, path, device, num_clips=4):
    """Input, reconstruction and error of the first held-out clips (data.comparison_grid), as a PNG."""
    video, recon, n_frames = reconstruct_clips(model, dataset, range(min(num_clips, len(dataset))), device)
    real = int(n_frames.min())
    grid = D.comparison_grid(D.to_uint8(video[:, :real]).cpu(), D.to_uint8(recon[:, :real]).cpu())
    zoom = max(1, round(64 / video.shape[2]))                          # small frames enlarged to ~64 pixels
    D.write_png(path, grid.repeat(zoom, axis=0).repeat(zoom, axis=1))


def check_tokens_path(path):
    """--encode PATH may replace a tokens file, never anything else (a checkpoint, a video, ...)."""
    if os.path.exists(path):
        kind = file_kind(path) if os.path.isfile(path) else "folder"
        if kind != "coordtok_tokens":
            raise ValueError(f"--encode {path} exists and is a {kind} file, not a tokens file; writing there "
                             f"would destroy it. Pass a new path for the tokens file")
    check_out_dir(os.path.dirname(os.path.abspath(path)), "--encode")


@torch.no_grad()
def encode_dataset(tc: TrainConfig):
    """Write the tokens file (data.save_tokens): the triplane of every clip of every video, a clip of the
    model's length every --encode_stride frames (default: back to back, the last one ending at the video's
    end). Under torchrun each rank encodes every world_size-th clip and rank 0 writes the one file, the same
    as a single process writes."""
    dist = setup_distributed(tc.device)
    device = dist.device
    if dist.is_main:
        check_tokens_path(tc.encode)
    ckpt_path = tc.init_from or os.path.join(tc.out_dir, "tokenizer.pt")
    model, ckpt = load_tokenizer(ckpt_path, device)
    cfg = model.config
    data_dir = tc.data or ckpt.get("data", "")
    if not data_dir:
        raise ValueError(f"{ckpt_path} does not name the data it was trained on; pass --data DIR")
    dataset = D.VideoDataset(data_dir, cfg.img_size, cfg.num_frames, split="all", random_start=False,
                             clip_stride=tc.encode_stride or cfg.num_frames)
    mine = list(range(dist.rank, len(dataset), dist.world_size))            # this rank's clips
    loader = D.make_loader(torch.utils.data.Subset(dataset, mine), tc.batch_size, shuffle=False,
                           num_workers=tc.num_workers, distributed=False, drop_last=False, infinite=False)
    fields = ("z_xy", "z_xt", "z_yt", "label", "n_frames", "video_index", "start")
    encoded = {k: [] for k in fields}
    for batch in tqdm(loader, desc=f"encoding {len(mine)} of {len(dataset)} clips", disable=not dist.is_main):
        with autocast(device):
            triplane = model.encode(D.from_uint8(batch["video"].to(device)), batch["n_frames"].to(device))
        for name, z in zip(fields, triplane):
            encoded[name].append(z.float().cpu())
        for name in fields[3:]:
            encoded[name].append(batch[name])
    encoded = {k: torch.cat(v) if v else torch.empty(0) for k, v in encoded.items()}
    encoded["clip"] = torch.tensor(mine, dtype=torch.long)
    shares = [encoded]
    if dist.ddp:  # every rank's clips to rank 0
        shares = [None] * dist.world_size if dist.is_main else None
        torch.distributed.gather_object(encoded, shares, dst=0)
    if dist.is_main:
        merged = {k: torch.cat([s[k] for s in shares if len(s["clip"])]) for k in encoded}
        order = merged["clip"].argsort()                                     # the clips in dataset order
        merged = {k: v[order] for k, v in merged.items()}
        D.save_tokens(tc.encode, tuple(merged[k] for k in D.PLANES), merged["label"], dataset.class_names,
                      merged["n_frames"], tokenizer_ckpt=os.path.abspath(ckpt_path), tokenizer_config=asdict(cfg),
                      videos=[os.path.relpath(p, data_dir) for p, _ in dataset.files],
                      video_index=merged["video_index"], start=merged["start"])
        print(f"wrote {tc.encode}: {len(dataset)} clips of {cfg.num_frames} frames from {len(dataset.files)} videos "
              f"x {model.num_tokens()} tokens of {cfg.triplane_c} channels")
    cleanup_distributed(dist)


def main(argv=None):
    cfg, tc = parse_config((CoordTokConfig, TrainConfig), PRESETS, argv, description=__doc__.split("\n\n")[0])
    try:
        if tc.encode:
            encode_dataset(tc)
        else:
            train(cfg, tc, explicit_flags(argv))
    except (ValueError, FileNotFoundError, WeightsUnavailable) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
