"""
Evaluate a CoordTok tokenizer the way the paper reports it: PSNR, SSIM and LPIPS per frame,
rFVD on whole clips, and how many tokens a clip becomes.

  python eval.py                                     # out/tokenizer.pt on the held-out clips of its data
  python eval.py --ckpt out/stage2/tokenizer.pt --data DIR --num_clips 1000 --batch_size 16
  python eval.py --num_frames 8                      # clips shorter than the model's (padded, real frames only)
  python eval.py --tokens --preset large             # the token table of a preset, no checkpoint (1280)
  python eval.py --fvd --real DIR --fake DIR         # FVD between two folders of videos (sample.py's output)
  python eval.py --ckpt FILE --data DIR              # a checkpoint with no training split (the authors'): all clips

Writes out/eval.json (every figure, the config, the checkpoint, the data, the date, the device),
out/recon.mp4 (input | reconstruction, side by side) and out/recon.png (a few frames).

Metric conventions (DESIGN.md section 4):
* PSNR, SSIM, LPIPS: per frame on [0, 1] after clamping, averaged over every real frame of every clip.
  SSIM uses an 11x11 Gaussian window (sigma 1.5), population covariance and K1, K2 = 0.01, 0.03, which is
  scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5, data_range=1) averaged over the
  channels. LPIPS is VGG16 with the v0.1 linear layers (tokenizer.LPIPS).
* rFVD / FVD: the StyleGAN-V protocol. The I3D detector is StyleGAN-V's TorchScript port of the tf.hub
  model, called on whole clips as uint8 (B, 3, T, H, W) in [0, 255] with rescale=True, resize=True,
  return_features=True, so the detector itself maps to [-1, 1] and resizes to 224x224. Features are
  accumulated in float64; the distance is between the two Gaussians (mean, population covariance).
  FVD on few clips is biased upward: the clip count is printed beside every FVD. Generated clips scored
  for FVD should be written losslessly (sample.py's FFV1 .mkv): H.264 changes the pixels the detector sees.
Weights are fetched on first use into the torch hub cache or read from --i3d / --lpips_vgg / --lpips_lin.
A metric whose weights cannot be had, or whose detector cannot take clips this short, is reported as
unavailable with the reason (null in the JSON); any other failure of a metric stops the evaluation.
"""

import argparse
import dataclasses
import datetime
import itertools
import json
import math
import os
import socket
import sys
import time
import warnings

import av
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data as D
import tokenizer as T

# -----------------------------------------------------------------------------
# configuration

# StyleGAN-V's detector and the way it is called: universome/stylegan-v, src/metrics/frechet_video_distance.py
# (compute_fvd: detector_url, detector_kwargs) and src/metrics/metric_utils.py (uint8 clips permuted to
# (B, C, T, H, W), one clip per call; generated frames mapped with x * 127.5 + 128, clamped, cast to uint8)
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_FILE = "i3d_torchscript.pt"
I3D_KWARGS = dict(rescale=True, resize=True, return_features=True)
# Clips I3D cannot take: never for their frame size (the detector resizes to 224x224 first), but for their
# length: the tf.hub I3D halves time three times ('same' padding) and ends with an average pool over 2 time
# steps, so clips of 8 frames or fewer should be too short. That limit is the port's to state, so its own
# refusal is recognised instead: PyTorch's messages for an input smaller than a kernel (pool, convolution).
KERNEL_TOO_LARGE = ("smaller than kernel size", "Kernel size can't be greater", "Output size is too small")

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

# The 3D latent grid CoordTok's token count is compared with, here and in bench.py: 4x down-sampling in time,
# 8x in space, as the video VAEs of latent video diffusion (8192 tokens for 128x128x128). 4 channels, the
# latent width of Stable Diffusion's VAE that many latent video models start from (newer video VAEs keep 8
# to 16: the float comparison at 4 is the one least favourable to CoordTok); only the float count uses it.
GRID_DOWNSAMPLE = (4, 8, 8)
GRID_CHANNELS = 4

METRIC_CHUNK = 64  # frames per SSIM / LPIPS call: bounds memory on 128-frame 128x128 clips
PREVIEW_CLIPS, PREVIEW_FRAMES = 4, 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="--tokens also takes --preset NAME and any model flag of tokenizer.py (e.g. --triplane_rs 32).")
    parser.add_argument("--ckpt", default="out/tokenizer.pt", help="tokenizer checkpoint to evaluate")
    parser.add_argument("--data", default="", help="folder of videos; default: the data the checkpoint trained on")
    parser.add_argument("--split", default=None, choices=("val", "train", "all"),
                        help="val: the clips held out from training (same split as training), the default; "
                             "all: every clip, the default for a checkpoint that carries no training split")
    parser.add_argument("--num_clips", type=int, default=0,
                        help="N clips spread evenly over the data, every class (0: all); --fvd: of each folder")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--i3d_batch", type=int, default=1,
                        help="clips per I3D call (StyleGAN-V: 1; a 128-frame clip at 224x224 is large)")
    parser.add_argument("--num_frames", type=int, default=0,
                        help="clip length (0: the model's; shorter ones are padded and masked). "
                             "With --fvd: 0 takes the length of the first fake video")
    parser.add_argument("--img_size", type=int, default=0, help="--fvd only: frame size (0: the first fake video's)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--num_workers", type=int, default=2, help="processes decoding video")
    parser.add_argument("--out_dir", default="out", help="where eval.json, recon.mp4 and recon.png go")
    parser.add_argument("--i3d", default="", help=f"path of {I3D_FILE} (default: fetched to the torch hub cache)")
    parser.add_argument("--lpips_vgg", default="", help="path of torchvision's vgg16 weights (default: hub cache)")
    parser.add_argument("--lpips_lin", default="", help="path of LPIPS v0.1 vgg.pth (default: hub cache)")
    parser.add_argument("--tokens", action="store_true", help="print the token table of --preset and exit")
    parser.add_argument("--fvd", action="store_true", help="FVD between the videos of --real and --fake")
    parser.add_argument("--real", default="", help="--fvd: folder of real videos")
    parser.add_argument("--fake", default="", help="--fvd: folder of generated videos (lossless .mkv preferred)")
    args, model_flags = parser.parse_known_args(argv)
    if model_flags and not args.tokens:
        parser.error(f"unrecognized arguments: {' '.join(model_flags)} "
                     f"(--preset and model flags only go with --tokens)")
    if args.fvd and not (args.real and args.fake):
        parser.error("--fvd needs both --real DIR and --fake DIR")
    if min(args.batch_size, args.i3d_batch) < 1 or args.num_clips < 0 or args.num_frames < 0:
        parser.error("--batch_size and --i3d_batch must be >= 1; --num_clips and --num_frames must be >= 0")
    return args, model_flags


# -----------------------------------------------------------------------------
# per-frame metrics: clips (B, T, H, W, 3) in [-1, 1] -> (B, T)


def to_unit(video):
    """[-1, 1] -> [0, 1], clamped: every metric sees what a viewer would see."""
    return (video.float().clamp(-1, 1) + 1) / 2


def per_frame(image_metric, pred, target):
    """Apply an image metric ((N, 3, H, W) x2 -> (N,)) to every frame of two clips: (B, T, H, W, 3) -> (B, T)."""
    batch = pred.shape[0]
    pred, target = (rearrange(v, "b t h w c -> (b t) c h w") for v in (pred, target))
    scores = torch.cat([image_metric(pred[i:i + METRIC_CHUNK], target[i:i + METRIC_CHUNK])
                        for i in range(0, pred.shape[0], METRIC_CHUNK)])
    return rearrange(scores, "(b t) -> b t", b=batch)


def gaussian_window(size=SSIM_WINDOW, sigma=SSIM_SIGMA, device=None):
    """The normalised 1D Gaussian (size,) float64; SSIM's 2D window is its outer product (separable)."""
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim_images(x, y):
    """SSIM of images (N, 3, H, W) in [0, 1] -> (N,), the mean over channels and window positions.

    Local means, variances and covariance are Gaussian-weighted averages; population covariance
    (no N/(N-1)), as scikit-image with gaussian_weights=True. Only windows fully inside the image count:
    scikit-image filters with reflected borders and then crops (window - 1) / 2 pixels on each side,
    which leaves exactly the positions of a 'valid' convolution. float64 because the variances are
    differences of nearly equal numbers (E[x^2] - E[x]^2), which float32 would round visibly.
    """
    n, c, h, w = x.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}")
    x, y = x.double(), y.double()
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)               # (N, 5*3, H, W)
    g = gaussian_window(device=x.device)
    k = moments.shape[1]
    moments = F.conv2d(moments, g.view(1, 1, -1, 1).expand(k, 1, -1, 1), groups=k)  # along H: (N, 15, H-10, W)
    moments = F.conv2d(moments, g.view(1, 1, 1, -1).expand(k, 1, 1, -1), groups=k)  # along W: (N, 15, H-10, W-10)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.chunk(5, dim=1)                # each (N, 3, h', w')
    var_x, var_y, cov_xy = e_xx - mu_x ** 2, e_yy - mu_y ** 2, e_xy - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2                                   # data range 1
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).float()


def ssim_per_frame(pred, target):
    return per_frame(ssim_images, to_unit(pred), to_unit(target))


def lpips_per_frame(lpips, pred, target):
    """LPIPS (VGG16, v0.1) per frame; tokenizer.LPIPS takes images in [-1, 1]."""
    return per_frame(lambda a, b: lpips(a, b).float(), to_unit(pred) * 2 - 1, to_unit(target) * 2 - 1)


def load_lpips(vgg_path, lin_path, device):
    """(LPIPS module, "") or (None, why it is unavailable)."""
    try:
        return T.LPIPS.from_pretrained(vgg_path, lin_path).to(device), ""
    except RuntimeError as e:  # WeightsUnavailable, or a file whose keys or shapes do not fit
        return None, str(e).strip()


def frame_metrics(lpips):
    """The per-frame metrics in table order: eval.json key -> (table label, format, function (pred, target)
    -> (B, T), or None without weights). A new metric is one entry: scoring, table and eval.json follow."""
    lpips_fn = None if lpips is None else (lambda pred, target: lpips_per_frame(lpips, pred, target))
    return {"psnr": ("PSNR", "{:.2f} dB", T.psnr_per_frame), "ssim": ("SSIM", "{:.4f}", ssim_per_frame),
            "lpips": ("LPIPS", "{:.4f}", lpips_fn)}


# -----------------------------------------------------------------------------
# FVD: I3D features of whole clips, and the Frechet distance of two Gaussians


def i3d_path(flag=""):
    """Where the detector is read from: --i3d, or the torch hub cache (where it is fetched to)."""
    return flag or os.path.join(torch.hub.get_dir(), "checkpoints", I3D_FILE)


def load_i3d(path, device):
    """(StyleGAN-V's TorchScript I3D, "") or (None, why it is unavailable and how to supply it)."""
    target = i3d_path(path)
    try:
        if not os.path.isfile(target):
            if path:
                raise FileNotFoundError(f"{path} does not exist")
            print(f"fetching {I3D_URL} to {target}", file=sys.stderr)
            socket.setdefaulttimeout(60)  # a silent network fails in a minute instead of hanging
            torch.hub.download_url_to_file(I3D_URL, target, progress=False)  # a temporary file, then renamed
        detector = torch.jit.load(target, map_location="cpu").eval().to(device)
    except Exception as e:  # offline, a corrupt file, ...: the other metrics must still run
        return None, (f"the I3D detector could not be loaded ({type(e).__name__}: {e}); "
                      f"download {I3D_URL} to {target} or pass --i3d PATH")
    return detector, ""


class ClipsTooShortForI3D(ValueError):
    """The detector refused clips smaller than one of its kernels (see KERNEL_TOO_LARGE)."""


@torch.no_grad()
def i3d_features(detector, clips, device, i3d_batch=1):
    """uint8 clips (B, T, H, W, 3) -> I3D features (B, F) float64, called as StyleGAN-V calls the detector,
    i3d_batch clips per call. Raises ClipsTooShortForI3D when the detector cannot take clips of this length;
    any other failure (out of memory included) propagates."""
    features = []
    for chunk in clips.split(i3d_batch):
        x = rearrange(chunk, "b t h w c -> b c t h w").contiguous().to(device)  # (b, 3, T, H, W) uint8 in [0, 255]
        try:
            features.append(detector(x, **I3D_KWARGS).double().cpu())   # (b, F)
        except RuntimeError as e:  # what a TorchScript op raises, out of memory included
            refusal = [line for line in str(e).splitlines() if any(m in line for m in KERNEL_TOO_LARGE)]
            if not refusal:
                raise
            raise ClipsTooShortForI3D(f"the I3D detector cannot take clips of {x.shape[2]} frames "
                                      f"({refusal[-1].strip()}); the tf.hub I3D's strides call for 9 or more") from None
    return torch.cat(features)


def clip_loader(folder, img_size, num_frames, split="all", random_start=False, val_fraction=0.1, num_clips=0,
                batch_size=8, num_workers=0, split_file=""):
    """num_clips clips (0: all) of a split of a folder of videos, spread evenly over it (the files are sorted
    by class: the first N would be the first classes only), in order, once."""
    dataset = D.VideoDataset(folder, img_size, num_frames, split, random_start, val_fraction, split_file)
    if len(dataset) == 0:
        raise ValueError(f"the {split!r} split of {folder} has no clips (val_fraction {val_fraction}); "
                         f"add videos, or pass --split all")
    if 0 < num_clips < len(dataset):
        spread = torch.linspace(0, len(dataset) - 1, num_clips).round().long()  # distinct, first and last included
        dataset = torch.utils.data.Subset(dataset, spread.tolist())
    return D.make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, distributed=False,
                         infinite=False, drop_last=False)


def folder_features(detector, folder, num_frames, img_size, device, i3d_batch=1, **clip_loader_options):
    """I3D features (N, F) float64 of the clips of a folder of videos, StyleGAN-V style: each clip from the
    first frame or (random_start=True) a seeded random one, videos shorter than num_frames left out."""
    features, short = [], 0
    loader = clip_loader(folder, img_size, num_frames, **clip_loader_options)
    for batch in tqdm(loader, desc=f"I3D features of {folder}", leave=False):
        whole = batch["n_frames"] == num_frames
        short += int((~whole).sum())
        if whole.any():
            features.append(i3d_features(detector, batch["video"][whole], device, i3d_batch))
    if short:
        warnings.warn(f"{short} videos in {folder} are shorter than {num_frames} frames and were left out")
    return torch.cat(features).numpy() if features else np.zeros((0, 1))


def feature_stats(features):
    """Mean (F,) and population covariance (F, F) of features (N, F), in float64 (StyleGAN-V's FeatureStats)."""
    features = np.asarray(features, dtype=np.float64)
    mean = features.mean(axis=0)
    centred = features - mean
    return mean, centred.T @ centred / features.shape[0]


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The trace term without a general matrix square root: sigma1 sigma2 is similar to the symmetric
    positive semi-definite M = S sigma2 S with S = sigma1^(1/2) (M = S^-1 (sigma1 sigma2) S when sigma1 is
    invertible, and by continuity otherwise), so tr((sigma1 sigma2)^(1/2)) = sum of sqrt(eigenvalues of M).
    Both S and the eigenvalues of M come from symmetric eigensolvers, which are backward stable and
    return real eigenvalues; rounding can only push the (true) zero eigenvalues of a rank-deficient
    covariance (fewer clips than features) slightly negative, and those are clamped to zero. The
    eigenvalues of the non-symmetric product sigma1 sigma2, or scipy's sqrtm of it, can come out complex
    from the same rounding and need their imaginary parts discarded.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    m = (m + m.T) / 2                                                 # symmetric up to rounding; make it exact
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fvd_from_features(real, fake):
    """FVD of two feature sets (N, F), or None and why (the covariance of fewer than 2 clips is undefined)."""
    if min(len(real), len(fake)) < 2:
        return None, f"FVD needs at least 2 clips on each side, got {len(real)} and {len(fake)}"
    return frechet_distance(*feature_stats(real), *feature_stats(fake)), ""


# -----------------------------------------------------------------------------
# token counts: the triplane against raw pixels and a 3D latent grid of the same clip


def grid_latent_shape(num_frames, img_size, channels=GRID_CHANNELS):
    """(C, T', H', W') of the GRID_DOWNSAMPLE latent grid of a clip; a partial block still makes a latent."""
    dt, dh, dw = GRID_DOWNSAMPLE
    return channels, math.ceil(num_frames / dt), math.ceil(img_size / dh), math.ceil(img_size / dw)


def token_counts(model, num_frames):
    cfg = model.config
    channels, *grid = grid_latent_shape(num_frames, cfg.img_size)
    grid_tokens = math.prod(grid)
    counts = dict(frames=num_frames, img_size=cfg.img_size, tokens=model.num_tokens(), floats=model.num_floats(),
                  channels=cfg.triplane_c, raw_floats=num_frames * cfg.img_size ** 2 * 3,
                  grid_downsample=list(GRID_DOWNSAMPLE), grid_channels=channels, grid_tokens=grid_tokens,
                  grid_floats=grid_tokens * channels)
    counts["compression_vs_raw"] = counts["raw_floats"] / counts["floats"]
    counts["grid_tokens_per_token"] = grid_tokens / counts["tokens"]
    counts["grid_floats_per_float"] = counts["grid_floats"] / counts["floats"]
    return counts


def token_rows(c):
    """The token part of the table, as (label, value) rows."""
    return [
        ("tokens per clip", f"{c['tokens']} ({c['channels']} channels each)"),
        ("floats per clip", f"{c['floats']}"),
        ("vs raw pixels", f"{c['raw_floats']} floats ({c['frames']}x{c['img_size']}x{c['img_size']}x3): "
                          f"{c['compression_vs_raw']:.1f}x compression"),
        ("vs a 4x8x8 3D latent grid", f"{c['grid_tokens']} tokens = {c['grid_tokens_per_token']:.2f}x CoordTok's; "
                                      f"{c['grid_floats']} floats at {c['grid_channels']} channels = "
                                      f"{c['grid_floats_per_float']:.2f}x"),
    ]


def print_table(title, rows):
    width = max(len(label) for label, _ in rows)
    print(title)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


# -----------------------------------------------------------------------------
# evaluating a tokenizer: reconstruct the clips, score the reconstructions, report (table, eval.json, previews)


@torch.no_grad()
def reconstruct(model, loader, num_frames, device):
    """Encode and decode the loader's clips. Yields per batch: the clips as read, uint8 (B, Tc, S, S, 3); their
    reconstructions in [-1, 1] (B, Tc, S, S, 3) on the device; the real frames of each clip (B,); the seconds
    the model took (the device synchronised). The padding of clips shorter than the model's T frames is
    masked only when a clip is short of the model's length (as in training)."""
    model_frames = model.config.num_frames
    for batch in tqdm(loader, desc=f"evaluating {len(loader.dataset)} clips", dynamic_ncols=True):
        clips, n_frames = batch["video"], batch["n_frames"].clamp(max=num_frames)  # (B, Tc, S, S, 3) uint8, (B,)
        video = D.from_uint8(clips.to(device))                                  # (B, Tc, S, S, 3) in [-1, 1]
        padded = F.pad(video, (0, 0, 0, 0, 0, 0, 0, model_frames - num_frames))  # (B, T, S, S, 3)
        short = bool((n_frames < model_frames).any())
        start = time.perf_counter()
        with T.autocast(device):
            triplane = model.encode(padded, n_frames.to(device) if short else None)
            recon = model.decode_video(triplane)[:, :num_frames].float()       # (B, Tc, S, S, 3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield clips, recon, n_frames, time.perf_counter() - start


@torch.no_grad()
def score(batches, metrics, detector, i3d_batch, device):
    """Score reconstruct()'s batches: each per-frame metric of frame_metrics averaged over every real frame,
    and rFVD between the whole clips and their reconstructions (StyleGAN-V takes whole clips only).
    -> (eval.json's figures: the metric means, None for a metric without function or detector, rfvd,
    rfvd_clips, clips, real_frames, encode_decode_clips_per_s; why the detector refused the clips, or "")."""
    sums = dict.fromkeys([*metrics, "clips", "real_frames", "seconds"], 0)
    features, refusal = ([], []), ""
    for clips, recon, n_frames, seconds in batches:
        target = D.from_uint8(clips.to(device))                                 # (B, Tc, S, S, 3)
        real = (torch.arange(clips.shape[1]) < n_frames[:, None]).to(device)    # (B, Tc)
        for name, (_, _, metric) in metrics.items():
            sums[name] += metric(recon, target)[real].sum().item() if metric else 0
        for name, value in (("clips", len(clips)), ("real_frames", int(real.sum())), ("seconds", seconds)):
            sums[name] += value
        whole = n_frames == clips.shape[1]
        try:
            if detector is not None and not refusal and whole.any():
                features[0].append(i3d_features(detector, clips[whole], device, i3d_batch))
                features[1].append(i3d_features(detector, D.to_uint8(recon).cpu()[whole], device, i3d_batch))
        except ClipsTooShortForI3D as e:
            features, refusal = ([], []), str(e)
    real_features, recon_features = (torch.cat(f).numpy() if f else np.zeros((0, 1)) for f in features)
    rfvd, reason = (fvd_from_features(real_features, recon_features) if detector is not None and not refusal
                    else (None, refusal))
    figures = {name: sums[name] / sums["real_frames"] if metric else None for name, (_, _, metric) in metrics.items()}
    return dict(figures, rfvd=rfvd, rfvd_clips=len(real_features), clips=sums["clips"], real_frames=sums["real_frames"],
                encode_decode_clips_per_s=sums["clips"] / sums["seconds"]), reason


def report(result, metrics, preview, out_dir):
    """Print the table of an evaluation (the figures of eval.json), then write eval.json and the previews."""
    def show(name, fmt):  # fmt may name other figures, as rFVD's clip count
        value = result[name]
        return fmt.format(value, **result) if value is not None else f"unavailable: {result['unavailable'][name]}"

    clips, frames, model_frames = result["clips"], result["frames_per_clip"], result["model_frames"]
    frames_row = f"{frames}" + (f" (model: {model_frames})" if frames != model_frames else "")
    if result["real_frames"] != clips * frames:
        frames_row += f"; {result['real_frames']} real frames evaluated"
    no_split = "; the checkpoint carries no training split" if result["train_config"] is None else ""
    rows = [("clips", f"{clips} ({result['split']} split of {result['data']}{no_split})"),
            ("frames per clip", frames_row), ("resolution", "{}x{}".format(*result["resolution"])),
            *[(label, show(name, fmt)) for name, (label, fmt, _) in metrics.items()],
            ("rFVD", show("rfvd", "{:.1f} ({rfvd_clips} clips)")), *token_rows(result["tokens"]),
            ("encode + decode", f"{result['encode_decode_clips_per_s']:.2f} clips/s on {result['device']}")]
    step = "" if result["step"] is None else f" (step {result['step']})"
    print_table(f"CoordTok evaluation of {result['checkpoint']}{step}", rows)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_previews(out_dir, *preview)
    print(f"wrote {os.path.join(out_dir, 'eval.json')}, recon.mp4 and recon.png")


def write_previews(out_dir, inputs, recons, n_frames):
    """inputs, recons: uint8 (K, T, H, W, 3) of the first clips -> recon.mp4 (clips stacked, input | recon)
    and recon.png (per clip three rows of frames: input, reconstruction, error; data.comparison_grid)."""
    real = int(n_frames.min())                                        # frames real in every previewed clip
    pairs = torch.cat([inputs[:, :real], recons[:, :real]], dim=3)    # (K, T, H, 2W, 3)
    D.write_video(os.path.join(out_dir, "recon.mp4"), rearrange(pairs, "k t h w c -> t (k h) w c").numpy())
    grid = D.comparison_grid(inputs[:, :real], recons[:, :real], PREVIEW_FRAMES)
    D.write_png(os.path.join(out_dir, "recon.png"), grid)


# -----------------------------------------------------------------------------
# the three commands


def tokens_command(args, model_flags):
    """The token table of a preset (plus any model flags), built on the meta device: no memory, no weights."""
    (cfg,) = T.parse_config((T.CoordTokConfig,), T.PRESETS, model_flags, description="eval.py --tokens")
    if args.num_frames:
        cfg = dataclasses.replace(cfg, num_frames=args.num_frames)
    with torch.device("meta"):
        model = T.CoordTok(cfg)
    counts = token_counts(model, cfg.num_frames)
    params = sum(p.numel() for p in model.parameters())
    print_table(f"CoordTok token counts for one clip of {cfg.num_frames} frames at {cfg.img_size}x{cfg.img_size} "
                f"(triplane Rs={cfg.triplane_rs}, Rt={cfg.triplane_rt}, C={cfg.triplane_c}; "
                f"{params / 1e6:.1f}M parameters)", token_rows(counts))
    return counts


def fvd_command(args, device):
    """FVD between two folders, StyleGAN-V style: real clips from a (seeded) random start, generated clips
    from their first frame, videos shorter than the clip length left out."""
    for flag, folder in (("--real", args.real), ("--fake", args.fake)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} folder {folder!r} does not exist")
    detector, reason = load_i3d(args.i3d, device)
    if detector is None:
        raise SystemExit(f"FVD unavailable: {reason}")
    num_frames, img_size = args.num_frames, args.img_size
    if not (num_frames and img_size):
        first = D.find_videos(args.fake)
        if not first:
            raise FileNotFoundError(f"no video in --fake {args.fake!r} (searched for {', '.join(D.VIDEO_EXTENSIONS)})")
        with av.open(first[0][0]) as container:
            stream = container.streams.video[0]
            size = min(stream.codec_context.width, stream.codec_context.height)
        num_frames, img_size = num_frames or D.probe_video(first[0][0]), img_size or size
    real, fake = (folder_features(detector, folder, num_frames, img_size, device, args.i3d_batch,
                                  random_start=random_start, num_clips=args.num_clips,
                                  batch_size=args.batch_size, num_workers=args.num_workers)
                  for folder, random_start in ((args.real, True), (args.fake, False)))
    fvd, reason = fvd_from_features(real, fake)
    if fvd is None:
        raise SystemExit(f"FVD unavailable: {reason}")
    print(f"FVD {fvd:.2f}  ({len(real)} real / {len(fake)} fake clips of {num_frames} frames at "
          f"{img_size}x{img_size}; StyleGAN-V's I3D; FVD on few clips is biased upward)")
    result = dict(fvd=fvd, real=os.path.abspath(args.real), fake=os.path.abspath(args.fake),
                  real_clips=len(real), fake_clips=len(fake), num_frames=num_frames, img_size=img_size,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), device=describe(device))
    with open(os.path.join(args.out_dir, "fvd.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def describe(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def evaluate_command(args, device):
    # the model and the clips it is evaluated on. A checkpoint without training metadata (the authors' release)
    # names no data and holds no files out: --data is needed, and all its clips are unseen by default
    if not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist; train one with `python tokenizer.py` "
                                f"or pass --ckpt PATH")
    model, ckpt = T.load_tokenizer(args.ckpt, device)
    cfg, train_config = model.config, ckpt.get("train_config")
    num_frames = args.num_frames or cfg.num_frames
    if num_frames > cfg.num_frames:
        raise ValueError(f"--num_frames {num_frames} is longer than the {cfg.num_frames} frames this model was "
                         f"trained on (its time positions and the triplane's time axis cover {cfg.num_frames}); "
                         f"pass --num_frames {cfg.num_frames} or less")
    data_dir = args.data or ckpt.get("data", "")
    if not os.path.isdir(data_dir):
        found = (f"data folder {data_dir!r} (from {'--data' if args.data else args.ckpt}) does not exist" if data_dir
                 else f"{args.ckpt} does not name the videos it was trained on")
        raise FileNotFoundError(f"{found}; pass --data DIR with the videos to evaluate on")
    split = args.split or ("val" if train_config is not None else "all")
    held_out = {k: (train_config or {}).get(k, default) for k, default in (("val_fraction", 0.1), ("split_file", ""))}
    loader = clip_loader(data_dir, cfg.img_size, num_frames, split, num_clips=args.num_clips,
                         batch_size=args.batch_size, num_workers=args.num_workers, **held_out)  # training's split
    lpips, lpips_reason = load_lpips(args.lpips_vgg, args.lpips_lin, device)
    detector, i3d_reason = load_i3d(args.i3d, device)
    metrics = frame_metrics(lpips)

    batches = reconstruct(model, loader, num_frames, device)
    clips, recon, n_frames, _ = first = next(batches)                         # the first clips are previewed
    preview = (clips[:PREVIEW_CLIPS], D.to_uint8(recon[:PREVIEW_CLIPS]).cpu(), n_frames[:PREVIEW_CLIPS])
    figures, rfvd_reason = score(itertools.chain([first], batches), metrics, detector, args.i3d_batch, device)
    unavailable = {name: reason for name, reason in (("lpips", lpips_reason), ("rfvd", rfvd_reason or i3d_reason))
                   if figures[name] is None}
    result = dict(
        checkpoint=os.path.abspath(args.ckpt), step=ckpt.get("step"), data=os.path.abspath(data_dir), split=split,
        date=datetime.datetime.now().isoformat(timespec="seconds"), device=describe(device),
        torch=torch.__version__, frames_per_clip=num_frames, model_frames=cfg.num_frames,
        resolution=[cfg.img_size, cfg.img_size], **figures, unavailable=unavailable,
        tokens=token_counts(model, num_frames), i3d=dict(url=I3D_URL, kwargs=I3D_KWARGS, path=i3d_path(args.i3d)),
        model_config=dataclasses.asdict(cfg), train_config=train_config)
    report(result, metrics, preview, args.out_dir)
    return result


def main(argv=None):
    args, model_flags = parse_args(argv)
    try:
        if args.tokens:
            return tokens_command(args, model_flags)
        device = T.pick_device(args.device)
        T.check_out_dir(args.out_dir)  # before any work, not after it
        if args.fvd:
            return fvd_command(args, device)
        return evaluate_command(args, device)
    except (ValueError, FileNotFoundError, D.VideoReadError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
