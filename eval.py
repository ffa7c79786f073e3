"""
Evaluate a CoordTok tokenizer the way the paper reports it: PSNR, SSIM and LPIPS per frame,
rFVD on whole clips, and how many tokens a clip becomes.

  python eval.py                                     # out/tokenizer.pt on the held-out clips of its data
  python eval.py --ckpt out/stage2/tokenizer.pt --data DIR --num_clips 1000 --batch_size 16
  python eval.py --num_frames 8                      # clips shorter than the model's (padded, real frames only)
  python eval.py --tokens --preset large             # the token table of a preset, no checkpoint (1280)
  python eval.py --fvd --real DIR --fake DIR         # FVD between two folders of videos (sample.py's output)

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
  FVD on few clips is biased upward: the clip count is printed beside every FVD.
Weights are fetched on first use into the torch hub cache or read from --i3d / --lpips_vgg / --lpips_lin.
A metric whose weights cannot be had is reported as unavailable with the reason (null in the JSON).
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
import urllib.request
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
# (compute_fvd: detector_url, detector_kwargs) and src/metrics/metric_utils.py (the detector gets uint8
# clips permuted to (B, C, T, H, W); generated frames are mapped with x * 127.5 + 128, clamped, cast to uint8)
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
I3D_FILE = "i3d_torchscript.pt"
I3D_KWARGS = dict(rescale=True, resize=True, return_features=True)

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03

# the 3D latent grid we compare the token count with: 4x down-sampling in time, 8x in space, as the
# video VAEs of latent video diffusion (8192 tokens for 128x128x128); 4 channels as the common image/video
# VAEs (Stable Diffusion's, PVDM's frame latents differ) - an assumption, stated in the table
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
    parser.add_argument("--split", default="val", choices=("val", "train", "all"),
                        help="val: the clips held out from training (same split as training)")
    parser.add_argument("--num_clips", type=int, default=0, help="evaluate the first N clips (0: all)")
    parser.add_argument("--batch_size", type=int, default=8)
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
    parser.add_argument("--fake", default="", help="--fvd: folder of generated videos")
    args, model_flags = parser.parse_known_args(argv)
    if model_flags and not args.tokens:
        parser.error(f"unrecognized arguments: {' '.join(model_flags)} "
                     f"(--preset and model flags only go with --tokens)")
    if args.fvd and not (args.real and args.fake):
        parser.error("--fvd needs both --real DIR and --fake DIR")
    if args.batch_size < 1 or args.num_clips < 0 or args.num_frames < 0:
        parser.error("--batch_size must be >= 1; --num_clips and --num_frames must be >= 0")
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


# -----------------------------------------------------------------------------
# FVD: I3D features of whole clips, and the Frechet distance of two Gaussians


def fetch(url, path, timeout=60):
    """Download url to path (temporary file, then rename, so an interrupted download leaves nothing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    print(f"fetching {url} to {path}", file=sys.stderr)
    tmp = f"{path}.part{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def i3d_path(flag=""):
    """Where the detector is read from: --i3d, or the torch hub cache (where it is fetched to)."""
    return flag or os.path.join(torch.hub.get_dir(), "checkpoints", I3D_FILE)


def load_i3d(path, device):
    """(StyleGAN-V's TorchScript I3D, "") or (None, why it is unavailable and how to supply it)."""
    target = i3d_path(path)
    how = f"download {I3D_URL} to {target} or pass --i3d PATH"
    try:
        if not os.path.isfile(target):
            if path:
                raise FileNotFoundError(f"{path} does not exist")
            fetch(I3D_URL, target)
        detector = torch.jit.load(target, map_location="cpu").eval().to(device)
    except Exception as e:  # offline, a corrupt file, ...: the other metrics must still run
        return None, f"the I3D detector could not be loaded ({type(e).__name__}: {e}); {how}"
    return detector, ""


@torch.no_grad()
def i3d_features(detector, clips, device):
    """uint8 clips (B, T, H, W, 3) -> I3D features (B, F) float64, called as StyleGAN-V calls the detector."""
    x = rearrange(clips, "b t h w c -> b c t h w").contiguous().to(device)  # (B, 3, T, H, W) uint8 in [0, 255]
    return detector(x, **I3D_KWARGS).double().cpu()


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


def token_counts(model, num_frames):
    cfg = model.config
    dt, dh, dw = GRID_DOWNSAMPLE
    grid_tokens = math.ceil(num_frames / dt) * math.ceil(cfg.img_size / dh) * math.ceil(cfg.img_size / dw)
    counts = dict(frames=num_frames, img_size=cfg.img_size, tokens=model.num_tokens(), floats=model.num_floats(),
                  channels=cfg.triplane_c, raw_floats=num_frames * cfg.img_size ** 2 * 3,
                  grid_downsample=list(GRID_DOWNSAMPLE), grid_channels=GRID_CHANNELS, grid_tokens=grid_tokens,
                  grid_floats=grid_tokens * GRID_CHANNELS)
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
# previews: side-by-side mp4 and a PNG strip


def write_previews(out_dir, inputs, recons, n_frames):
    """inputs, recons: uint8 (K, T, H, W, 3) of the first clips -> recon.mp4 (clips stacked, input | recon)
    and recon.png (top row: input frames, bottom row: their reconstructions, first clip)."""
    real = int(n_frames.min())                                        # frames real in every previewed clip
    pairs = torch.cat([inputs[:, :real], recons[:, :real]], dim=3)    # (K, T, H, 2W, 3)
    D.write_video(os.path.join(out_dir, "recon.mp4"), rearrange(pairs, "k t h w c -> t (k h) w c").numpy())
    n = int(n_frames[0])
    picks = np.unique(np.linspace(0, n - 1, min(PREVIEW_FRAMES, n)).round().astype(int))
    strip = torch.stack([inputs[0, picks], recons[0, picks]])        # (2, F, H, W, 3)
    D.write_png(os.path.join(out_dir, "recon.png"), rearrange(strip, "r f h w c -> (r h) (f w) c").numpy())


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
    features, counts = {}, {}
    for side, folder, random_start in (("real", args.real, True), ("fake", args.fake, False)):
        dataset = D.VideoDataset(folder, img_size, num_frames, split="all", random_start=random_start)
        if args.num_clips:
            dataset = torch.utils.data.Subset(dataset, range(min(args.num_clips, len(dataset))))
        loader = D.make_loader(dataset, args.batch_size, shuffle=False, num_workers=args.num_workers,
                               distributed=False, infinite=False, drop_last=False)
        feats, short = [], 0
        for batch in tqdm(loader, desc=f"I3D features of {folder}", leave=False):
            whole = batch["n_frames"] == num_frames                   # StyleGAN-V discards short videos
            short += int((~whole).sum())
            if whole.any():
                feats.append(i3d_features(detector, batch["video"][whole], device))
        if short:
            warnings.warn(f"{short} videos in {folder} are shorter than {num_frames} frames and were left out")
        features[side] = torch.cat(feats).numpy() if feats else np.zeros((0, 1))
        counts[side] = len(features[side])
    fvd, reason = fvd_from_features(features["real"], features["fake"])
    if fvd is None:
        raise SystemExit(f"FVD unavailable: {reason}")
    print(f"FVD {fvd:.2f}  ({counts['real']} real / {counts['fake']} fake clips of {num_frames} frames at "
          f"{img_size}x{img_size}; StyleGAN-V's I3D; FVD on few clips is biased upward)")
    result = dict(fvd=fvd, real=os.path.abspath(args.real), fake=os.path.abspath(args.fake),
                  real_clips=counts["real"], fake_clips=counts["fake"], num_frames=num_frames, img_size=img_size,
                  date=datetime.datetime.now().isoformat(timespec="seconds"), device=describe(device))
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "fvd.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def describe(device):
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


@torch.no_grad()
def evaluate_command(args, device):
    # the model and the clips it is evaluated on
    if not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist; train one with `python tokenizer.py` "
                                f"or pass --ckpt PATH")
    model, ckpt = T.load_tokenizer(args.ckpt, device)
    cfg = model.config
    model_frames = cfg.num_frames
    num_frames = args.num_frames or model_frames
    if num_frames > model_frames:
        raise ValueError(f"--num_frames {num_frames} is longer than the {model_frames} frames this model was "
                         f"trained on (its time positions and the triplane's time axis cover {model_frames}); "
                         f"pass --num_frames {model_frames} or less")
    data_dir = args.data or ckpt.get("data", "")
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data folder {data_dir!r} (from {'--data' if args.data else args.ckpt}) does "
                                f"not exist; pass --data DIR with the videos to evaluate on")
    val_fraction = ckpt.get("train_config", {}).get("val_fraction", 0.1)  # the held-out files of training
    dataset = D.VideoDataset(data_dir, cfg.img_size, num_frames, split=args.split, random_start=False,
                             val_fraction=val_fraction)
    if len(dataset) == 0:
        raise ValueError(f"the {args.split!r} split of {data_dir} has no clips (val_fraction {val_fraction}); "
                         f"add videos, or pass --split all")
    if args.num_clips:
        dataset = torch.utils.data.Subset(dataset, range(min(args.num_clips, len(dataset))))
    loader = D.make_loader(dataset, args.batch_size, shuffle=False, num_workers=args.num_workers,
                           distributed=False, infinite=False, drop_last=False)
    lpips, lpips_reason = load_lpips(args.lpips_vgg, args.lpips_lin, device)
    detector, fvd_reason = load_i3d(args.i3d, device)

    sums = dict(psnr=0.0, ssim=0.0, lpips=0.0)
    real_frames, clips, model_seconds = 0, 0, 0.0
    real_feats, recon_feats = [], []
    preview = None
    for batch in tqdm(loader, desc=f"evaluating {len(dataset)} clips", dynamic_ncols=True):
        clip_u8 = batch["video"]                                      # (B, Tc, S, S, 3) uint8, Tc = num_frames
        n_frames = batch["n_frames"].clamp(max=num_frames)            # (B,) real frames
        video = D.from_uint8(clip_u8.to(device))               # (B, Tc, S, S, 3) in [-1, 1]
        padded = F.pad(video, (0, 0, 0, 0, 0, 0, 0, model_frames - num_frames))  # (B, T, S, S, 3)
        # the padding mask only when a clip is short of the model's length (as in training)
        short = bool((n_frames < model_frames).any())
        t0 = time.perf_counter()
        with T.autocast(device):
            triplane = model.encode(padded, n_frames.to(device) if short else None)
            recon = model.decode_video(triplane)[:, :num_frames].float()  # (B, Tc, S, S, 3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_seconds += time.perf_counter() - t0

        real = (torch.arange(num_frames)[None, :] < n_frames[:, None]).to(device)  # (B, Tc)
        sums["psnr"] += T.psnr_per_frame(recon, video)[real].sum().item()
        sums["ssim"] += ssim_per_frame(recon, video)[real].sum().item()
        if lpips is not None:
            sums["lpips"] += lpips_per_frame(lpips, recon, video)[real].sum().item()
        real_frames += int(real.sum())
        clips += len(n_frames)
        recon_u8 = D.to_uint8(recon).cpu()
        if detector is not None:
            whole = n_frames == num_frames                            # rFVD on whole clips only
            try:
                if whole.any():
                    real_feats.append(i3d_features(detector, clip_u8[whole], device))
                    recon_feats.append(i3d_features(detector, recon_u8[whole], device))
            except Exception as e:  # e.g. a clip too short or small for I3D's kernels
                real_feats, recon_feats = [], []
                detector, fvd_reason = None, (f"the I3D detector failed on clips of {num_frames} frames at "
                                              f"{cfg.img_size}x{cfg.img_size} ({type(e).__name__}: {e})")
        if preview is None:
            preview = (clip_u8[:PREVIEW_CLIPS], recon_u8[:PREVIEW_CLIPS], n_frames[:PREVIEW_CLIPS])

    metrics = {k: v / real_frames for k, v in sums.items()}
    unavailable = {}
    if lpips is None:
        metrics["lpips"], unavailable["lpips"] = None, lpips_reason
    rfvd_clips = sum(len(f) for f in real_feats)
    metrics["rfvd"] = None
    if detector is not None:
        metrics["rfvd"], reason = fvd_from_features(torch.cat(real_feats).numpy() if real_feats else [],
                                                    torch.cat(recon_feats).numpy() if recon_feats else [])
        if reason:
            unavailable["rfvd"] = reason
    else:
        unavailable["rfvd"] = fvd_reason
    counts = token_counts(model, num_frames)
    throughput = clips / model_seconds

    # report: the table, eval.json, the previews
    def show(name, fmt):
        return fmt.format(metrics[name]) if metrics[name] is not None else f"unavailable: {unavailable[name]}"

    rows = [("clips", f"{clips} ({args.split} split of {data_dir})"),
            ("frames per clip", f"{num_frames}" + (f" (model: {model_frames})" if num_frames != model_frames else "")
             + (f"; {real_frames} real frames evaluated" if real_frames != clips * num_frames else "")),
            ("resolution", f"{cfg.img_size}x{cfg.img_size}"),
            ("PSNR", show("psnr", "{:.2f} dB")),
            ("SSIM", show("ssim", "{:.4f}")),
            ("LPIPS", show("lpips", "{:.4f}")),
            ("rFVD", show("rfvd", "{:.1f}") + (f" ({rfvd_clips} clips)" if metrics["rfvd"] is not None else ""))]
    rows += token_rows(counts)
    rows.append(("encode + decode", f"{throughput:.2f} clips/s on {describe(device)}"))
    step = ckpt.get("step", "?")
    print_table(f"CoordTok evaluation of {args.ckpt} (step {step})", rows)

    os.makedirs(args.out_dir, exist_ok=True)
    result = dict(
        checkpoint=os.path.abspath(args.ckpt), step=step, data=os.path.abspath(data_dir), split=args.split,
        date=datetime.datetime.now().isoformat(timespec="seconds"), device=describe(device),
        torch=torch.__version__, clips=clips, frames_per_clip=num_frames, model_frames=model_frames,
        real_frames=real_frames, resolution=[cfg.img_size, cfg.img_size], **metrics, rfvd_clips=rfvd_clips,
        unavailable=unavailable, tokens=counts, encode_decode_clips_per_s=throughput,
        i3d=dict(url=I3D_URL, kwargs=I3D_KWARGS, path=i3d_path(args.i3d)),
        model_config=dataclasses.asdict(cfg), train_config=ckpt.get("train_config"))
    with open(os.path.join(args.out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_previews(args.out_dir, *preview)
    print(f"wrote {os.path.join(args.out_dir, 'eval.json')}, recon.mp4 and recon.png")
    return result


def main(argv=None):
    args, model_flags = parse_args(argv)
    try:
        if args.tokens:
            return tokens_command(args, model_flags)
        device = T.pick_device(args.device)
        if args.fvd:
            return fvd_command(args, device)
        return evaluate_command(args, device)
    except (ValueError, FileNotFoundError, D.VideoReadError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
