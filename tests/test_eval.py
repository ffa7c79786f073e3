"""eval.py: metrics against scikit-image / scipy / closed forms, the I3D and LPIPS plumbing with stand-in
weights of the published layouts, `python eval.py` end to end, short clips, errors and the token table."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

import av
import numpy as np
import pytest
import scipy.linalg
import skimage.io
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import data as D
import eval as E
import metrics as M
import tokenizer as T
from conftest import (
    ENV,
    LPIPS_SCALE,
    LPIPS_SHIFT,
    LPIPS_TAPS,
    MICRO,
    MICRO_TOKENS,
    ROOT,
    VGG16_FEATURES,
    published_lpips_lin,
    published_vgg16,
)


class StandInI3D(torch.nn.Module):
    """Same call signature as StyleGAN-V's TorchScript I3D; refuses any other calling convention, and
    returns a few cheap statistics of the clip as its 'features'."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 5 or x.shape[1] != 3:
            raise ValueError("expected uint8 clips of shape (B, 3, T, H, W)")
        if not (rescale and resize and return_features):
            raise ValueError("expected rescale=True, resize=True, return_features=True")
        v = D.from_uint8(x)                                                    # (B, 3, T, H, W)
        motion = (v[:, :, 1:] - v[:, :, :-1]).abs().mean(dim=(2, 3, 4))      # (B, 3)
        texture = (v[:, :, :, 1:] - v[:, :, :, :-1]).abs().mean(dim=(2, 3, 4))
        return torch.cat([v.mean(dim=(2, 3, 4)), v.std(dim=(2, 3, 4)), motion, texture], dim=1)  # (B, 12)


class StandInI3DFailing(torch.nn.Module):
    """A detector that runs out of memory: a failure of the machine, which must stop the evaluation."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")


class StandInI3DNineFrames(torch.nn.Module):
    """A detector whose time kernel spans 9 frames, the length the real one should need (its time is halved
    three times before a 2-step average pool): shorter clips make PyTorch itself refuse them."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return F.avg_pool3d(D.from_uint8(x), (9, 1, 1)).mean(dim=(2, 3, 4))  # (B, 3)


def scripted(module, path):
    """Save a stand-in detector as TorchScript, the form StyleGAN-V publishes its I3D in."""
    torch.jit.save(torch.jit.script(module), str(path))
    return str(path)


def reference_lpips(vgg, lin, x, y):
    """LPIPS v0.1 computed the plain way: images (N, 3, H, W) in [-1, 1] -> (N,)."""
    shift, scale = (torch.tensor(v).view(1, 3, 1, 1) for v in (LPIPS_SHIFT, LPIPS_SCALE))

    def taps(image):
        h, out = (image - shift) / scale, []
        for layer in VGG16_FEATURES:
            if layer == "M":
                h = F.max_pool2d(h, 2)
                continue
            index = layer[0]
            h = F.relu(F.conv2d(h, vgg[f"features.{index}.weight"], vgg[f"features.{index}.bias"], padding=1))
            if index + 1 in LPIPS_TAPS:                                       # the ReLU's index
                out.append(h)
        return out

    distance = torch.zeros(len(x))
    for k, (fx, fy) in enumerate(zip(taps(x), taps(y))):
        fx, fy = (f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in (fx, fy))  # unit over channels
        distance += F.conv2d((fx - fy) ** 2, lin[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
    return distance


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Stand-in weight files, laid out in a torch hub cache as eval.py and tokenizer.py look for them."""
    hub = tmp_path_factory.mktemp("torch_home")
    checkpoints = hub / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.jit.save(torch.jit.script(StandInI3D()), str(checkpoints / "i3d_torchscript.pt"))
    torch.save(published_vgg16(), checkpoints / os.path.basename(M.VGG16_URL))
    torch.save(published_lpips_lin(), checkpoints / os.path.basename(M.LPIPS_LIN_URL))
    return {"torch_home": str(hub), "i3d": str(checkpoints / "i3d_torchscript.pt"),
            "vgg": str(checkpoints / os.path.basename(M.VGG16_URL)),
            "lin": str(checkpoints / os.path.basename(M.LPIPS_LIN_URL))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, micro_videos):
    """A micro tokenizer trained for a few steps by `python tokenizer.py`."""
    out_dir = tmp_path_factory.mktemp("ckpt")
    flags = [f"--{k}={v}" for k, v in MICRO.items()] + [
        "--batch_size=2", "--num_samples=32", "--num_workers=0", "--eval_clips=1", "--warmup_iters=1",
        "--max_iters=3", "--val_fraction=0.4", f"--data={micro_videos}", f"--out_dir={out_dir}"]
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), *flags],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    return str(out_dir / "tokenizer.pt")


def as_model_range(clip_uint8):
    return D.from_uint8(torch.from_numpy(clip_uint8))


def unit_frames(video):
    """(T, H, W, 3) tensor in [-1, 1] -> float64 numpy in [0, 1], clamped (the paper's convention)."""
    return ((video.double().clamp(-1, 1) + 1) / 2).numpy()


def reference_metrics(model, paths, num_frames, lpips=None):
    """Independent per-frame PSNR / SSIM (scikit-image) / LPIPS over the real frames of each clip, and the
    uint8 clips and reconstructions (StyleGAN-V's conversion) of the whole clips."""
    scores, whole_real, whole_recon = {"psnr": [], "ssim": [], "lpips": []}, [], []
    for path in paths:
        clip, n = D.read_clip(path, model.config.img_size, num_frames, start=0)
        video = torch.zeros(1, model.config.num_frames, *clip.shape[1:])
        video[0, :num_frames] = as_model_range(clip)
        with torch.no_grad():
            recon = model.decode_video(model.encode(video, torch.tensor([n])))[0, :num_frames]
        target = as_model_range(clip)
        for i in range(n):
            a, b = unit_frames(target[i]), unit_frames(recon[i])
            scores["psnr"].append(peak_signal_noise_ratio(a, b, data_range=1.0))
            scores["ssim"].append(structural_similarity(a, b, gaussian_weights=True, sigma=1.5, data_range=1.0,
                                                        use_sample_covariance=False, channel_axis=-1))
            if lpips is not None:
                to_image = lambda v: torch.from_numpy(v * 2 - 1).float().permute(2, 0, 1)[None]
                with torch.no_grad():
                    scores["lpips"].append(lpips(to_image(b), to_image(a)).item())
        if n == num_frames:
            whole_real.append(clip)
            whole_recon.append(D.to_uint8(recon).numpy())
    return {k: float(np.mean(v)) if v else None for k, v in scores.items()}, whole_real, whole_recon


def scipy_fvd(real_feats, fake_feats):
    """The Frechet distance as StyleGAN-V writes it, with scipy's general matrix square root."""
    mu1, mu2 = real_feats.mean(0), fake_feats.mean(0)
    s1, s2 = np.cov(real_feats, rowvar=False, bias=True), np.cov(fake_feats, rowvar=False, bias=True)
    root = scipy.linalg.sqrtm(s2 @ s1)
    return float(np.real(((mu2 - mu1) ** 2).sum() + np.trace(s1 + s2 - 2 * root)))


def standin_features(clips):
    """uint8 clips (N, T, H, W, 3) through the stand-in detector, called by hand the StyleGAN-V way."""
    x = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).contiguous()
    return StandInI3D()(x, rescale=True, resize=True, return_features=True).double().numpy()


# -----------------------------------------------------------------------------
# the metrics


def test_frechet_distance_closed_form_for_diagonal_covariances():
    # diagonal Gaussians: FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 4, 20), rng.uniform(0.1, 4, 20)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # one dimension, hand-computed: (1 - 4)^2 + (sqrt(9) - sqrt(1))^2 = 9 + 4
    assert M.frechet_distance([1.0], [[9.0]], [4.0], [[1.0]]) == pytest.approx(13.0, abs=1e-10)
    # a rotation of both covariances changes nothing
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    rotated = M.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("n_real, n_fake, dim", [(300, 200, 24), (10, 14, 40)])  # full rank; fewer clips than features
def test_fvd_of_features_matches_scipy_sqrtm(n_real, n_fake, dim):
    rng = np.random.default_rng(n_real)
    real = rng.normal(size=(n_real, dim)) @ rng.normal(size=(dim, dim))
    fake = rng.normal(size=(n_fake, dim)) @ rng.normal(size=(dim, dim)) * 0.7 + 0.5
    mean, cov = M.feature_stats(real)
    np.testing.assert_allclose(cov, np.cov(real, rowvar=False, bias=True), rtol=1e-10, atol=1e-10)  # population
    fvd, reason = M.fvd_from_features(real, fake)
    assert reason == "" and fvd == pytest.approx(scipy_fvd(real, fake), rel=1e-6)
    assert M.fvd_from_features(real, real)[0] == pytest.approx(0.0, abs=1e-6 * np.trace(cov))
    assert M.fvd_from_features(real[:1], fake)[0] is None                      # undefined for one clip


def decoded_pair(tmp_path, size=40, frames=6):
    """Frames of a synthetic video decoded from mp4, and a noisy copy written to mp4 and decoded back."""
    D.make_synthetic(str(tmp_path / "set"), num_classes=1, videos_per_class=1, num_frames=frames, size=48, seed=2)
    clip, _ = D.read_clip(D.find_videos(str(tmp_path / "set"))[0][0], size, frames, start=0)
    noise = np.random.default_rng(0).normal(0, 18, clip.shape)
    D.write_video(str(tmp_path / "noisy.mp4"), np.clip(clip + noise, 0, 255).astype(np.uint8))
    noisy, _ = D.read_clip(str(tmp_path / "noisy.mp4"), size, frames, start=0)
    return clip, noisy


def test_psnr_and_ssim_match_scikit_image_on_decoded_frames(tmp_path):
    clip, noisy = decoded_pair(tmp_path)
    target, pred = as_model_range(clip)[None], as_model_range(noisy)[None]      # (1, T, H, W, 3)
    pred[0, 0, :4] = 1.7                                                       # out of range: clamped first
    ssim = M.ssim_per_frame(pred, target)[0].numpy()
    psnr = M.psnr_per_frame(pred, target)[0].numpy()
    for i in range(clip.shape[0]):
        a, b = unit_frames(target[0, i]), unit_frames(pred[0, i])
        ref_ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=1.0, channel_axis=-1)
        assert ssim[i] == pytest.approx(ref_ssim, abs=1e-4)
        assert psnr[i] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)
    assert 0.3 < ssim.mean() < 0.95                                           # a real, imperfect pair
    assert M.ssim_per_frame(target, target).numpy() == pytest.approx(1.0, abs=1e-6)


def test_ssim_refuses_frames_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim_per_frame(torch.zeros(1, 2, 8, 8, 3), torch.zeros(1, 2, 8, 8, 3))


def test_lpips_loads_the_published_layout_and_matches_the_plain_computation(weights, tmp_path):
    lpips, reason = M.load_lpips(weights["vgg"], weights["lin"], torch.device("cpu"))
    assert lpips is not None, reason
    # every published key is used, with its tensor; the classifier is not
    vgg, lin = torch.load(weights["vgg"]), torch.load(weights["lin"])
    used = {k: v for k, v in {**vgg, **lin}.items() if not k.startswith("classifier.")}
    loaded = lpips.state_dict()
    assert set(loaded) == set(used) | {"shift", "scale"}
    for key, value in used.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    # per frame, the distance LPIPS v0.1 defines, computed from the same weights
    clip, noisy = decoded_pair(tmp_path, size=32, frames=3)
    target = as_model_range(clip)[None].repeat(2, 1, 1, 1, 1)                 # (2, 3, 32, 32, 3)
    pred = as_model_range(noisy)[None].repeat(2, 1, 1, 1, 1)
    pred[1] = target[1]                                                        # clip 2 is perfect
    scores = M.frame_metrics(lpips)["lpips"][2](pred, target)                   # (2, 3)
    assert scores.shape == (2, 3)
    frames = lambda v: v[0].permute(0, 3, 1, 2)                               # (3, 3, 32, 32)
    expected = reference_lpips(vgg, lin, frames(pred), frames(target))
    assert (expected > 1e-3).all()
    torch.testing.assert_close(scores[0], expected, rtol=1e-4, atol=1e-6)
    assert scores[1].abs().max() < 1e-6                                        # identical frames: zero


def test_missing_lpips_weights_say_how_to_supply_them(weights, tmp_path):
    missing, reason = M.load_lpips(str(tmp_path / "no_vgg.pth"), weights["lin"], torch.device("cpu"))
    assert missing is None and "with --lpips_vgg" in reason and "vgg16-397923af.pth" in reason


# -----------------------------------------------------------------------------
# FVD between folders, and the detector's plumbing


def test_num_clips_spreads_over_the_folder_not_its_first_class(micro_videos):
    # six videos sorted by class, three per class: the first three would all be class 0
    labels = torch.cat([b["label"] for b in E.clip_loader(micro_videos, 24, 10, num_clips=3, batch_size=2)])
    assert sorted(labels.tolist()) == [0, 0, 1] or sorted(labels.tolist()) == [0, 1, 1]
    every = torch.cat([b["label"] for b in E.clip_loader(micro_videos, 24, 10, num_clips=99)])
    assert every.tolist() == [0, 0, 0, 1, 1, 1]


def test_fvd_between_folders_with_a_stand_in_detector(tmp_path, micro_videos, weights):
    # fakes: the real videos with noise, plus one video shorter than the clip (left out, as in StyleGAN-V)
    real_paths = [p for p, _ in D.find_videos(micro_videos)]
    rng = np.random.default_rng(3)
    fakes = []
    for i, path in enumerate(real_paths):
        clip, _ = D.read_clip(path, 24, 10, start=0)
        fake = np.clip(clip + rng.normal(0, 25, clip.shape), 0, 255).astype(np.uint8)
        D.write_video(str(tmp_path / "fake" / "gen" / f"{i}.mp4"), fake)
    D.write_video(str(tmp_path / "fake" / "gen" / "short.mp4"), fake[:4])
    for path, _ in D.find_videos(str(tmp_path / "fake")):
        clip, n = D.read_clip(path, 24, 10, start=0)
        if n == 10:
            fakes.append(clip)
    # the videos are exactly 10 frames long, so every clip starts at frame 0 on both sides
    reals = [D.read_clip(p, 24, 10, start=0)[0] for p in real_paths]
    result = E.main(["--fvd", "--real", micro_videos, "--fake", str(tmp_path / "fake"), "--i3d", weights["i3d"],
                     "--num_workers=0", "--batch_size=4", f"--out_dir={tmp_path / 'out'}"])
    assert (result["num_frames"], result["frame_size"]) == (10, [24, 24])      # taken from the first fake video
    assert result["real_clips"] == 6 and result["fake_clips"] == 6
    expected = scipy_fvd(standin_features(reals), standin_features(fakes))
    assert result["fvd"] == pytest.approx(expected, rel=1e-5)
    assert json.loads((tmp_path / "out" / "fvd.json").read_text())["fvd"] == pytest.approx(expected, rel=1e-5)
    given = E.main(["--fvd", "--real", micro_videos, "--fake", str(tmp_path / "fake"), "--i3d", weights["i3d"],
                    "--num_workers=0", "--num_frames=10", "--img_size=24", f"--out_dir={tmp_path / 'out'}"])
    assert (given["num_frames"], given["frame_size"], given["fvd"]) == (10, [24, 24], pytest.approx(expected, rel=1e-5))


def test_detector_is_called_the_stylegan_v_way(weights):
    detector, reason = E.load_i3d(weights["i3d"], torch.device("cpu"))
    assert detector is not None, reason
    clips = torch.randint(0, 256, (3, 5, 16, 16, 3), dtype=torch.uint8)
    feats = M.i3d_features(detector, clips, torch.device("cpu"))              # raises if not uint8 (B, 3, T, H, W)
    assert feats.dtype == torch.float64 and feats.shape == (3, 12)
    np.testing.assert_allclose(feats.numpy(), standin_features(list(clips.numpy())), rtol=1e-6)
    # StyleGAN-V's conversion of generated frames: x * 127.5 + 128, clamped, truncated
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
    assert D.to_uint8(x).tolist() == [0, 0, 0, 128, 191, 255, 255]


def test_missing_detector_says_where_to_put_it(tmp_path):
    detector, reason = E.load_i3d(str(tmp_path / "nope.pt"), torch.device("cpu"))
    assert detector is None
    assert "i3d_torchscript.pt with --i3d" in reason and str(tmp_path / "nope.pt") in reason


def test_detector_takes_i3d_batch_clips_per_call_with_the_same_features(weights):
    detector, _ = E.load_i3d(weights["i3d"], torch.device("cpu"))
    calls = []

    class Recording(torch.nn.Module):
        def forward(self, x, **kwargs):
            calls.append(len(x))
            return detector(x, **kwargs)

    clips = torch.randint(0, 256, (5, 4, 16, 16, 3), dtype=torch.uint8)
    at_once = M.i3d_features(detector, clips, torch.device("cpu"), i3d_batch=5)
    for i3d_batch, expected_calls in ((1, [1] * 5), (2, [2, 2, 1])):
        calls.clear()
        chunked = M.i3d_features(Recording(), clips, torch.device("cpu"), i3d_batch)
        assert calls == expected_calls
        torch.testing.assert_close(chunked, at_once, rtol=1e-12, atol=1e-12)
    assert E.parse_args([])[0].i3d_batch == 1                                 # StyleGAN-V's one clip per call


def test_a_failing_detector_stops_the_evaluation_but_too_short_clips_are_unavailable(tmp_path, checkpoint, weights,
                                                                                    micro_videos):
    common = ["--ckpt", checkpoint, "--lpips_vgg", weights["vgg"], "--lpips_lin", weights["lin"], "--num_workers=0",
              f"--out_dir={tmp_path / 'out'}"]
    with pytest.raises(Exception, match="CUDA out of memory"):
        E.main(common + ["--i3d", scripted(StandInI3DFailing(), tmp_path / "oom.pt")])
    assert not (tmp_path / "out" / "eval.json").exists()
    # the checkpoint's clips are 8 frames: too short for a 9-frame kernel, which is the clips' limit, not a fault
    nine = scripted(StandInI3DNineFrames(), tmp_path / "nine.pt")
    result = E.main(common + ["--i3d", nine])
    assert result["rfvd"] is None and result["rfvd_clips"] == 0
    assert "cannot take clips of 8 frames" in result["unavailable"]["rfvd"]
    assert "smaller than kernel size" in result["unavailable"]["rfvd"]
    assert math.isfinite(result["psnr"]) and math.isfinite(result["lpips"])
    with pytest.raises(SystemExit, match="cannot take clips of 8 frames"):
        E.main(["--fvd", "--real", micro_videos, "--fake", micro_videos, "--num_frames", "8", "--i3d", nine,
                "--num_workers=0", f"--out_dir={tmp_path / 'out'}"])


def test_lossless_fake_clips_reach_the_detector_unchanged_and_h264_ones_do_not(tmp_path, micro_videos, weights):
    detector, _ = E.load_i3d(weights["i3d"], torch.device("cpu"))
    clips = np.stack([D.read_clip(p, 24, 10, start=0)[0] for p, _ in D.find_videos(micro_videos)[:3]])
    for i, clip in enumerate(clips):                                           # (10, 24, 24, 3) uint8 each
        D.write_video(str(tmp_path / "lossless" / "gen" / f"{i}.mkv"), clip, lossless=True)
        D.write_video(str(tmp_path / "h264" / "gen" / f"{i}.mp4"), clip)
    direct = M.i3d_features(detector, torch.from_numpy(clips), torch.device("cpu")).numpy()
    lossless = E.folder_features(detector, str(tmp_path / "lossless"), 10, 24, torch.device("cpu"))
    np.testing.assert_array_equal(lossless, direct)
    h264 = E.folder_features(detector, str(tmp_path / "h264"), 10, 24, torch.device("cpu"))
    assert h264.shape == direct.shape and np.abs(h264 - direct).max() > 1e-3


# -----------------------------------------------------------------------------
# evaluating a tokenizer


def test_python_eval_py_end_to_end(tmp_path, checkpoint, micro_videos, weights):
    # `python eval.py`: out/tokenizer.pt of the working directory, its training data's held-out clips, and the
    # weights found in the torch hub cache (seeded with stand-ins: nothing downloads), but torchvision's VGG16,
    # whose name carries the hash of its content: a stand-in there is refused, so it is given by path
    (tmp_path / "out").mkdir()
    shutil.copy(checkpoint, tmp_path / "out" / "tokenizer.pt")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--lpips_vgg", weights["vgg"]],
                         cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**ENV, "TORCH_HOME": weights["torch_home"]})
    assert run.returncode == 0, run.stderr[-3000:]
    for row in ("clips", "frames per clip", "resolution", "PSNR", "SSIM", "LPIPS", "rFVD", "tokens per clip",
                "floats per clip", "vs raw pixels", "vs a 4x8x8 3D latent grid"):
        assert row in run.stdout
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    val_paths = [p for p, _ in D.VideoDataset(micro_videos, 16, 8, split="val", val_fraction=0.4).files]
    assert result["clips"] == len(val_paths) == 2 and result["frames_per_clip"] == 8
    assert result["data"] == os.path.abspath(micro_videos) and result["checkpoint"].endswith("tokenizer.pt")
    assert result["tokens"]["tokens"] == MICRO_TOKENS and result["tokens"]["floats"] == MICRO_TOKENS * 4
    assert result["tokens"]["raw_floats"] == 8 * 16 * 16 * 3 and result["tokens"]["grid_tokens"] == 2 * 2 * 2
    assert all(math.isfinite(result[k]) for k in ("psnr", "ssim", "lpips", "rfvd")), result["unavailable"]
    assert f"({result['rfvd_clips']} clips)" in run.stdout and result["rfvd_clips"] == 2
    model, _ = T.load_tokenizer(checkpoint)
    assert result["model_config"] == dataclasses.asdict(model.config) and result["date"] and result["device"]
    # the figures are the ones computed independently, frame by frame
    lpips = M.LPIPS.from_pretrained(weights["vgg"], weights["lin"])
    ref, reals, recons = reference_metrics(model, val_paths, 8, lpips)
    for k in ("psnr", "ssim", "lpips"):
        assert result[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), k
    assert result["rfvd"] == pytest.approx(scipy_fvd(standin_features(reals), standin_features(recons)), rel=1e-3)
    # side-by-side video: both clips stacked, input | reconstruction, every frame
    with av.open(str(tmp_path / "out" / "recon.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    assert len(frames) == 8 and frames[0].shape == (2 * 16, 2 * 16, 3)
    left = frames[0][:16, :16].astype(float)
    assert np.abs(left - reals[0][0]).mean() < 12                             # the left half is the input
    grid = skimage.io.imread(str(tmp_path / "out" / "recon.png"))      # per clip: input, reconstruction, error
    assert grid.shape == (2 * 3 * 16, 8 * 16, 3)
    np.testing.assert_array_equal(grid[:16, :16], reals[0][0])
    # (the reconstruction may differ by one level where batching changes the float rounding)
    assert np.abs(grid[16:32, :16].astype(int) - recons[0][0].astype(int)).max() <= 1
    error = np.abs(reals[0][0].astype(int) - recons[0][0].astype(int)) * 4
    assert np.abs(grid[32:48, :16].astype(int) - np.clip(error, 0, 255)).max() <= 4


def test_unavailable_metrics_are_null_with_a_reason_and_the_rest_still_runs(tmp_path, checkpoint):
    missing = str(tmp_path / "missing.pt")
    result = E.main(["--ckpt", checkpoint, "--i3d", missing, "--lpips_vgg", missing, "--lpips_lin", missing,
                     "--num_workers=0", f"--out_dir={tmp_path}"])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["lpips"] is None and saved["rfvd"] is None
    assert "with --lpips_vgg" in saved["unavailable"]["lpips"]
    assert "with --i3d" in saved["unavailable"]["rfvd"]
    assert math.isfinite(saved["psnr"]) and math.isfinite(saved["ssim"]) and result["clips"] == 2


def test_short_clips_count_their_real_frames_only(tmp_path, checkpoint, weights):
    # one video of 5 frames and one of 10: the model's clip is 8 frames
    data_dir = tmp_path / "data"
    D.make_synthetic(str(data_dir / "a"), num_classes=1, videos_per_class=1, num_frames=5, size=24, seed=4)
    D.make_synthetic(str(data_dir / "b"), num_classes=1, videos_per_class=1, num_frames=10, size=24, seed=5)
    paths = [p for p, _ in D.find_videos(str(data_dir))]
    model, _ = T.load_tokenizer(checkpoint)
    common = ["--ckpt", checkpoint, "--data", str(data_dir), "--split", "all", "--i3d", weights["i3d"],
              "--lpips_vgg", weights["vgg"], "--lpips_lin", weights["lin"], "--num_workers=0"]
    result = E.main(common + [f"--out_dir={tmp_path / 'out8'}"])
    assert result["real_frames"] == 5 + 8 and result["clips"] == 2
    ref, _, _ = reference_metrics(model, paths, 8)
    assert result["psnr"] == pytest.approx(ref["psnr"], rel=1e-4)
    assert result["ssim"] == pytest.approx(ref["ssim"], rel=1e-4, abs=1e-5)
    # rFVD takes whole clips only: one here, too few for a covariance, so it says so
    assert result["rfvd"] is None and result["rfvd_clips"] == 1 and "at least 2 clips" in result["unavailable"]["rfvd"]
    # a clip length shorter than the model's: padded, masked, and only its frames scored
    result = E.main(common + ["--num_frames", "4", f"--out_dir={tmp_path / 'out4'}"])
    assert result["frames_per_clip"] == 4 and result["real_frames"] == 4 + 4
    ref, _, _ = reference_metrics(model, paths, 4)
    assert result["psnr"] == pytest.approx(ref["psnr"], rel=1e-4)
    assert result["tokens"]["raw_floats"] == 4 * 16 * 16 * 3
    with pytest.raises(SystemExit, match="--num_frames 16 is longer than the model's 8 frames"):
        E.main(common + ["--num_frames", "16"])


def test_bad_checkpoints_and_data_are_clear_errors(tmp_path, checkpoint):
    with pytest.raises(SystemExit, match="does not exist.*python tokenizer.py"):
        E.main(["--ckpt", str(tmp_path / "nope.pt")])
    torch.save({"kind": "coordtok_dit"}, tmp_path / "dit.pt")
    with pytest.raises(SystemExit, match="not a 'coordtok_tokenizer' checkpoint"):
        E.main(["--ckpt", str(tmp_path / "dit.pt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no readable video in .*empty"):
        E.main(["--ckpt", checkpoint, "--data", str(tmp_path / "empty"), "--num_workers=0"])
    with pytest.raises(SystemExit, match="does not exist"):
        E.main(["--ckpt", checkpoint, "--data", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="--real folder .*nowhere.* does not exist"):
        E.main(["--fvd", "--real", str(tmp_path / "nowhere"), "--fake", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="FVD unavailable: .*with --i3d"):
        E.main(["--fvd", "--real", str(tmp_path), "--fake", str(tmp_path), "--i3d", str(tmp_path / "no.pt")])
    with pytest.raises(SystemExit):
        E.main(["--i3d_batch", "0"])


def test_a_checkpoint_without_training_metadata_needs_data_and_scores_every_clip(tmp_path, checkpoint, micro_videos,
                                                                               weights, capsys):
    # as the authors' release: weights and config, but no data folder, training split or step
    bare = {k: v for k, v in torch.load(checkpoint, weights_only=False).items()
            if k not in ("data", "train_config", "step")}
    torch.save(bare, tmp_path / "bare.pt")
    with pytest.raises(SystemExit, match="names no data; pass --data DIR"):
        E.main(["--ckpt", str(tmp_path / "bare.pt")])
    flags = ["--data", micro_videos, "--i3d", weights["i3d"], "--lpips_vgg", weights["vgg"], "--lpips_lin",
             weights["lin"], "--num_workers=0", "--num_clips=3", f"--out_dir={tmp_path}"]
    capsys.readouterr()
    result = E.main(["--ckpt", str(tmp_path / "bare.pt")] + flags)
    out = capsys.readouterr().out
    assert result["split"] == "all" and result["clips"] == 3 and result["step"] is None
    assert "all split of" in out and "no training split" in out and "(step" not in out
    assert all(math.isfinite(result[k]) for k in ("psnr", "ssim", "lpips", "rfvd"))
    # our own checkpoints keep the held-out clips as the default
    assert E.main(["--ckpt", checkpoint] + flags)["split"] == "val"


# -----------------------------------------------------------------------------
# the token table


def test_token_table_of_the_paper_configuration(capsys):
    start = time.perf_counter()
    counts = E.main(["--tokens", "--preset", "large"])
    assert time.perf_counter() - start < 5                                     # meta device: no weights made
    out = capsys.readouterr().out
    assert counts["tokens"] == 1280 and counts["floats"] == 1280 * 8
    assert counts["raw_floats"] == 128 ** 3 * 3 and counts["grid_tokens"] == 8192
    assert E.grid_latent_shape(128, 128) == (E.GRID_CHANNELS, 32, 16, 16)
    assert E.grid_latent_shape(10, 20, channels=8) == (8, 3, 3, 3)            # a partial block still makes a latent
    assert "1280" in out and "8192 tokens" in out and "614.4x compression" in out
    # the paper's larger triplane (Rs = 32): 32*32 + 2*32*32 = 3072 tokens
    assert E.main(["--tokens", "--preset", "large", "--triplane_rs", "32"])["tokens"] == 3072


# -----------------------------------------------------------------------------
# a user's own video, whole; the yardsticks; evaluation under torchrun


def read_all(path, size):
    info = D.probe_video(path)
    return D.read_clip(path, size, info["n_frames"], 0, info=info)[0]


def test_a_whole_video_comes_back_frame_for_frame_with_its_figures(tmp_path, checkpoint, weights):
    video = D.make_ucf_like_video(str(tmp_path / "my clip.avi"), num_frames=125, loops=2)  # 250 frames
    model, _ = T.load_tokenizer(checkpoint)
    lpips = ["--lpips_vgg", weights["vgg"], "--lpips_lin", weights["lin"]]
    results = E.main(["--ckpt", checkpoint, "--video", video, "--format", "lossless", "--batch_size=4", *lpips,
                      f"--out_dir={tmp_path / 'out'}"])
    (result,) = results
    assert 0 < result["lpips"] and 0 < result["windows"][0]["lpips"]
    lpips = ["--lpips_vgg", str(tmp_path / "none"), "--lpips_lin", str(tmp_path / "none")]  # from here on
    assert sorted(os.listdir(tmp_path / "out")) == ["my_clip_recon.json", "my_clip_recon.mkv",
                                                    "my_clip_side_by_side.mp4"]
    assert result["frames"] == 250 and D.probe_video(str(tmp_path / "out" / "my_clip_recon.mkv"))["n_frames"] == 250
    # windows of the model's 8 frames back to back, the last ending at the last frame
    assert [w["start"] for w in result["windows"]] == list(range(0, 241, 8)) + [242]
    assert result["tokens"] == 32 * MICRO_TOKENS and result["tokens_per_window"] == MICRO_TOKENS
    assert result["compression_vs_input"] == pytest.approx(250 * 320 * 240 * 3 / (32 * MICRO_TOKENS * 4))
    # the PSNR of the two files agrees with the JSON: the frames as written are the frames scored
    inputs, recon = read_all(video, 16), read_all(str(tmp_path / "out" / "my_clip_recon.mkv"), 16)
    frame_psnr = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(inputs, recon)]
    assert result["psnr"] == pytest.approx(np.mean(frame_psnr), abs=1e-4)
    assert result["windows"][3]["psnr"] == pytest.approx(np.mean(frame_psnr[24:32]), abs=1e-4)
    boundary = [i for s in range(8, 249, 8) for i in (s - 1, s)] + [241, 242]  # the joins; the last start
    assert result["boundary_psnr"] == pytest.approx(np.mean([frame_psnr[i] for i in sorted(set(boundary))]),
                                                    abs=1e-4)
    # each frame is its window's decoding (the last window's frames, shared, are averaged)
    clip = torch.from_numpy(inputs[16:24])[None]
    with torch.no_grad():
        window = D.to_uint8(model.decode_video(model.encode(D.from_uint8(clip)))).numpy()[0]
    assert np.abs(window.astype(int) - recon[16:24].astype(int)).max() <= 1
    # overlapping windows, blended: frame 6 is position 6 of window 0 and 2 of window 4, whose weights ramp up
    # and down over the 4 shared frames (min(j + 1, 8 - j, 5): 2 and 3)
    start = str(tmp_path / "start.mkv")  # its first 40 frames, at the model's size, losslessly
    D.write_video(start, inputs[:40], lossless=True)
    result = E.main(["--ckpt", checkpoint, "--video", start, "--overlap", "4", "--format", "lossless", *lpips,
                     f"--out_dir={tmp_path / 'ov'}"])[0]
    assert result["frames"] == 40 and [w["start"] for w in result["windows"]] == list(range(0, 33, 4))
    assert "lpips" not in result  # its weights are not at hand: PSNR and SSIM only
    blended = read_all(str(tmp_path / "ov" / "start_recon.mkv"), 16)
    with torch.no_grad():
        windows = [model.decode_video(model.encode(D.from_uint8(torch.from_numpy(inputs[s:s + 8])[None])))[0]
                   for s in (0, 4)]
    expected = D.to_uint8((2 * windows[0][6] + 3 * windows[1][2]) / 5).numpy()
    assert np.abs(blended[6].astype(int) - expected.astype(int)).max() <= 1
    # a video shorter than a window; the default (H.264) output
    short = str(tmp_path / "short.mp4")
    D.write_video(short, read_all(video, 32)[:5])
    result = E.main(["--ckpt", checkpoint, "--video", short, *lpips, f"--out_dir={tmp_path / 'short'}"])[0]
    assert result["frames"] == 5 and len(result["windows"]) == 1
    assert D.probe_video(str(tmp_path / "short" / "short_recon.mp4"))["n_frames"] == 5
    with pytest.raises(SystemExit, match="--overlap 8 must be below the model's 8 frames"):
        E.main(["--ckpt", checkpoint, "--video", short, "--overlap", "8", *lpips])
    with pytest.raises(SystemExit, match="--video .*nope.mp4 does not exist"):
        E.main(["--ckpt", checkpoint, "--video", str(tmp_path / "nope.mp4"), *lpips])


def test_videos_of_one_name_in_one_call_get_outputs_of_their_own(tmp_path, checkpoint):
    inputs = [tmp_path / "s1" / "clip.mp4", tmp_path / "s2" / "clip.mp4", tmp_path / "s3" / "CLIP.mp4",
              tmp_path / "видео.mp4", tmp_path / "動画.mp4"]                # the last two: both "_" once safe
    for k, path in enumerate(inputs):
        D.write_video(str(path), np.full((3, 16, 16, 3), 40 * k, np.uint8))
    none = ["--lpips_vgg", str(tmp_path / "none"), "--lpips_lin", str(tmp_path / "none")]
    results = E.main(["--ckpt", checkpoint, "--video", *map(str, inputs), *none, f"--out_dir={tmp_path / 'out'}"])
    stems = ["clip", "clip_2", "CLIP_3", "_", "__2"]
    assert [os.path.basename(r["outputs"][0]) for r in results] == [f"{s}_recon.mp4" for s in stems]
    assert len(os.listdir(tmp_path / "out")) == 3 * len(inputs)             # nothing replaced
    for stem, path in zip(stems, inputs):  # each output is its own input's
        assert json.loads((tmp_path / "out" / f"{stem}_recon.json").read_text())["video"] == str(path)
        first = D.read_clip(str(tmp_path / "out" / f"{stem}_side_by_side.mp4"), (16, 32), 1, 0)[0][0, :, :16]
        assert np.abs(first.astype(int) - D.read_clip(str(path), 16, 1, 0)[0][0]).max() <= 2
    with pytest.raises(SystemExit, match="--video .*s1 is a folder; pass video files"):
        E.main(["--ckpt", checkpoint, "--video", str(tmp_path / "s1"), *none])


def test_the_yardsticks_are_the_mean_frame_and_the_patch_blur():
    clip = torch.rand(2, 4, 8, 8, 3) * 2 - 1
    marks = M.yardsticks(clip, (1, 4, 4))
    assert torch.allclose(marks["temporal_mean"][:, 2], clip.mean(1))
    block = marks["patch_blur"][1, 3, 4:8, 0:4]                               # one 4x4 patch, one value each
    assert torch.allclose(block, clip[1, 3, 4:8, 0:4].mean(dim=(0, 1)).expand_as(block))


def test_two_processes_evaluate_what_one_does(tmp_path, checkpoint, micro_videos, weights):
    flags = ["--ckpt", checkpoint, "--data", micro_videos, "--split=all", "--num_workers=0", "--batch_size=2",
             "--i3d", weights["i3d"], "--lpips_vgg", weights["vgg"], "--lpips_lin", weights["lin"]]
    one = E.main([*flags, f"--out_dir={tmp_path / 'one'}"])
    two = run_eval(*flags, f"--out_dir={tmp_path / 'two'}", nproc=2)
    assert two["processes"] == 2 and one["clips"] == two["clips"] == 6 and one["rfvd_clips"] == two["rfvd_clips"]
    for k in ("psnr", "ssim", "lpips", "rfvd"):
        assert two[k] == pytest.approx(one[k], rel=1e-6), k
    assert two["yardsticks"] == pytest.approx(one["yardsticks"])


def run_eval(*flags, nproc=None):
    from conftest import run_script
    out = run_script("eval.py", *flags, nproc=nproc)
    assert out.returncode == 0, out.stderr[-3000:]
    out_dir = next(f.split("=", 1)[1] for f in flags if f.startswith("--out_dir="))
    return json.loads(open(os.path.join(out_dir, "eval.json")).read())
