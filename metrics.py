"""
The measures of a reconstruction, shared by training (its held-out evaluation, stage 2's LPIPS
loss) and eval.py: PSNR, SSIM and LPIPS per frame, the yardsticks, rFVD / FVD. A first reader may
skip this file; a metric added to `frame_metrics` shows in eval.py's table and in training's log.
"""

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from tqdm import tqdm

import data
import harness as H

I3D_KWARGS = dict(rescale=True, resize=True, return_features=True)
# The tf.hub I3D halves time three times and ends with a 2-step average pool: clips of 8 frames
# or fewer should be too short. PyTorch's own refusals of an input smaller than a kernel:
KERNEL_TOO_LARGE = ("smaller than kernel size", "Kernel size can't be greater",
                    "Output size is too small")
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
METRIC_CHUNK = 64  # frames per SSIM / LPIPS call: bounds memory on 128-frame clips


# -----------------------------------------------------------------------------
# per-frame metrics: clips (B, T, H, W, 3) in [-1, 1] -> (B, T)


def to_unit(video):
    """[-1, 1] -> [0, 1], clamped: every metric sees what a viewer would see."""
    return (video.float().clamp(-1, 1) + 1) / 2


def psnr_per_frame(pred, target):
    mse = (to_unit(pred) - to_unit(target)).pow(2).mean(dim=(2, 3, 4))
    return -10 * torch.log10(mse.clamp_min(1e-10))


def per_frame(image_metric, pred, target):
    """An image metric ((N, 3, H, W) x2 -> (N,)) on every frame of two clips -> (B, T)."""
    x, y = (rearrange(v, "b t h w c -> (b t) c h w") for v in (pred, target))
    scores = torch.cat([image_metric(x[i:i + METRIC_CHUNK], y[i:i + METRIC_CHUNK])
                        for i in range(0, len(x), METRIC_CHUNK)])
    return rearrange(scores, "(b t) -> b t", b=len(pred))


def ssim_images(x, y):
    """SSIM of images (N, 3, H, W) in [0, 1] -> (N,), scikit-image's: Gaussian-weighted moments,
    population covariance, the mean over channels and the windows inside the image (its crop of a
    reflect-padded filter). float64: a variance E[x^2] - E[x]^2 subtracts nearly equal numbers."""
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, "
                         f"got {x.shape[-2]}x{x.shape[-1]}.")
    x, y = x.double(), y.double()
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)                # (N, 15, H, W)
    offsets = torch.arange(SSIM_WINDOW, device=x.device).double() - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-offsets ** 2 / (2 * SSIM_SIGMA ** 2))  # 1D: the 2D window is its outer product
    g, k = g / g.sum(), moments.shape[1]
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
VGG16_CHANNELS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
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

    @classmethod
    def from_pretrained(cls, vgg_path="", lin_path=""):
        """torchvision's vgg16 (its layers up to relu5_3) and LPIPS v0.1's weights, from paths or
        fetched to the hub cache (torchvision's hash-checked), read as tensors only."""
        def load(url, path, flag):
            file = H.fetch(url, path, flag)
            try:
                return torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:
                raise H.WeightsUnavailable(f"{file} is not a weights file ({type(e).__name__}); "
                                           f"replace it with {url}.") from None
        vgg = load(VGG16_URL, vgg_path, "--lpips_vgg")
        lin = load(LPIPS_LIN_URL, lin_path, "--lpips_lin")
        lpips = cls()
        expected, state = lpips.state_dict(), {"shift": lpips.shift, "scale": lpips.scale}
        for given, prefix, name in ((vgg, "features.", "torchvision's vgg16 (--lpips_vgg)"),
                                    (lin, "lin", "LPIPS v0.1's vgg.pth (--lpips_lin)")):
            state.update({k: v for k, v in given.items() if k.startswith(prefix) and k in expected})
            wrong = [k for k in expected if k.startswith(prefix)
                     and (k not in state or state[k].shape != expected[k].shape)]
            if wrong:
                raise H.WeightsUnavailable(f"{name}: {wrong[0]} missing or reshaped, not the "
                                           f"published layout; pass the published file.")
        lpips.load_state_dict(state)
        return lpips.eval().requires_grad_(False)

    def forward(self, x, y):  # (N, 3, H, W) in [-1, 1] -> (N,)
        h, dist, k = torch.cat([x, y]).sub(self.shift).div(self.scale), 0.0, 0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in LPIPS_TAPS:
                fx, fy = (h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)).chunk(2)
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
    return {"psnr": ("PSNR", "{:.2f} dB", psnr_per_frame),
            "ssim": ("SSIM", "{:.4f}", ssim_per_frame), "lpips": ("LPIPS", "{:.4f}", lpips_fn)}


def yardsticks(target, patch_size):
    """What a tokenizer should beat, for clips (B, T, H, W, 3): each frame replaced by the clip's
    mean frame (blind to motion), or by its mean over each decoder patch (no detail inside one)."""
    _, ph, pw = patch_size
    frames = rearrange(target, "b t h w c -> (b t) c h w")
    blur = F.interpolate(F.avg_pool2d(frames, (ph, pw)), scale_factor=(ph, pw), mode="nearest")
    return {"temporal_mean": target.mean(1, keepdim=True).expand_as(target),
            "patch_blur": rearrange(blur, "(b t) c h w -> b t h w c", b=len(target))}


# -----------------------------------------------------------------------------
# FVD: I3D features of whole clips, and the Frechet distance of two Gaussians


class ClipsTooShortForI3D(ValueError):
    """The detector refused clips smaller than one of its kernels (see KERNEL_TOO_LARGE)."""


@torch.no_grad()
def i3d_features(detector, clips, device, i3d_batch=1):
    """uint8 clips (B, T, H, W, 3) -> float64 I3D features (B, F), or ClipsTooShortForI3D."""
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


def feature_stats(features):
    """Mean (F,) and population covariance (F, F) of features (N, F), float64."""
    features = np.asarray(features, dtype=np.float64)
    centred = features - features.mean(axis=0)
    return features.mean(axis=0), centred.T @ centred / features.shape[0]


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)). The trace term sums
    the square roots of the eigenvalues of S sigma2 S (S = sigma1^(1/2)), symmetric and similar to
    sigma1 sigma2: real, rounding's negative zeros clamped (scipy's sqrtm can come out complex)."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
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
# reconstructing clips and scoring them


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
    """Per-frame metrics and the yardsticks' PSNR over every real frame, and rFVD of whole clips
    against their reconstructions, all ranks gathered -> (eval.json's figures, why rFVD failed)."""
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
                for side, videos in zip(features, (clips, data.to_uint8(recon).cpu())):
                    side.append(i3d_features(detector, videos[whole], device, i3d_batch))
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
    mean = {k: v / sums["real_frames"] for k, v in sums.items()}  # per real frame
    figures = {name: mean[name] if metric else None for name, (_, _, metric) in metrics.items()}
    return dict(figures, rfvd=rfvd, rfvd_clips=len(real_f), clips=int(sums["clips"]),
                real_frames=int(sums["real_frames"]),
                yardsticks={k: mean[f"{k}_psnr"] for k in ("temporal_mean", "patch_blur")},
                encode_decode_clips_per_s=sums["clips"] / sums["seconds"]), reason
