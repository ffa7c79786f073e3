"""
CoordTok: a video tokenizer that encodes a clip into a factorised triplane and learns to
reconstruct the patches at (t, y, x) coordinates drawn at random, so the cost of training does not
grow with the length of the clip. Presets small, base and large are the authors' models.

  python tokenizer.py                                 # tiny model, synthetic videos, CPU, minutes
  torchrun --nproc_per_node=8 tokenizer.py --preset large --data DIR
  python tokenizer.py --stage 2 --init_from out/tokenizer.pt --out_dir out/stage2
  python tokenizer.py --resume --out_dir out/stage2   # continue a run, flags from its checkpoint
  python tokenizer.py --encode out/tokens.pt          # the triplane of every clip, for dit.py

Reading order: config, the model, the patch geometry it is trained on, the loss, the training
loop, --encode. harness.py maps the authors' weights onto the model (from_official).
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from tqdm import tqdm

import data
import harness as H
import metrics


@dataclass
class CoordTokConfig:
    """The model's shape. A field added later defaults to what older code did, so a checkpoint
    without it loads with that default; a field's bounds are in its metadata (field_problems)."""
    num_frames: int = 32
    img_size: int = 32           # frame height (and width when img_width is 0)
    img_width: int = 0           # 0: square frames
    # encoder: 3D patches -> ViT (with a CLS token) -> triplane queries cross-attend to it
    enc_patch_t: int = 4
    enc_patch_s: int = 8
    enc_width: int = 192
    enc_heads: int = 4
    enc_layers: int = field(default=1, metadata={"min": 0})    # ViT blocks over the video
    query_layers: int = field(default=1, metadata={"min": 0})  # (cross, self, MLP) blocks
    # triplane: z_xy (C, Rs, Rs'), z_xt (C, Rt, Rs'), z_yt (C, Rt, Rs); Rs' = Rs * width / height
    triplane_rs: int = 8
    triplane_rt: int = 16
    triplane_c: int = 16
    query_patch_s: int = 2       # a query token covers query_patch_s^2 texels of z_xy
    query_patch_t: int = 4       # and query_patch_t x query_patch_s of the time planes
    # decoder: self-attention over the queried coordinates, each token -> a patch of pixels
    dec_width: int = 192
    dec_heads: int = 4
    dec_layers: int = field(default=2, metadata={"min": 0})
    dec_patch_t: int = 1
    dec_patch_s: int = 4
    decode_chunk: int = 16       # temporal patches decoded per call by decode_frames
    mlp_ratio: float = 4.0
    block_eps: float = 1e-6      # LayerNorm eps of the ViT and decoder blocks (timm's Block)
    pooled_queries: bool = False  # departure: queries start from the video pooled over their axis

    @property
    def frame_size(self):  # (H, W)
        return self.img_size, self.img_width or self.img_size

    @property
    def grid_size(self):  # the decoder's patch grid (gt, gh, gw)
        return (self.num_frames // self.dec_patch_t, self.img_size // self.dec_patch_s,
                self.frame_size[1] // self.dec_patch_s)


def paper(width, heads, layers):  # the paper's clip, triplane and decoder patch; 8 ViT blocks
    return CoordTokConfig(num_frames=128, img_size=128, enc_patch_t=8, enc_patch_s=16,
                          triplane_rs=16, triplane_rt=32, triplane_c=8, query_patch_s=8,
                          query_patch_t=16, dec_patch_t=1, dec_patch_s=8, decode_chunk=4,
                          enc_width=width, enc_heads=heads, enc_layers=8, query_layers=layers,
                          dec_width=width, dec_heads=heads, dec_layers=layers)


PRESETS = {
    "tiny": CoordTokConfig(mlp_ratio=2.0, pooled_queries=True),  # 32x32x32, 320 tokens: 2 cores
    "small": paper(width=512, heads=8, layers=8),
    "base": paper(width=768, heads=12, layers=12),
    "large": paper(width=1024, heads=16, layers=24),
}

# -----------------------------------------------------------------------------
# the model


class Attention(nn.Module):
    """Multi-head attention; cross-attention when a context is given (keys and values from it)."""

    def __init__(self, dim, heads, qkv_bias=True, proj_bias=True, cross=False):
        super().__init__()
        self.heads, self.cross = heads, cross
        if cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x, context=None, mask=None):  # x (B, N, D), context (B, M, D)
        if self.cross:  # mask (B, 1, 1, M) bool: True where a key may be attended
            q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
            k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        else:
            q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3,
                                h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, dim, ratio, approximate="none"):  # "tanh": SiT's GELU
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * ratio)), nn.Linear(int(dim * ratio), dim)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, then MLP."""

    def __init__(self, dim, heads, mlp_ratio, qkv_bias, eps):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), Attention(dim, heads, qkv_bias)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), MLP(dim, mlp_ratio)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x))


class QueryBlock(nn.Module):
    """The triplane queries read the video (cross-attention; the video tokens are not normalised
    here), talk to each other (self-attention), then an MLP. No attention biases."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, heads, qkv_bias=False, proj_bias=False, cross=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = Attention(dim, heads, qkv_bias=False, proj_bias=False)
        self.norm3, self.mlp = nn.LayerNorm(dim, eps=1e-6), MLP(dim, mlp_ratio)
        bound = (6 / (4 * dim)) ** 0.5  # xavier over a packed (3 dim, dim) in_proj, as torch's MHA
        for linear in (self.cross_attn.q, self.cross_attn.kv, self.self_attn.qkv):
            nn.init.uniform_(linear.weight, -bound, bound)

    def forward(self, q, video, mask=None):
        q = q + self.cross_attn(self.norm1(q), video, mask=mask)
        q = q + self.self_attn(self.norm2(q))
        return q + self.mlp(self.norm3(q))


def lookup_triplane(triplane, coords, grid_size):
    """Bilinear lookup of each (t, y, x) patch coordinate in the three planes: (B, N, 3C). The
    patch index is normalised to [0, 1] by (grid_size - 1): the first and last patch sit on the
    planes' corner texels (align_corners), whatever the resolutions. Always fp32: under bf16,
    coordinates on a 32-texel axis would be off by up to 0.06 texel."""
    z_xy, z_xt, z_yt = (z.float() for z in triplane)       # (B, C, Rs, Rs'), (B, C, Rt, Rs'|Rs)
    scale = coords.new_tensor([max(g - 1, 1) for g in grid_size], dtype=torch.float32)
    t, y, x = (coords.float() / scale * 2 - 1).unbind(-1)  # each (B, N) in [-1, 1]

    def sample(plane, col, row):  # grid_sample reads (x = column, y = row) pairs
        grid = torch.stack([col, row], dim=-1).unsqueeze(1)                      # (B, 1, N, 2)
        out = F.grid_sample(plane, grid, mode="bilinear", align_corners=True)  # (B, C, 1, N)
        return rearrange(out, "b c 1 n -> b n c")

    with torch.autocast(coords.device.type, enabled=False):
        return torch.cat([sample(z_xy, x, y), sample(z_xt, x, t), sample(z_yt, y, t)], dim=-1)


class CoordTok(nn.Module):
    def __init__(self, config: CoordTokConfig):
        super().__init__()
        validate_config(config)
        self.config = cfg = config
        D, C, (height, width) = cfg.enc_width, cfg.triplane_c, cfg.frame_size
        # encoder: 3D patches of the clip -> tokens ordered (t, row, col) -> ViT with a CLS token
        patch = (cfg.enc_patch_t, cfg.enc_patch_s, cfg.enc_patch_s)
        self.enc_grid = tuple(n // p for n, p in zip((cfg.num_frames, height, width), patch))
        n_video = math.prod(self.enc_grid)
        self.patch_embed = nn.Conv3d(3, D, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))
        self.enc_pos = nn.Parameter(torch.randn(1, n_video, D))
        self.enc_blocks = nn.ModuleList(Block(D, cfg.enc_heads, cfg.mlp_ratio, False, cfg.block_eps)
                                        for _ in range(cfg.enc_layers))
        self.ln_enc = nn.LayerNorm(D)
        self.cross_pos = nn.Parameter(torch.randn(1, n_video, D))  # video positions for the queries
        # the learned triplane, cut into patches and embedded by a conv: the query tokens
        (_, rs, rs_w), (_, rt, _), _ = self.triplane_shapes
        self.plane_xy = nn.Parameter(torch.randn(1, C, rs, rs_w))
        self.plane_xt = nn.Parameter(torch.randn(1, C, rt, rs_w))
        self.plane_yt = nn.Parameter(torch.randn(1, C, rt, rs))
        qs, qt = cfg.query_patch_s, cfg.query_patch_t
        self.query_embed_xy = nn.Conv2d(C, D, kernel_size=(qs, qs), stride=(qs, qs))
        self.query_embed_xt = nn.Conv2d(C, D, kernel_size=(qt, qs), stride=(qt, qs))
        self.query_embed_yt = nn.Conv2d(C, D, kernel_size=(qt, qs), stride=(qt, qs))
        self.query_blocks = nn.ModuleList(QueryBlock(D, cfg.enc_heads, cfg.mlp_ratio)
                                          for _ in range(cfg.query_layers))
        self.ln_query = nn.LayerNorm(D, eps=1e-6)
        # each query token -> its patch of the triplane, one projection per plane
        self.to_xy = nn.Linear(D, qs * qs * C)
        self.to_xt, self.to_yt = nn.Linear(D, qt * qs * C), nn.Linear(D, qt * qs * C)
        # decoder: triplane features + the coordinate's learned position -> ViT -> patch pixels
        Dd = cfg.dec_width
        self.dec_embed = nn.Linear(3 * C, Dd)
        self.dec_pos = nn.Parameter(Dd ** -0.5 * torch.randn(*self.grid_size, Dd))  # a row a patch
        self.dec_blocks = nn.ModuleList(Block(Dd, cfg.dec_heads, cfg.mlp_ratio, True, cfg.block_eps)
                                        for _ in range(cfg.dec_layers))
        self.ln_dec = nn.LayerNorm(Dd)
        self.to_pixels = nn.Linear(Dd, math.prod(self.patch_size) * 3)

    @property
    def triplane_shapes(self):  # (C, Rs, Rs'), (C, Rt, Rs'), (C, Rt, Rs)
        c = self.config
        rs_w = c.triplane_rs * c.frame_size[1] // c.frame_size[0]
        return (c.triplane_c, c.triplane_rs, rs_w), (c.triplane_c, c.triplane_rt, rs_w), \
            (c.triplane_c, c.triplane_rt, c.triplane_rs)

    @property
    def patch_size(self):  # decoder patch (pt, ph, pw)
        return self.config.dec_patch_t, self.config.dec_patch_s, self.config.dec_patch_s

    @property
    def grid_size(self):  # decoder patch grid (gt, gh, gw)
        return self.config.grid_size

    def num_tokens(self):
        return sum(h * w for _, h, w in self.triplane_shapes)

    @property
    def query_grids(self):  # query tokens per plane, (rows, cols): xy, xt, yt
        qs, qt = self.config.query_patch_s, self.config.query_patch_t
        return [(h // (qs if i == 0 else qt), w // qs)
                for i, (_, h, w) in enumerate(self.triplane_shapes)]

    def encode(self, video, n_frames=None):
        """video (B, T, H, W, 3) in [-1, 1] -> the triplane (z_xy, z_xt, z_yt). n_frames (B,)
        marks padded clips: padded frames are zeroed and the tokens made only of padding are
        masked out of every attention, so padding never changes the code."""
        cfg, B = self.config, video.shape[0]
        real, vit_mask, cross_mask = None, None, None
        if n_frames is not None:
            frame_is_real = torch.arange(video.shape[1], device=video.device) < n_frames[:, None]
            video = video * frame_is_real[:, :, None, None, None].to(video.dtype)
            real = self.real_video_tokens(n_frames)                                  # (B, Nv)
            cross_mask = real[:, None, None, :]                                      # (B, 1, 1, Nv)
            vit_mask = F.pad(real, (1, 0), value=True)[:, None, None, :]            # CLS is real
        x = self.patch_embed(rearrange(video, "b t h w c -> b c t h w"))           # (B, D, t, h, w)
        x = rearrange(x, "b d t h w -> b (t h w) d") + self.enc_pos                 # (B, Nv, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)    # (B, 1+Nv, D)
        for block in self.enc_blocks:
            x = block(x, mask=vit_mask)
        video_tokens = self.ln_enc(x[:, 1:]) + self.cross_pos                       # (B, Nv, D)
        q = self.initial_queries().expand(B, -1, -1)                                # (B, Nq, D)
        if cfg.pooled_queries:
            q = q + self.pool_video_tokens(video_tokens, real)
        for block in self.query_blocks:
            q = block(q, video_tokens, mask=cross_mask)
        (_, w_xy), (_, w_xt), (_, w_yt) = self.query_grids                          # tokens a row
        q_xy, q_xt, q_yt = self.ln_query(q).split([h * w for h, w in self.query_grids], dim=1)
        qs, qt = cfg.query_patch_s, cfg.query_patch_t
        patches = "b (h w) (ph pw c) -> b c (h ph) (w pw)"                         # tokens -> plane
        z_xy = rearrange(self.to_xy(q_xy), patches, w=w_xy, ph=qs, pw=qs)          # (B, C, Rs, Rs')
        z_xt = rearrange(self.to_xt(q_xt), patches, w=w_xt, ph=qt, pw=qs)          # (B, C, Rt, Rs')
        z_yt = rearrange(self.to_yt(q_yt), patches, w=w_yt, ph=qt, pw=qs)          # (B, C, Rt, Rs)
        return z_xy, z_xt, z_yt

    def real_video_tokens(self, n_frames):
        """(B, Nv) bool: the encoder tokens that hold a real frame. A temporal patch counts as
        real when its first frame is, so a clip shorter than one patch keeps one."""
        et, eh, ew = self.enc_grid
        first_frame = torch.arange(et, device=n_frames.device) * self.config.enc_patch_t
        return repeat(first_frame < n_frames[:, None], "b t -> b (t hw)", hw=eh * ew)

    def initial_queries(self):
        """The learned planes, each cut into patches and embedded: (1, Nq, D), xy, xt, yt."""
        planes = ((self.query_embed_xy, self.plane_xy), (self.query_embed_xt, self.plane_xt),
                  (self.query_embed_yt, self.plane_yt))
        return torch.cat([rearrange(embed(p), "1 d h w -> 1 (h w) d") for embed, p in planes], 1)

    def pool_video_tokens(self, video_tokens, real=None):
        """The video tokens averaged along each plane's missing axis, a vector per query token
        (B, Nq, D): every query starts from the content of its own region of the clip."""
        (et, eh, ew), grids = self.enc_grid, self.query_grids
        x = rearrange(video_tokens, "b (t h w) d -> b d t h w", t=et, h=eh, w=ew)
        weight = torch.ones(1, 1, et, 1, 1, device=x.device, dtype=x.dtype)      # time steps
        if real is not None:  # the xy plane averages over real time steps only
            weight = reduce(real.to(x.dtype), "b (t h w) -> b 1 t 1 1", "max", t=et, h=eh, w=ew)
        xy = (x * weight).sum(2) / weight.sum(2)                                  # (B, D, eh, ew)
        pooled = [F.adaptive_avg_pool2d(plane, grid) for plane, grid in  # onto the query grids
                  zip((xy, x.mean(3), x.mean(4)), grids)]      # xt: (B, D, et, ew), yt: (.., eh)
        return torch.cat([rearrange(p, "b d h w -> b (h w) d") for p in pooled], dim=1)

    def decode(self, triplane, coords):
        """coords (B, N, 3) integer (t, y, x) patch indices -> patch pixels (B, N, pt*ph*pw*3),
        in (pt, row, col, rgb) order. The coordinates of a clip attend to each other."""
        t, y, x = coords.unbind(-1)
        features = lookup_triplane(triplane, coords, self.grid_size)               # (B, N, 3C)
        h = self.dec_embed(features) + self.dec_pos[t, y, x]                      # (B, N, Dd)
        for block in self.dec_blocks:
            h = block(h)                                                           # (B, N, Dd)
        return self.to_pixels(self.ln_dec(h))

    def forward(self, video, coords, n_frames=None):
        """Encode the clip and decode the patches at coords (B, N, 3): (B, N, pt*ph*pw*3)."""
        return self.decode(self.encode(video, n_frames), coords)

    @torch.no_grad()
    def decode_frames(self, triplane, frames, chunk=None):
        """Only the given frames (any order): random access, which a coordinate decoder has and a
        grid decoder lacks. Returns (B, len(frames), H, W, 3). The temporal patches that hold them
        are decoded `chunk` (default decode_chunk) at a time, one attention each."""
        frames = torch.as_tensor(frames, device=triplane[0].device).long().flatten()
        if len(frames) == 0 or frames.min() < 0 or frames.max() >= self.config.num_frames:
            raise ValueError(f"frames to decode must be in [0, {self.config.num_frames}).")
        (_, gh, gw), pt, B = self.grid_size, self.config.dec_patch_t, triplane[0].shape[0]
        slots = torch.unique(frames // pt)                          # temporal patches, sorted
        chunk = chunk or self.config.decode_chunk
        patches = []
        for start in range(0, len(slots), chunk):
            coords = frame_coords(slots[start:start + chunk][None], gh, gw)           # (1, K*P, 3)
            patches.append(self.decode(triplane, coords.expand(B, -1, -1)))
        patches = rearrange(torch.cat(patches, 1), "b (k h w) d -> b k h w d", h=gh, w=gw)
        video = unpatchify(patches.float(), self.patch_size)        # (B, K*pt, H, W, 3)
        return video[:, torch.searchsorted(slots, frames // pt) * pt + frames % pt]

    def decode_video(self, triplane):
        """Every frame of the clip: (B, T, H, W, 3)."""
        return self.decode_frames(triplane, range(self.config.num_frames))

    def flops_per_clip(self, num_decoded):
        """Forward FLOPs of the matmuls for one clip decoding num_decoded patches (for MFU)."""
        c, n_video = self.config, math.prod(self.enc_grid)
        n_query = sum(h * w for h, w in self.query_grids)

        def blocks(n, width, layers, m=0):  # qkv, proj, MLP; q@k, a@v; cross-attention to m
            cross = 4 * n * width ** 2 + 4 * m * width ** 2 + 4 * n * m * width if m else 0
            return layers * ((8 + 4 * c.mlp_ratio) * n * width ** 2 + 4 * n * n * width + cross)

        return (2 * n_video * self.patch_embed.weight[0].numel() * c.enc_width
                + blocks(n_video + 1, c.enc_width, c.enc_layers)
                + blocks(n_query, c.enc_width, c.query_layers, n_video)
                + blocks(num_decoded, c.dec_width, c.dec_layers)
                + 2 * num_decoded * c.dec_width * self.to_pixels.out_features)

    @classmethod
    def from_official(cls, path_or_state_dict, official_kwargs=None):
        """Our CoordTok carrying the authors' weights: their release (or its name,
        "coordtok_ucf101") or state dict; official_kwargs: their arguments (default the paper's)."""
        fields, state, hint = H.official_tokenizer(path_or_state_dict, official_kwargs)
        with torch.device("meta"):
            model = cls(CoordTokConfig(**fields))
        return H.load_state(model, state, "official tokenizer", hint)


def validate_config(cfg):
    """Fail at start, naming the flag to change, instead of deep inside a reshape."""
    positive = [f"--{n} must be > 0" for n in ("mlp_ratio", "block_eps") if getattr(cfg, n) <= 0]
    H.check_config(cfg, positive)  # first: divisibility only means something for positive sizes
    (height, width), sizes = cfg.frame_size, asdict(cfg)
    sizes["img_width"] = width
    pairs = (("img_size", "enc_patch_s"), ("img_width", "enc_patch_s"), ("num_frames",
             "enc_patch_t"), ("img_size", "dec_patch_s"), ("img_width", "dec_patch_s"),
             ("num_frames", "dec_patch_t"), ("triplane_rs", "query_patch_s"), ("triplane_rt",
             "query_patch_t"), ("enc_width", "enc_heads"), ("dec_width", "dec_heads"))
    problems = [f"--{a} {sizes[a]} is not divisible by --{b} {sizes[b]}" for a, b in pairs
                if sizes[a] % sizes[b] and (cfg.img_width or a != "img_width")]
    rs_width = cfg.triplane_rs * width / height  # the triplane's width: in proportion to the frame
    if rs_width != int(rs_width) or int(rs_width) % cfg.query_patch_s:
        problems.append(f"the triplane's width, --triplane_rs x --img_width / --img_size = "
                        f"{rs_width:g}, must be a multiple of --query_patch_s {cfg.query_patch_s}; "
                        f"change --triplane_rs or --img_width")
    H.check_config(cfg, problems)


# -----------------------------------------------------------------------------
# the patch geometry (which coordinates are decoded, their target pixels, on the device); the loss


def patchify(video, patch_size):
    """(B, T, H, W, 3) -> (B, gt, gh, gw, pt*ph*pw*3), each patch laid out as (pt ph pw c)."""
    pt, ph, pw = patch_size
    return rearrange(video, "b (t pt) (h ph) (w pw) c -> b t h w (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(patches, patch_size):
    """(B, gt, gh, gw, pt*ph*pw*3) -> (B, T, H, W, 3), the inverse of patchify."""
    pt, ph, pw = patch_size
    return rearrange(patches, "b t h w (pt ph pw c) -> b (t pt) (h ph) (w pw) c",
                     pt=pt, ph=ph, pw=pw)


def full_grid(grid_size, device=None):
    """Every (t, y, x) of a patch grid, t slowest, then y, then x: (gt*gh*gw, 3) long."""
    axes = [torch.arange(n, device=device) for n in grid_size]
    return rearrange(torch.stack(torch.meshgrid(*axes, indexing="ij")), "d t h w -> (t h w) d")


def gather_patches(video, coords, patch_size):
    """The pixels at coords: video (B, T, H, W, 3), coords (B, N, 3) -> (B, N, pt*ph*pw*3)."""
    patches = patchify(video, patch_size)                                   # (B, gt, gh, gw, D)
    _, _, gh, gw, dim = patches.shape
    flat_index = (coords[..., 0] * gh + coords[..., 1]) * gw + coords[..., 2]  # (B, N)
    patches = rearrange(patches, "b t h w d -> b (t h w) d")
    return torch.gather(patches, 1, flat_index[..., None].expand(-1, -1, dim))


def random_keys(batch, n, generator, device, share=(0, 1)):
    """Uniform keys (batch, n) for this process's rows of a global batch, share = (rank, world):
    every rank draws all rows and keeps its own, so any number of processes draws the same."""
    rank, world = share
    keys = torch.rand(batch * world, n, device=device, generator=generator)
    return keys[rank * batch:(rank + 1) * batch]


def sample_patches(video, n_frames, num_samples, patch_size, generator=None, share=(0, 1)):
    """Stage 1's targets: num_samples distinct random patches per clip, from real frames only:
    video (B, T, H, W, 3), n_frames (B,) -> coords (B, N, 3) long, targets (B, N, pt*ph*pw*3).
    Random keys, +inf on padded patches, and the N smallest: sampling without replacement,
    batched, with no loop over clips or patches. share: see random_keys."""
    gt, gh, gw = (n // p for n, p in zip(video.shape[1:4], patch_size))            # patch grid
    grid = full_grid((gt, gh, gw), video.device)                                   # (P, 3)
    keys = random_keys(video.shape[0], len(grid), generator, video.device, share)  # (B, P)
    real_t = (n_frames // patch_size[0]).clamp_min(1)[:, None]         # (B, 1) real time patches
    keys = keys.masked_fill(grid[None, :, 0] >= real_t, float("inf"))
    coords = grid[smallest(keys, num_samples, real_t * gh * gw)]       # (B, N, 3)
    return coords, gather_patches(video, coords, patch_size)


def smallest(keys, n, n_real):
    """The indices of the n smallest of each row's keys (B, P), a uniform draw without replacement
    among its n_real (B, 1) finite ones; a row with fewer repeats them instead of taking +inf."""
    chosen = keys.topk(n, dim=1, largest=False).indices                # (B, n), finite first
    slot = torch.arange(n, device=keys.device)[None]
    return chosen.gather(1, torch.where(slot < n_real, slot, slot % n_real))


def sample_frames(video, n_frames, num_frames_k, patch_size, generator=None, share=(0, 1)):
    """Stage 2's targets: every patch of K distinct random real temporal patches per clip
    ("whole frames"): coords (B, K*gh*gw, 3), targets (B, K*gh*gw, pt*ph*pw*3)."""
    gt, gh, gw = (n // p for n, p in zip(video.shape[1:4], patch_size))            # patch grid
    keys = random_keys(video.shape[0], gt, generator, video.device, share)   # (B, gt)
    real_t = (n_frames // patch_size[0]).clamp_min(1)[:, None]              # (B, 1)
    keys = keys.masked_fill(torch.arange(gt, device=video.device) >= real_t, float("inf"))
    frames = smallest(keys, num_frames_k, real_t)                           # (B, K)
    coords = frame_coords(frames, gh, gw)                                   # (B, K*gh*gw, 3)
    return coords, gather_patches(video, coords, patch_size)


def frame_coords(t, gh, gw):
    """Every patch coordinate of the temporal patches t (B, K): (B, K*gh*gw, 3), K-major."""
    grid = full_grid((1, gh, gw), t.device)                                 # (gh*gw, 3), t = 0
    coords = grid + F.pad(t[..., None, None], (0, 2))                       # (B, K, gh*gw, 3)
    return rearrange(coords, "b k p d -> b (k p) d")


def random_flips(video, generator=None, share=(0, 1)):
    """Each clip (B, T, H, W, 3) mirrored left-right with probability 1/2 (see random_keys)."""
    keys = random_keys(video.shape[0], 1, generator, video.device, share)
    return torch.where(keys[:, :, None, None, None] < 0.5, video.flip(3), video)


def reconstruction_loss(pred, target, lpips=None, lpips_weight=1.0, to_frames=None):
    """L2 between decoded and true patches (B, N, D); stage 2 adds LPIPS on the whole frames
    the patches make (to_frames: patches -> images (N, 3, H, W))."""
    loss = F.mse_loss(pred.float(), target.float())
    if lpips is not None:
        loss = loss + lpips_weight * lpips(to_frames(pred), to_frames(target)).mean()
    return loss


# -----------------------------------------------------------------------------
# training


@dataclass
class TrainConfig(H.LoopConfig):  # with LoopConfig's: schedule, AdamW, record, stopping
    data: str = ""               # folder of videos (class: the folder below it); "": synthetic
    stage: int = field(default=1, metadata={"choices": (1, 2)})  # 1: patches, L2; 2: frames, +LPIPS
    init_from: str = ""          # checkpoint whose weights start the run (stage 2)
    encode: str = ""             # write the tokens file of every window to this path and exit
    encode_stride: int = 0       # --encode: a window every this many frames (0: back to back)
    split_file: str = ""         # a list of videos (UCF-101's trainlist01.txt) that sets the split
    learning_rate: float = 2e-3
    weight_decay: float = 1e-3
    num_samples: int = 128       # stage 1: patches per clip (the paper: 1024 of 32768)
    num_frames_stage2: int = 4   # stage 2: whole temporal patches per clip
    flip: bool = True            # departure: mirror half the training clips left-right
    lpips_weight: float = 1.0    # stage 2
    lpips_vgg: str = ""          # torchvision's vgg16 weights (default: fetched to the hub cache)
    lpips_lin: str = ""          # LPIPS v0.1 vgg.pth (default: fetched to the hub cache)
    eval_interval: int = 500
    eval_clips: int = field(default=32, metadata={"min": 0})  # held-out clips per evaluation
    num_workers: int = field(default=2, metadata={"min": 0})
    val_fraction: float = field(default=0.1, metadata={"below": 1})


def validate_train_config(cfg, tc):
    gt, gh, gw = cfg.grid_size
    problems = []
    if tc.num_samples > gt * gh * gw:
        problems.append(f"--num_samples must be in [1, {gt * gh * gw}] (the patches of a clip)")
    if tc.stage == 2 and tc.num_frames_stage2 > gt:
        problems.append(f"--num_frames_stage2 must be in [1, {gt}] (the temporal patches)")
    H.check_config(tc, problems)


def load_tokenizer(path, device="cpu"):
    """A trained CoordTok (eval mode, weights memory-mapped) and its checkpoint dict, from our
    checkpoints or the authors' release (its dict says kind "official", no training metadata)."""
    model, ckpt = H.load_model_file(path, "coordtok_tokenizer", CoordTokConfig,
                                    lambda cfg, _: CoordTok(cfg), "model", CoordTok.from_official,
                                    "tokenizer")
    return model.to(device).eval(), ckpt


def evaluate(model, val_set, num_clips, batch_size, device, lpips=None):
    """eval.py's per-frame figures (metrics.frame_metrics: PSNR, SSIM, LPIPS if loaded), every
    patch decoded, over the first num_clips held-out clips' real frames: {"held_out_psnr": ...}."""
    clips = torch.utils.data.Subset(val_set, range(num_clips))
    loader = data.make_loader(clips, batch_size, False, 0, infinite=False)
    table = metrics.frame_metrics(lpips)
    batches = metrics.reconstruct(model, loader, model.config.num_frames, device, show=False)
    figures, _ = metrics.score(batches, table, None, 1, device, model.patch_size)
    return {f"held_out_{name}": figures[name] for name in table if figures[name] is not None}


@torch.no_grad()
def write_picture(model, val_set, path, device):
    """The first four held-out clips as rows of input, reconstruction and error x4, and under
    them the triplane of the first: z_xy, z_xt, z_yt, each texel where its pixels are."""
    items = [val_set[i] for i in range(min(4, len(val_set)))]
    video = data.from_uint8(torch.stack([it["video"] for it in items]).to(device))
    n_frames = torch.stack([it["n_frames"] for it in items]).to(device)
    with H.autocast(device):
        triplane = model.encode(video, n_frames)
        recon = model.decode_video(triplane)                                   # (B, T, H, W, 3)
    shown, zoom = int(n_frames.min()), max(1, round(64 / video.shape[2]))     # frames ~64 px
    clips = (data.to_uint8(v[:, :shown]).cpu() for v in (video, recon))
    texel = zoom * video.shape[2] // triplane[0].shape[2]  # pixels a texel of z_xy spans
    planes = data.planes_image([z[0] for z in triplane], texel)
    data.write_png(path, data.stack_images(data.comparison_grid(*clips, zoom=zoom), planes))


def train(cfg: CoordTokConfig, tc: TrainConfig, explicit=frozenset()):
    ckpt_path = os.path.join(tc.out_dir, "tokenizer.pt")
    start_step, overrides, init_model = 0, [], None
    if tc.resume:
        resume_ckpt, cfg, tc, overrides = H.resume_from(ckpt_path, "coordtok_tokenizer", cfg, tc,
                                                        explicit, keep=("resume", "out_dir"))
        start_step = resume_ckpt["step"]
        if start_step >= tc.max_iters:
            return print(f"{ckpt_path} is at step {start_step}: nothing to train below "
                         f"--max_iters {tc.max_iters}.")
    elif tc.init_from:  # ours or the authors' released weights
        init_model, init_ckpt = load_tokenizer(tc.init_from)
        H.check_model_flags(init_model.config, cfg, explicit, tc.init_from)
        cfg = init_model.config
        # stage 2 goes on with the data and split of the run it starts from, unless told otherwise
        inherited = {k: v for k, v in init_ckpt.get("train_config", {}).items()
                     if k in ("data", "split_file", "val_fraction") and k not in explicit}
        tc = replace(tc, **inherited)
    elif tc.stage == 2:
        raise ValueError("--stage 2 fine-tunes a trained tokenizer: pass --init_from PATH.")
    validate_config(cfg)
    validate_train_config(cfg, tc)
    dist = H.setup_distributed(tc.device)
    device, cuda = dist.device, dist.device.type == "cuda"
    lock = H.lock_run(ckpt_path, tc.resume, dist)  # before any work: two runs never share it
    if dist.is_main and not tc.data:
        data.ensure_synthetic("data/synthetic")  # only rank 0 writes it
    if dist.ddp:
        torch.distributed.barrier()
    tc = replace(tc, data=os.path.abspath(tc.data or "data/synthetic"))  # --resume reads it again
    train_set, val_set = (data.VideoDataset(tc.data, cfg.frame_size, cfg.num_frames, split,
                                            tc.val_fraction, tc.split_file)
                          for split in ("train", "val"))
    if tc.resume and dist.is_main:
        data.report_split_change(resume_ckpt.get("held_out"), val_set, ckpt_path)
    batches = data.make_loader(train_set, tc.batch_size, shuffle=True, num_workers=tc.num_workers,
                               dist=dist, seed=tc.seed, start_step=start_step * tc.grad_accum)

    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    model = CoordTok(cfg).to(device)
    optimizer = torch.optim.AdamW(H.decay_groups(model, tc.weight_decay), lr=tc.learning_rate,
                                  betas=(tc.beta1, tc.beta2), fused=cuda)
    if tc.resume:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        torch.set_rng_state(resume_ckpt["rng"]["cpu"])
    elif init_model is not None:
        model.load_state_dict(init_model.state_dict())
    lpips, to_frames, (_, gh, gw) = None, None, model.grid_size
    if tc.stage == 2 and tc.lpips_weight > 0:
        lpips, why = metrics.load_lpips(tc.lpips_vgg, tc.lpips_lin, device)
        if lpips is None:
            raise H.WeightsUnavailable(f"{why} Or train without LPIPS: --lpips_weight 0.")

        def to_frames(patches):  # K whole temporal patches per clip -> images (B*K*pt, 3, H, W)
            patches = rearrange(patches, "b (k h w) d -> (b k) 1 h w d", h=gh, w=gw)
            return rearrange(unpatchify(patches, model.patch_size), "n t h w c -> (n t) c h w")
    raw_model = model  # what is saved and evaluated; `model` is what the loop calls
    if tc.compile == "true" or (tc.compile == "auto" and cuda):  # on for CUDA by default
        model = torch.compile(model)
    if dist.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, [dist.local_rank] if cuda
                                                          else None)
    n_decoded = tc.num_samples if tc.stage == 1 else tc.num_frames_stage2 * gh * gw
    clips_per_step = tc.batch_size * tc.grad_accum * dist.world_size
    flops_per_step = 3 * raw_model.flops_per_clip(n_decoded) * tc.batch_size * tc.grad_accum
    log = H.RunLog(tc.out_dir, "tokenizer", start_step, dist.is_main, tc.wandb_project, asdict(tc))
    if dist.is_main:
        print(f"CoordTok {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M params, "
              f"{raw_model.num_tokens()} tokens per clip of {cfg.num_frames}x"
              f"{'x'.join(map(str, cfg.frame_size))}; {len(train_set.files)} training / "
              f"{len(val_set.files)} held-out videos from {tc.data}; stage {tc.stage} on "
              f"{device} x{dist.world_size}; the record of the run: {log.path}")
        if tc.resume:  # and the flags this command line changes
            print(f"resuming {ckpt_path} at step {start_step}", *overrides, sep="\n")

    def save(step):
        H.atomic_save({"kind": "coordtok_tokenizer", "model": raw_model.state_dict(),
                       "optimizer": optimizer.state_dict(), "model_config": asdict(cfg),
                       "train_config": asdict(tc), "step": step,
                       "rng": {"cpu": torch.get_rng_state()}, "data": tc.data,
                       "held_out": val_set.relative_paths()}, ckpt_path)

    step, bad_steps, done, t_start = start_step, 0, False, time.time()
    t_log, step_log = t_start, step
    bar = tqdm(total=tc.max_iters, initial=step, disable=not dist.is_main, dynamic_ncols=True)
    with H.stop_signals() as signals, bar:  # SIGTERM (preemption), Ctrl-C: finish, save, exit
        while True:  # forward and backward; a checkpoint when due; the step (not after the last)
            lr = H.lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # patches and flips are drawn for the global batch from a generator seeded by (seed,
            # step) (1_000_003, a prime, keeps the seeds' streams apart): a resumed run draws the
            # same, and so does a run on any number of processes
            gen = torch.Generator(device).manual_seed(tc.seed * 1_000_003 + step)
            share = (dist.rank, dist.world_size)
            loss_sum, mse_sum = torch.zeros((), device=device), torch.zeros((), device=device)
            for micro in range(tc.grad_accum):
                batch = next(batches)
                short = bool((batch["n_frames"] < cfg.num_frames).any())  # CPU tensor: no sync
                video = data.from_uint8(batch["video"].to(device, non_blocking=True))
                if tc.flip:
                    video = random_flips(video, gen, share)                 # (B, T, H, W, 3)
                n_frames = batch["n_frames"].to(device, non_blocking=True)
                sample = sample_patches if tc.stage == 1 else sample_frames
                n = tc.num_samples if tc.stage == 1 else tc.num_frames_stage2
                coords, targets = sample(video, n_frames, n, raw_model.patch_size, gen, share)
                last = not dist.ddp or micro == tc.grad_accum - 1  # DDP syncs on the last only
                with nullcontext() if last else model.no_sync():
                    with torch.autocast(device.type, torch.bfloat16, enabled=cuda):  # bf16 on GPU
                        pred = model(video, coords, n_frames if short else None)  # (B, N, D)
                        loss = reconstruction_loss(pred, targets, lpips, tc.lpips_weight, to_frames)
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.detach() / tc.grad_accum
                mse_sum += F.mse_loss(pred.detach().float(), targets.float()) / tc.grad_accum
            # clip the gradient's norm; a step whose gradient is not finite is skipped (the norm
            # is of the all-reduced gradient, so every rank skips it)
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
                bad_steps = 0
            else:  # the next step draws other clips and patches
                bad_steps += 1
                H.warn_skipped_step(bad_steps, tc.max_bad_steps, ckpt_path)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            out_of_time = tc.max_time > 0 and time.time() - t_start > tc.max_time * 60
            signum, out_of_time = H.agree(dist, signals[0] if signals else 0, out_of_time)
            done = step == tc.max_iters or signum or out_of_time  # a signal: saved, unevaluated
            record = {"step": step}
            if dist.is_main and (step % tc.log_interval == 0 or done):
                seconds = (time.time() - t_log) / (step - step_log)
                mse = mse_sum.item() / 4  # on [0, 1]: pixels are in [-1, 1], twice the range
                record.update(loss=loss_sum.item(), psnr=-10 * math.log10(max(mse, 1e-10)), lr=lr,
                              seconds_per_step=seconds, clips_per_s=clips_per_step / seconds)
                if cuda:
                    record["mfu"] = flops_per_step / seconds / tc.peak_flops
                bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "psnr", "lr", "mfu")
                                 if k in record})
            n_eval = min(tc.eval_clips, len(val_set))
            if dist.is_main and (step % tc.eval_interval == 0 or (done and not signum)) and n_eval:
                record.update(evaluate(raw_model.eval(), val_set, n_eval, max(tc.batch_size, 4),
                                       device, lpips))
                raw_model.train()
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                      if k.startswith("held_out_")))
            if len(record) > 1:
                log.write(record)
                t_log, step_log = time.time(), step
    if not finite:  # the run ended in a non-finite streak: nothing was saved since it began
        raise H.diverged(bad_steps + 1, ckpt_path)
    picture = os.path.join(tc.out_dir, "tokenizer.png")
    if dist.is_main and not signum:
        write_picture(raw_model.eval(), val_set, picture, device)
    H.end_run(dist, tc, lock, log, step, signum, ckpt_path, f"; {picture}: rows of input, "
              f"reconstruction, error x4, then z_xy, z_xt, z_yt")


@torch.no_grad()
def encode_dataset(tc: TrainConfig):
    """Write the tokens file (data.save_tokens): the triplane of every window of the model's length
    of every video, every --encode_stride frames (default: back to back, the last ending at the
    video's end), each video read once; under torchrun, each rank a share, the same file."""
    dist = H.setup_distributed(tc.device)
    if dist.is_main:
        data.check_tokens_path(tc.encode)
    ckpt_path = tc.init_from or os.path.join(tc.out_dir, "tokenizer.pt")
    model, ckpt = load_tokenizer(ckpt_path, dist.device)
    cfg, data_dir = model.config, tc.data or ckpt.get("data", "")
    validate_train_config(cfg, tc)
    if not data_dir:
        raise ValueError(f"{ckpt_path} does not name the data it was trained on; pass --data DIR.")
    dataset = data.VideoDataset(data_dir, cfg.frame_size, cfg.num_frames, "all")
    mine, encoded = dist.share(len(dataset.files)), []
    windows = data.batched_windows(dataset, mine, tc.encode_stride or cfg.num_frames, tc.batch_size)
    for batch in tqdm(windows, desc=f"encoding {len(mine)} videos", disable=not dist.is_main):
        with H.autocast(dist.device):
            video = data.from_uint8(batch.pop("video").to(dist.device))
            triplane = model.encode(video, batch["n_frames"].to(dist.device))
        encoded.append({**batch, **dict(zip(data.PLANES, (z.float().cpu() for z in triplane)))})
    shares = H.gather_to_main(dist, encoded)
    if dist.is_main:
        batches = [b for share in shares for b in share]
        merged = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        order = torch.argsort(merged["video_index"] * (1 << 40) + merged["start"])
        merged = {k: v[order] for k, v in merged.items()}                  # in dataset order
        data.save_tokens(tc.encode, merged, dataset.class_names, ckpt_path, asdict(cfg),
                         H.weights_fingerprint(model), dataset.relative_paths())
        print(f"wrote {tc.encode}: {len(order)} clips of {cfg.num_frames} frames from "
              f"{len(dataset.files)} videos x {model.num_tokens()} tokens of "
              f"{cfg.triplane_c} channels")
    H.cleanup_distributed(dist)


def main(argv=None):
    (cfg, tc), explicit = H.parse_config((CoordTokConfig, TrainConfig), PRESETS, argv,
                                         description=__doc__.split("\n\n")[1])
    with H.errors_as_exit(data.VideoReadError):
        encode_dataset(tc) if tc.encode else train(cfg, tc, explicit)


if __name__ == "__main__":
    main()
