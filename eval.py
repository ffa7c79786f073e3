"""
Evaluate a CoordTok tokenizer the way the paper reports it: PSNR, SSIM and LPIPS per frame, rFVD
on whole clips, and how many tokens a clip becomes; reconstruct whole videos of any length.

  python eval.py                                  # out/tokenizer.pt on its held-out clips
  python eval.py --ckpt coordtok_ucf101 --data UCF-101_test     # the authors' tokenizer, by name
  torchrun --nproc_per_node=8 eval.py --ckpt out/stage2/tokenizer.pt   # each rank a share
  python eval.py --video my.mp4 other.mkv --overlap 4    # whole videos back, with their figures
  python eval.py --tokens --preset large          # the token table of a preset (1280 tokens)
  python eval.py --fvd --real DIR --fake DIR      # FVD between two folders (sample.py's output)

Writes out/eval.json, recon.mp4 (input | reconstruction) and recon.png; --video writes
<stem>_recon.mp4 (.mkv with --format lossless), <stem>_side_by_side.mp4 and <stem>_recon.json.
PSNR, SSIM (an 11x11 Gaussian window, sigma 1.5: scikit-image's) and LPIPS (VGG16, v0.1) are
per frame on [0, 1] after clamping, over every real frame; rFVD / FVD are StyleGAN-V's (its
TorchScript I3D on whole uint8 clips, the Frechet distance of the two Gaussians; biased upward on
few clips, so the count is printed beside). A metric without its weights (fetched on first use,
or --i3d / --lpips_vgg / --lpips_lin) is reported unavailable with the reason, null in the JSON.
"""

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from tqdm import tqdm

import data
import harness as H
from tokenizer import PRESETS, CoordTok, CoordTokConfig, load_tokenizer, psnr_per_frame

# StyleGAN-V's detector, called as its src/metrics/frechet_video_distance.py calls it
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_KWARGS = dict(rescale=True, resize=True, return_features=True)
# The tf.hub I3D halves time three times and ends with a 2-step average pool: clips of 8 frames
# or fewer should be too short. PyTorch's own refusals of an input smaller than a kernel:
KERNEL_TOO_LARGE = ("smaller than kernel size", "Kernel size can't be greater",
                    "Output size is too small")
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
# The 3D latent grid CoordTok is compared with: 4x down in time, 8x in space (8192 tokens for
# 128x128x128), 4 channels (Stable Diffusion's VAE; the comparison least favourable to CoordTok)
GRID_DOWNSAMPLE, GRID_CHANNELS = (4, 8, 8), 4
METRIC_CHUNK = 64  # frames per SSIM / LPIPS call: bounds memory on 128-frame clips
PREVIEW_CLIPS, PREVIEW_FRAMES = 4, 8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                epilog="--tokens also takes --preset NAME and tokenizer.py's model "
                                       "flags (e.g. --triplane_rs 32).")
    p.add_argument("--ckpt", default="out/tokenizer.pt", help="tokenizer checkpoint, or a name "
                   "of the authors' release (coordtok_ucf101)")
    p.add_argument("--data", default="", help="folder of videos; default: the checkpoint's data")
    p.add_argument("--split", default=None, choices=("val", "train", "all"),
                   help="default: val (held out in training), all for a checkpoint without split")
    p.add_argument("--num_clips", type=int, default=0, help="N clips spread over the data (0: all)")
    p.add_argument("--batch_size", type=int, default=8, help="clips (--video: windows) per call")
    p.add_argument("--i3d_batch", type=int, default=1, help="clips per I3D call (StyleGAN-V: 1)")
    p.add_argument("--num_frames", type=int, default=0, help="clip length (0: the model's; shorter "
                   "clips are padded and masked); --fvd: 0 takes the first fake video's")
    p.add_argument("--img_size", type=int, default=0, help="--fvd: frame size (0: the fakes'); "
                   "--tokens: the model's frame height")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num_workers", type=int, default=2, help="processes decoding video")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--i3d", default="", help="path of i3d_torchscript.pt (default: the hub cache)")
    p.add_argument("--lpips_vgg", default="", help="torchvision's vgg16 weights (default: fetched)")
    p.add_argument("--lpips_lin", default="", help="LPIPS v0.1 vgg.pth (default: fetched)")
    p.add_argument("--tokens", action="store_true", help="print the token table of --preset")
    p.add_argument("--fvd", action="store_true", help="FVD between the videos of --real, --fake")
    p.add_argument("--real", default="", help="--fvd: folder of real videos")
    p.add_argument("--fake", default="", help="--fvd: folder of generated videos (lossless .mkv)")
    p.add_argument("--video", nargs="+", default=[], help="reconstruct these files whole")
    p.add_argument("--overlap", type=int, default=0, help="--video: frames shared by windows")
    p.add_argument("--format", default="mp4", choices=("mp4", "lossless"), help="--video output")
    args, model_flags = p.parse_known_args(argv)
    if model_flags and not args.tokens:
        p.error(f"unrecognized arguments: {' '.join(model_flags)} (model flags go with --tokens)")
    if args.fvd and not (args.real and args.fake):
        p.error("--fvd needs both --real DIR and --fake DIR")
    if min(args.batch_size, args.i3d_batch) < 1 or min(args.num_clips, args.num_frames,
                                                       args.overlap) < 0:
        p.error("--batch_size and --i3d_batch must be >= 1, --num_clips, --num_frames and "
                "--overlap >= 0")
    return args, model_flags


# -----------------------------------------------------------------------------
# per-frame metrics: clips (B, T, H, W, 3) in [-1, 1] -> (B, T)


def to_unit(video):
    """[-1, 1] -> [0, 1], clamped: every metric sees what a viewer would see."""
    return (video.float().clamp(-1, 1) + 1) / 2


def per_frame(image_metric, pred, target):
    """An image metric ((N, 3, H, W) x2 -> (N,)) on every frame of two clips -> (B, T)."""
    batch = pred.shape[0]
    pred, target = (rearrange(v, "b t h w c -> (b t) c h w") for v in (pred, target))
    scores = torch.cat([image_metric(pred[i:i + METRIC_CHUNK], target[i:i + METRIC_CHUNK])
                        for i in range(0, pred.shape[0], METRIC_CHUNK)])
    return rearrange(scores, "(b t) -> b t", b=batch)


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA, device=None):
    """The normalised 1D Gaussian (size,) float64; SSIM's 2D window is its outer product."""
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_images(x, y):
    """SSIM of images (N, 3, H, W) in [0, 1] -> (N,), the mean over channels and positions.

    Local moments are Gaussian-weighted averages with population covariance. Only windows fully
    inside the image count: scikit-image filters with reflected borders and then crops (window-1)/2
    pixels per side, which leaves the positions of a 'valid' convolution. float64, because the
    variances are differences of nearly equal numbers (E[x^2] - E[x]^2).
    """
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {x.shape[-2]}x{x.shape[-1]}.")
    x, y = x.double(), y.double()
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)                # (N, 15, H, W)
    g, k = gaussian_window(device=x.device), moments.shape[1]
    moments = F.conv2d(moments, repeat(g, "n -> k 1 n 1", k=k), groups=k)        # along H
    moments = F.conv2d(moments, repeat(g, "n -> k 1 1 n", k=k), groups=k)        # along W
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.chunk(5, dim=1)                 # (N, 3, h', w') each
    var_x, var_y, cov_xy = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2                                    # data range 1
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
            / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return ssim.mean(dim=(1, 2, 3)).float()


def ssim_per_frame(pred, target):
    return per_frame(ssim_images, to_unit(pred), to_unit(target))


VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LPIPS_LIN_URL = ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/"
                 "v0.1/vgg.pth")
VGG16_CHANNELS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512,
                  512)
LPIPS_TAPS = (3, 8, 15, 22, 29)  # torchvision's indices of relu1_2 ... relu5_3


class LPIPS(nn.Module):
    """Learned perceptual distance (also stage 2's loss): unit-normalised VGG16 features, weighted
    per channel. Module names mirror the published files (torchvision's `features.N`, LPIPS's
    `linK.model.1`) so that their state dicts load as they are."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for c in VGG16_CHANNELS:  # the indices of torchvision's vgg16().features
            layers += [nn.MaxPool2d(2, 2)] if c == "M" else [nn.Conv2d(c_in, c, 3, padding=1),
                                                           nn.ReLU()]
            c_in = c_in if c == "M" else c
        self.features = nn.Sequential(*layers[:LPIPS_TAPS[-1] + 1])
        for k, c in enumerate((64, 128, 256, 512, 512)):
            lin = nn.Module()
            lin.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(c, 1, 1, bias=False))
            setattr(self, f"lin{k}", lin)
        # LPIPS's input scaling: ImageNet statistics for inputs in [-1, 1]
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def load_published(self, vgg_state, lin_state):
        """torchvision's vgg16 state dict (the layers up to relu5_3 are used) and LPIPS's."""
        expected, state = self.state_dict(), {"shift": self.shift, "scale": self.scale}
        for given, prefix, name in ((vgg_state, "features.", "torchvision's vgg16 (--lpips_vgg)"),
                                    (lin_state, "lin", "LPIPS v0.1's vgg.pth (--lpips_lin)")):
            state.update({k: v for k, v in given.items() if k.startswith(prefix) and k in expected})
            wrong = [k for k in expected if k.startswith(prefix)
                     and (k not in state or state[k].shape != expected[k].shape)]
            if wrong:
                raise H.WeightsUnavailable(f"{name}: {wrong[0]} missing or reshaped, not the "
                                           f"published layout; pass the published file.")
        self.load_state_dict(state)
        return self

    @classmethod
    def from_pretrained(cls, vgg_path="", lin_path=""):
        """From paths, or fetched to the hub cache (torchvision's hash-checked), tensors only."""
        def load(url, path, flag):
            file = H.fetch(url, path, flag)
            try:
                return torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:
                raise H.WeightsUnavailable(f"{file} is not a weights file ({type(e).__name__}); "
                                           f"replace it with {url}.") from None
        vgg = load(VGG16_URL, vgg_path, "--lpips_vgg")
        lin = load(LPIPS_LIN_URL, lin_path, "--lpips_lin")
        return cls().load_published(vgg, lin).eval().requires_grad_(False)

    def forward(self, x, y):  # (N, 3, H, W) in [-1, 1] -> (N,)
        h, dist, k = torch.cat([x, y]).sub(self.shift).div(self.scale), 0.0, 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                f = h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length per pixel
                fx, fy = f.chunk(2)
                dist = dist + getattr(self, f"lin{k}").model((fx - fy) ** 2).mean(dim=(1, 2, 3))
                k += 1
        return dist


def load_lpips(vgg_path, lin_path, device):
    """(LPIPS module, "") or (None, why it is unavailable)."""
    try:
        return LPIPS.from_pretrained(vgg_path, lin_path).to(device), ""
    except H.WeightsUnavailable as e:
        return None, str(e).strip()


def frame_metrics(lpips):
    """The per-frame metrics in table order: eval.json key -> (label, format, function (pred,
    target) -> (B, T), or None without weights). A new metric is one entry."""
    lpips_fn = None if lpips is None else lambda pred, target: per_frame(
        lambda a, b: lpips(a, b).float(), to_unit(pred) * 2 - 1, to_unit(target) * 2 - 1)
    return {"psnr": ("PSNR", "{:.2f} dB", psnr_per_frame), "ssim": ("SSIM", "{:.4f}",
            ssim_per_frame), "lpips": ("LPIPS", "{:.4f}", lpips_fn)}


def yardsticks(target, patch_size):
    """Reconstructions a tokenizer should beat, of clips (B, T, H, W, 3): each frame replaced by
    the clip's mean frame (blind to motion), and by its mean over each decoder patch (a perfect
    tokenizer with no detail inside a patch)."""
    _, ph, pw = patch_size
    frames = rearrange(target, "b t h w c -> (b t) c h w")
    blur = F.interpolate(F.avg_pool2d(frames, (ph, pw)), scale_factor=(ph, pw), mode="nearest")
    return {"temporal_mean": target.mean(1, keepdim=True).expand_as(target),
            "patch_blur": rearrange(blur, "(b t) c h w -> b t h w c", b=len(target))}


# -----------------------------------------------------------------------------
# FVD: I3D features of whole clips, and the Frechet distance of two Gaussians


def load_i3d(path, device):
    """(StyleGAN-V's TorchScript I3D, "") or (None, why it is unavailable). It has no published
    checksum to verify, and torch.jit.load runs the TorchScript it holds (no Python pickles)."""
    try:
        detector = torch.jit.load(H.fetch(I3D_URL, path, "--i3d"), map_location="cpu")
        return detector.eval().to(device), ""
    except Exception as e:  # offline, a corrupt file, ...: the other metrics still run
        return None, f"the I3D detector could not be loaded ({type(e).__name__}: {e})"


class ClipsTooShortForI3D(ValueError):
    """The detector refused clips smaller than one of its kernels (see KERNEL_TOO_LARGE)."""


@torch.no_grad()
def i3d_features(detector, clips, device, i3d_batch=1):
    """uint8 clips (B, T, H, W, 3) -> I3D features (B, F) float64, i3d_batch clips per call.
    Raises ClipsTooShortForI3D when the detector refuses the length; other failures propagate."""
    features = []
    for chunk in clips.split(i3d_batch):
        x = rearrange(chunk, "b t h w c -> b c t h w").contiguous().to(device)  # uint8
        try:
            features.append(detector(x, **I3D_KWARGS).double().cpu())             # (b, F)
        except RuntimeError as e:  # what a TorchScript op raises, out of memory included
            refusal = [ln for ln in str(e).splitlines() if any(m in ln for m in KERNEL_TOO_LARGE)]
            if not refusal:
                raise
            raise ClipsTooShortForI3D(f"the I3D detector cannot take clips of {x.shape[2]} "
                                      f"frames ({refusal[-1].strip()})") from None
    return torch.cat(features)


def clip_loader(folder, frame_size, num_frames, split="all", random_start=False, val_fraction=0.1,
                num_clips=0, batch_size=8, num_workers=0, split_file="", dist=None):
    """num_clips clips (0: all) of a split of a folder, spread evenly over it (the files are
    sorted by class: the first N would be the first classes only), once, in order; under
    torchrun this rank's contiguous share."""
    dataset = data.VideoDataset(folder, frame_size, num_frames, split, val_fraction, split_file,
                                random_start)
    if len(dataset) == 0:
        raise ValueError(f"the {split!r} split of {folder} has no clips; add videos, or pass "
                         f"--split all.")
    chosen = range(len(dataset))
    if dist and min(num_clips or len(dataset), len(dataset)) < dist.world_size:
        raise ValueError(f"{folder} gives fewer clips than the {dist.world_size} processes; run "
                         f"fewer processes.")
    if 0 < num_clips < len(dataset):
        chosen = torch.linspace(0, len(dataset) - 1, num_clips).round().long().tolist()
    mine = [chosen[i] for i in (dist.share(len(chosen)) if dist else range(len(chosen)))]
    return data.make_loader(torch.utils.data.Subset(dataset, mine), batch_size, False,
                            num_workers, infinite=False)


def folder_features(detector, folder, num_frames, frame_size, device, i3d_batch=1, **options):
    """I3D features (N, F) of a folder's clips, StyleGAN-V style: each from its first frame or
    (random_start) a seeded random one; videos shorter than num_frames left out."""
    features, short = [], 0
    for batch in tqdm(clip_loader(folder, frame_size, num_frames, **options), leave=False,
                      desc=f"I3D features of {folder}"):
        whole = batch["n_frames"] == num_frames
        short += int((~whole).sum())
        if whole.any():
            features.append(i3d_features(detector, batch["video"][whole], device, i3d_batch))
    if short:
        warnings.warn(f"{short} videos in {folder} are shorter than {num_frames} frames and were "
                      f"left out")
    return torch.cat(features).numpy() if features else np.zeros((0, 1))


def feature_stats(features):
    """Mean (F,) and population covariance (F, F) of features (N, F), float64."""
    features = np.asarray(features, dtype=np.float64)
    centred = features - features.mean(axis=0)
    return features.mean(axis=0), centred.T @ centred / features.shape[0]


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The trace term without a general matrix square root: sigma1 sigma2 is similar to the
    symmetric positive semi-definite M = S sigma2 S with S = sigma1^(1/2), so tr((sigma1
    sigma2)^(1/2)) is the sum of the square roots of M's eigenvalues. Symmetric eigensolvers are
    backward stable and give real eigenvalues; rounding can only push the zero ones of a
    rank-deficient covariance slightly negative, and those are clamped (scipy's sqrtm of the
    non-symmetric product can come out complex from the same rounding)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fvd_from_features(real, fake):
    """FVD of two feature sets (N, F), or None and why (fewer than 2 clips on a side)."""
    if min(len(real), len(fake)) < 2:
        return None, f"FVD needs at least 2 clips on each side, got {len(real)} and {len(fake)}"
    return frechet_distance(*feature_stats(real), *feature_stats(fake)), ""


# -----------------------------------------------------------------------------
# token counts: the triplane against raw pixels and a 3D latent grid of the same clip


def grid_latent_shape(num_frames, frame_size, channels=GRID_CHANNELS):
    """(C, T', H', W') of the GRID_DOWNSAMPLE latent grid; a partial block makes a latent too."""
    height, width = (frame_size,) * 2 if isinstance(frame_size, int) else frame_size
    return (channels, *(math.ceil(n / d) for n, d in zip((num_frames, height, width),
                                                         GRID_DOWNSAMPLE)))


def token_counts(model, num_frames):
    cfg, (height, width) = model.config, model.config.frame_size
    channels, *grid = grid_latent_shape(num_frames, (height, width))
    c = dict(frames=num_frames, frame_size=[height, width], tokens=model.num_tokens(),
             channels=cfg.triplane_c, floats=model.num_tokens() * cfg.triplane_c,
             raw_floats=num_frames * height * width * 3, grid_downsample=list(GRID_DOWNSAMPLE),
             grid_channels=channels, grid_tokens=math.prod(grid))
    c["grid_floats"] = c["grid_tokens"] * channels
    c["compression_vs_raw"] = c["raw_floats"] / c["floats"]
    c["grid_tokens_per_token"] = c["grid_tokens"] / c["tokens"]
    c["grid_floats_per_float"] = c["grid_floats"] / c["floats"]
    return c


def token_rows(c):
    """The token part of the table, as (label, value) rows."""
    return [("tokens per clip", f"{c['tokens']} ({c['channels']} channels each)"),
            ("floats per clip", f"{c['floats']}"),
            ("vs raw pixels", f"{c['raw_floats']} floats ({c['frames']}x{c['frame_size'][0]}x"
             f"{c['frame_size'][1]}x3): {c['compression_vs_raw']:.1f}x compression"),
            ("vs a 4x8x8 3D latent grid", f"{c['grid_tokens']} tokens = "
             f"{c['grid_tokens_per_token']:.2f}x CoordTok's; {c['grid_floats']} floats at "
             f"{c['grid_channels']} channels = {c['grid_floats_per_float']:.2f}x")]


def print_table(title, rows):
    width = max(len(label) for label, _ in rows)
    print(title)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


# -----------------------------------------------------------------------------
# evaluating a tokenizer: reconstruct clips, score them, report (table, eval.json, previews)


@torch.no_grad()
def reconstruct(model, loader, num_frames, device, show=True):
    """Encode and decode the loader's clips. Yields per batch: the clips as read, uint8 (B, Tc,
    H, W, 3); their reconstructions in [-1, 1] on the device; real frames (B,); the model's
    seconds. Padding is masked when a clip is short of the model's length, as in training."""
    model_frames = model.config.num_frames
    for batch in tqdm(loader, desc=f"evaluating {len(loader.dataset)} clips", disable=not show):
        clips, n_frames = batch["video"], batch["n_frames"].clamp(max=num_frames)
        video = data.from_uint8(clips.to(device))                              # (B, Tc, H, W, 3)
        padded = F.pad(video, (0, 0, 0, 0, 0, 0, 0, model_frames - num_frames))  # (B, T, ...)
        short = bool((n_frames < model_frames).any())
        start = time.perf_counter()
        with H.autocast(device):
            triplane = model.encode(padded, n_frames.to(device) if short else None)
            recon = model.decode_video(triplane)[:, :num_frames].float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield clips, recon, n_frames, time.perf_counter() - start


@torch.no_grad()
def score(batches, metrics, detector, i3d_batch, device, patch_size, dist=None):
    """Each per-frame metric averaged over every real frame, the yardsticks' PSNR, and rFVD
    between whole clips and their reconstructions; under torchrun the ranks' sums and features
    are gathered. -> (eval.json's figures; why the detector refused the clips, or "")."""
    sums = dict.fromkeys([*metrics, "temporal_mean_psnr", "patch_blur_psnr", "clips",
                          "real_frames", "seconds"], 0.0)
    features, refusal = ([], []), ""
    for clips, recon, n_frames, seconds in batches:
        target = data.from_uint8(clips.to(device))                              # (B, Tc, H, W, 3)
        real = (torch.arange(clips.shape[1]) < n_frames[:, None]).to(device)    # (B, Tc)
        for name, (_, _, metric) in metrics.items():
            sums[name] += metric(recon, target)[real].sum().item() if metric else 0
        for name, baseline in yardsticks(target, patch_size).items():
            sums[f"{name}_psnr"] += psnr_per_frame(baseline, target)[real].sum().item()
        sums["clips"] += len(clips)
        sums["real_frames"] += int(real.sum())
        sums["seconds"] += seconds
        whole = n_frames == clips.shape[1]
        try:
            if detector is not None and not refusal and whole.any():
                features[0].append(i3d_features(detector, clips[whole], device, i3d_batch))
                recon_uint8 = data.to_uint8(recon).cpu()[whole]
                features[1].append(i3d_features(detector, recon_uint8, device, i3d_batch))
        except ClipsTooShortForI3D as e:
            features, refusal = ([], []), str(e)
    shares = H.gather_to_main(dist, (sums, features, refusal))
    if shares is None:
        return None, ""
    sums = {k: sum(s[0][k] for s in shares) for k in sums}
    refusal = next((s[2] for s in shares if s[2]), "")
    real_f, recon_f = (torch.cat([f for s in shares for f in s[1][i]]).numpy()
                       if not refusal and any(s[1][i] for s in shares) else np.zeros((0, 1))
                       for i in (0, 1))
    rfvd, reason = fvd_from_features(real_f, recon_f) if detector is not None and not refusal \
        else (None, refusal)
    figures = {name: sums[name] / sums["real_frames"] if metric else None
               for name, (_, _, metric) in metrics.items()}
    return dict(figures, rfvd=rfvd, rfvd_clips=len(real_f), clips=int(sums["clips"]),
                real_frames=int(sums["real_frames"]),
                yardsticks={k: sums[f"{k}_psnr"] / sums["real_frames"]
                            for k in ("temporal_mean", "patch_blur")},
                encode_decode_clips_per_s=sums["clips"] / sums["seconds"]), reason


def report(result, metrics, preview, out_dir):
    """Print the table of an evaluation, then write eval.json and the previews."""
    def show(name, fmt):  # fmt may name other figures, as rFVD's clip count
        value = result[name]
        return fmt.format(value, **result) if value is not None else \
            f"unavailable: {result['unavailable'][name]}"

    clips, frames, model_frames = result["clips"], result["frames_per_clip"], result["model_frames"]
    frames_row = f"{frames}" + (f" (model: {model_frames})" if frames != model_frames else "")
    if result["real_frames"] != clips * frames:
        frames_row += f"; {result['real_frames']} real frames evaluated"
    no_split = "; the checkpoint carries no training split" * (result["train_config"] is None)
    marks = result["yardsticks"]
    rows = [("clips", f"{clips} ({result['split']} split of {result['data']}{no_split})"),
            ("frames per clip", frames_row), ("resolution", "{}x{}".format(*result["resolution"])),
            *[(label, show(name, fmt)) for name, (label, fmt, _) in metrics.items()],
            ("rFVD", show("rfvd", "{:.1f} ({rfvd_clips} clips)")),
            ("yardsticks: PSNR of", f"the clip's mean frame {marks['temporal_mean']:.2f} dB, a "
             f"blur over each decoder patch {marks['patch_blur']:.2f} dB"),
            *token_rows(result["tokens"]), ("encode + decode",
                                            f"{result['encode_decode_clips_per_s']:.2f} clips/s "
                                            f"on {result['device']}")]
    step = "" if result["step"] is None else f" (step {result['step']})"
    print_table(f"CoordTok evaluation of {result['checkpoint']}{step}", rows)
    write_json(os.path.join(out_dir, "eval.json"), result)
    inputs, recons, n_frames = preview
    real = int(n_frames.min())                                   # frames real in every clip
    pairs = torch.cat([inputs[:, :real], recons[:, :real]], dim=3)              # (K, T, H, 2W, 3)
    data.write_video(os.path.join(out_dir, "recon.mp4"),
                     rearrange(pairs, "k t h w c -> t (k h) w c").numpy())
    data.write_png(os.path.join(out_dir, "recon.png"),
                   data.comparison_grid(inputs[:, :real], recons[:, :real], PREVIEW_FRAMES))
    print(f"wrote {os.path.join(out_dir, 'eval.json')}, recon.mp4 and recon.png")


def write_json(path, obj):
    with H.atomic_path(path) as temporary, open(temporary, "w") as f:
        json.dump(obj, f, indent=2)


def describe(device):
    cuda = device.type == "cuda"
    return f"{device} ({torch.cuda.get_device_name(device) if cuda else torch.get_num_threads()})"


def evaluate_command(args, dist):
    """The held-out clips of the checkpoint's data (or --data), scored; each rank a share."""
    device = dist.device
    if args.ckpt not in H.RELEASED and not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist; train one with `python "
                                f"tokenizer.py`, or pass --ckpt PATH.")
    model, ckpt = load_tokenizer(args.ckpt, device)
    cfg, train_config = model.config, ckpt.get("train_config")
    num_frames = args.num_frames or cfg.num_frames
    if num_frames > cfg.num_frames:
        raise ValueError(f"--num_frames {num_frames} is longer than the model's {cfg.num_frames} "
                         f"frames; pass --num_frames {cfg.num_frames} or less.")
    data_dir = args.data or ckpt.get("data", "")
    if not os.path.isdir(data_dir):
        found = f"data folder {data_dir!r} does not exist" if data_dir else \
            f"{args.ckpt} names no data"
        raise FileNotFoundError(f"{found}; pass --data DIR with the videos to evaluate on.")
    split = args.split or ("val" if train_config is not None else "all")
    held_out = {k: (train_config or {}).get(k, d) for k, d in (("val_fraction", 0.1),
                                                               ("split_file", ""))}
    loader = clip_loader(data_dir, cfg.frame_size, num_frames, split, num_clips=args.num_clips,
                         batch_size=args.batch_size, num_workers=args.num_workers, dist=dist,
                         **held_out)
    if split == "val" and dist.is_main:
        data.report_split_change(ckpt.get("held_out"), loader.dataset.dataset, args.ckpt)
    lpips, lpips_reason = load_lpips(args.lpips_vgg, args.lpips_lin, device)
    detector, i3d_reason = load_i3d(args.i3d, device)
    metrics = frame_metrics(lpips)
    batches = reconstruct(model, loader, num_frames, device, show=dist.is_main)
    first = next(batches, None)                                  # rank 0's first clips: previews
    figures, rfvd_reason = score(itertools.chain([first] if first else [], batches), metrics,
                                 detector, args.i3d_batch, device, model.patch_size, dist)
    if not dist.is_main:
        return None
    clips, recon, n_frames, _ = first
    unavailable = {name: reason for name, reason in (("lpips", lpips_reason),
                                                     ("rfvd", rfvd_reason or i3d_reason))
                   if figures[name] is None}
    result = dict(
        checkpoint=os.path.abspath(H.released_file(args.ckpt)), step=ckpt.get("step"),
        data=os.path.abspath(data_dir), split=split, processes=dist.world_size,
        date=datetime.datetime.now().isoformat(timespec="seconds"), device=describe(device),
        torch=torch.__version__, frames_per_clip=num_frames, model_frames=cfg.num_frames,
        resolution=list(cfg.frame_size), **figures, unavailable=unavailable,
        tokens=token_counts(model, num_frames), i3d=dict(url=I3D_URL, kwargs=I3D_KWARGS),
        model_config=dataclasses.asdict(cfg), train_config=train_config)
    preview = (clips[:PREVIEW_CLIPS], data.to_uint8(recon[:PREVIEW_CLIPS]).cpu(),
               n_frames[:PREVIEW_CLIPS])
    report(result, metrics, preview, args.out_dir)
    return result


# -----------------------------------------------------------------------------
# a user's own video, whole: windows of the model's length, decoded and joined


@torch.no_grad()
def reconstruct_video(model, path, args, metrics, device, stem):
    """One video back, every frame in order at the model's frame size. Windows of the model's
    length start every (length - overlap) frames, the last one ending at the video's last frame
    (one padded, masked window for a video shorter than the model's); a frame that several
    windows decode is their weighted mean, weights ramping over the overlap. The video is read
    once and memory holds a batch of windows. Returns the figures, also in <stem>_recon.json."""
    begin, T = time.perf_counter(), model.config.num_frames
    info, overlap = data.probe_video(path), args.overlap
    if overlap >= T:
        raise ValueError(f"--overlap {overlap} must be below the model's {T} frames.")
    fps, source_pixels = info["fps"], info["width"] * info["height"]
    out = os.path.join(args.out_dir, stem)
    recon_path = out + ("_recon.mkv" if args.format == "lossless" else "_recon.mp4")
    starts = data.window_starts(info["n_frames"], T, T - overlap)
    ramp = torch.minimum(torch.arange(T) + 1, torch.arange(T, 0, -1)).clamp(max=overlap + 1)
    pending = {}  # frame index -> [weighted sum of reconstructions, weight sum, input frame]
    scores, written = {name: [] for name in metrics}, 0

    def flush(upto, write_recon, write_pair):  # frames below `upto` are final: out, and scored
        nonlocal written
        final = [pending.pop(i) for i in range(written, upto)]
        if not final:
            return
        recon = torch.stack([total / weight for total, weight, _ in final])  # (F, H, W, 3)
        recon = data.to_uint8(recon)
        inputs = torch.stack([frame for _, _, frame in final])
        for frame, pair in zip(recon.numpy(), torch.cat([inputs, recon], 2).numpy()):
            write_recon(frame)
            write_pair(pair)
        for name, (_, _, metric) in metrics.items():
            if metric:  # on the device the metrics' weights are on
                scores[name] += metric(data.from_uint8(recon[None].to(device)),
                                       data.from_uint8(inputs[None].to(device)))[0].tolist()
        written = upto

    windows = data.iter_windows(path, model.config.frame_size, T, T - overlap, info)
    with data.video_writer(recon_path, fps=fps, lossless=args.format == "lossless") as write, \
            data.video_writer(out + "_side_by_side.mp4", fps=fps) as write_pair:
        bar = tqdm(total=len(starts), desc=f"windows of {os.path.basename(path)}", unit="window")
        for batch in iter(lambda: list(itertools.islice(windows, args.batch_size)), []):
            clips = torch.stack([torch.from_numpy(c) for _, c, _ in batch])   # (B, T, H, W, 3)
            n_real = torch.tensor([n for _, _, n in batch])
            with H.autocast(device):
                video = data.from_uint8(clips.to(device))
                recon = model.decode_video(model.encode(video, n_real.to(device))).float().cpu()
            for (start, clip, n), frames in zip(batch, recon):
                flush(start, write, write_pair)
                for j in range(n):
                    entry = pending.setdefault(start + j, [0, 0, torch.from_numpy(clip[j])])
                    entry[0], entry[1] = entry[0] + ramp[j] * frames[j], entry[1] + ramp[j]
            bar.update(len(batch))
        flush(max(pending, default=written - 1) + 1, write, write_pair)
        bar.close()
    per_frame = {name: np.array(v) for name, v in scores.items() if v}
    boundary = np.zeros(written, bool)  # frames next to a window's start or end, inside the video
    for s in starts:
        boundary[[i for i in (s - 1, s, s + T - 1, s + T) if 0 < i < written - 1]] = True
    windows_out = [{"start": s, "frames": min(T, written - s),
                    **{k: float(v[s:s + T].mean()) for k, v in per_frame.items()}}
                   for s in starts if s < written]
    psnr, tokens = per_frame["psnr"], model.num_tokens() * len(windows_out)
    result = dict(
        video=os.path.abspath(path), checkpoint=os.path.abspath(H.released_file(args.ckpt)),
        frames=written, fps=float(fps), frame_size=list(model.config.frame_size), overlap=overlap,
        windows=windows_out, **{k: float(v.mean()) for k, v in per_frame.items()},
        boundary_psnr=float(psnr[boundary].mean()) if boundary.any() else None,
        other_psnr=float(psnr[~boundary].mean()) if (~boundary).any() else None,
        tokens_per_window=model.num_tokens(), tokens=tokens,
        compression_vs_input=written * source_pixels * 3 / (tokens * model.config.triplane_c),
        seconds=time.perf_counter() - begin, outputs=[recon_path, out + "_side_by_side.mp4"])
    write_json(out + "_recon.json", result)
    print(f"{path}: {written} frames in {len(windows_out)} windows, PSNR {result['psnr']:.2f} dB "
          f"({result['boundary_psnr'] or float('nan'):.2f} next to a window boundary), {tokens} "
          f"tokens, {result['seconds']:.1f} s -> {recon_path}")
    return result


def video_command(args, device):
    stems = []  # each video's output name, unique in the call (s1/clip.mp4 and s2/clip.mp4)
    for path in args.video:
        if not os.path.isfile(path):
            what = "is a folder" if os.path.isdir(path) else "does not exist"
            raise FileNotFoundError(f"--video {path} {what}; pass video files (a folder's: DIR/*).")
        stem, k = data.safe_name(os.path.splitext(os.path.basename(path))[0]), 1
        name = stem
        while name.lower() in map(str.lower, stems):  # lower case: one file on a case-blind disk
            k += 1
            name = f"{stem}_{k}"
        stems.append(name)
    model, _ = load_tokenizer(args.ckpt, device)
    metrics = frame_metrics(load_lpips(args.lpips_vgg, args.lpips_lin, device)[0])
    return [reconstruct_video(model, path, args, metrics, device, stem)
            for path, stem in zip(args.video, stems)]


# -----------------------------------------------------------------------------
# the token table and FVD between folders


def tokens_command(args, model_flags):
    """The token table of a preset (plus model flags), on the meta device: no memory."""
    (cfg,), _ = H.parse_config((CoordTokConfig,), PRESETS, model_flags, "eval.py --tokens")
    cfg = dataclasses.replace(cfg, num_frames=args.num_frames or cfg.num_frames,
                              img_size=args.img_size or cfg.img_size)
    with torch.device("meta"):
        model = CoordTok(cfg)
    counts = token_counts(model, cfg.num_frames)
    params = sum(p.numel() for p in model.parameters())
    print_table(f"CoordTok token counts for a clip of {cfg.num_frames} frames at "
                f"{'x'.join(map(str, cfg.frame_size))} (triplane Rs={cfg.triplane_rs}, "
                f"Rt={cfg.triplane_rt}, C={cfg.triplane_c}; {params / 1e6:.1f}M parameters)",
                token_rows(counts))
    return counts


def fvd_command(args, device):
    """FVD between two folders, StyleGAN-V style: real clips from a seeded random start,
    generated ones from their first frame, videos shorter than the clip left out."""
    for flag, folder in (("--real", args.real), ("--fake", args.fake)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} folder {folder!r} does not exist; pass a folder.")
    detector, reason = load_i3d(args.i3d, device)
    if detector is None:
        raise SystemExit(f"FVD unavailable: {reason}")
    num_frames, frame_size = args.num_frames, args.img_size
    if not (num_frames and frame_size):
        first = data.find_videos(args.fake)
        if not first:
            raise FileNotFoundError(f"no video in --fake {args.fake!r}; pass sample.py's folder.")
        info = data.probe_video(first[0][0])
        num_frames = num_frames or info["n_frames"]
        frame_size = (frame_size, frame_size) if frame_size else (info["height"], info["width"])
    real, fake = (folder_features(detector, folder, num_frames, frame_size, device,
                                  args.i3d_batch, random_start=random_start,
                                  num_clips=args.num_clips, batch_size=args.batch_size,
                                  num_workers=args.num_workers)
                  for folder, random_start in ((args.real, True), (args.fake, False)))
    fvd, reason = fvd_from_features(real, fake)
    if fvd is None:
        raise SystemExit(f"FVD unavailable: {reason}")
    print(f"FVD {fvd:.2f}  ({len(real)} real / {len(fake)} fake clips of {num_frames} frames at "
          f"{frame_size[0]}x{frame_size[1]}; StyleGAN-V's I3D; biased upward on few clips)")
    result = dict(fvd=fvd, real=os.path.abspath(args.real), fake=os.path.abspath(args.fake),
                  real_clips=len(real), fake_clips=len(fake), num_frames=num_frames,
                  frame_size=list(frame_size), device=describe(device),
                  date=datetime.datetime.now().isoformat(timespec="seconds"))
    write_json(os.path.join(args.out_dir, "fvd.json"), result)
    return result


def main(argv=None):
    args, model_flags = parse_args(argv)
    try:
        if args.tokens:
            return tokens_command(args, model_flags)
        H.check_out_dir(args.out_dir)  # before any work
        if args.fvd or args.video:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError("--fvd and --video run in one process; run them without torchrun.")
            device = H.pick_device(args.device)
            return fvd_command(args, device) if args.fvd else video_command(args, device)
        dist = H.setup_distributed(args.device)
        try:
            return evaluate_command(args, dist)
        finally:
            H.cleanup_distributed(dist)
    except (ValueError, OSError, data.VideoReadError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
