"""
Evaluate a CoordTok tokenizer the way the paper reports it: PSNR, SSIM and LPIPS per frame, rFVD
on whole clips, and how many tokens a clip becomes; reconstruct whole videos of any length.

  python eval.py                                  # out/tokenizer.pt on its held-out clips
  python eval.py --ckpt coordtok_ucf101 --data UCF-101_test     # the authors' tokenizer, by name
  torchrun --nproc_per_node=8 eval.py --ckpt out/stage2/tokenizer.pt   # each rank a share
  python eval.py --video my.mp4 other.mkv --overlap 4    # whole videos back, with their figures
  python eval.py --tokens --preset large          # the token table of a preset (1280 tokens)
  python eval.py --fvd --real DIR --fake DIR      # FVD between two folders (sample.py's output)
  python eval.py --curves out/                    # the curves of the runs in out/ (SVG)

Writes out/eval.json, recon.mp4 (input | reconstruction) and recon.png; --video writes
<stem>_recon.mp4 (.mkv with --format lossless), <stem>_side_by_side.mp4 and <stem>_recon.json.
rFVD / FVD are StyleGAN-V's, biased upward on few clips: the count is printed beside. A metric
without its weights (fetched, or --i3d / --lpips_vgg / --lpips_lin) says why, null in the JSON.
"""

import argparse
import dataclasses
import glob
import itertools
import json
import math
import os
import time
import warnings

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

import data
import harness as H
import metrics as M
from tokenizer import PRESETS, CoordTok, CoordTokConfig, load_tokenizer

# StyleGAN-V's detector, called as its src/metrics/frechet_video_distance.py calls it
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
# The 3D latent grid CoordTok is compared with: 4x down in time, 8x in space (8192 tokens for
# 128x128x128), 4 channels (Stable Diffusion's VAE; the comparison least favourable to CoordTok)
GRID_DOWNSAMPLE, GRID_CHANNELS = (4, 8, 8), 4
PREVIEW_CLIPS, PREVIEW_FRAMES = 4, 8


def parse_args(argv=None):
    epilog = "--tokens also takes --preset and tokenizer.py's model flags (e.g. --triplane_rs 32)."
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], epilog=epilog)
    p.add_argument("--ckpt", default="out/tokenizer.pt", help="a checkpoint, or coordtok_ucf101")
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
    p.add_argument("--curves", default="", help="a run's folder: the curves of its records")
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
# the clips evaluated, and the I3D detector that FVD compares them with


def load_i3d(path, device):
    """(StyleGAN-V's TorchScript I3D, "") or (None, why it is unavailable). It has no published
    checksum to verify, and torch.jit.load runs the TorchScript it holds (no Python pickles)."""
    try:
        detector = torch.jit.load(H.fetch(I3D_URL, path, "--i3d"), map_location="cpu")
        return detector.eval().to(device), ""
    except Exception as e:  # offline, a corrupt file, ...: the other metrics still run
        return None, f"the I3D detector could not be loaded ({type(e).__name__}: {e})"


def clip_loader(folder, frame_size, num_frames, split="all", random_start=False, val_fraction=0.1,
                num_clips=0, batch_size=8, num_workers=0, split_file="", dist=None):
    """num_clips clips (0: all) of a split, spread evenly (files sort by class: the first N would
    be the first classes only), once, in order; under torchrun this rank's contiguous share."""
    dataset = data.VideoDataset(folder, frame_size, num_frames, split, val_fraction, split_file,
                                random_start)
    if len(dataset) == 0:
        raise ValueError(f"{folder} has no {split!r} clips; add videos or pass --split all.")
    chosen = range(len(dataset))
    if 0 < num_clips < len(dataset):
        chosen = torch.linspace(0, len(dataset) - 1, num_clips).round().long().tolist()
    if dist and len(chosen) < dist.world_size:
        raise ValueError(f"{folder} has fewer clips than {dist.world_size} processes; start fewer.")
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
            features.append(M.i3d_features(detector, batch["video"][whole], device, i3d_batch))
    if short:
        warnings.warn(f"{short} videos in {folder} shorter than {num_frames} frames were left out")
    return torch.cat(features).numpy() if features else np.zeros((0, 1))


# -----------------------------------------------------------------------------
# token counts: the triplane against raw pixels and a 3D latent grid of the same clip


def grid_latent_shape(num_frames, frame_size, channels=GRID_CHANNELS):
    """(C, T', H', W') of the GRID_DOWNSAMPLE latent grid; a partial block makes a latent too."""
    sizes = (num_frames, *data.hw(frame_size))
    return (channels, *(math.ceil(n / d) for n, d in zip(sizes, GRID_DOWNSAMPLE)))


def token_counts(model, num_frames):
    (height, width), tokens = model.config.frame_size, model.num_tokens()
    grid_channels, *grid = grid_latent_shape(num_frames, (height, width))
    floats, grid_tokens = sum(map(math.prod, model.triplane_shapes)), math.prod(grid)
    raw_floats, grid_floats = num_frames * height * width * 3, grid_tokens * grid_channels
    return dict(frames=num_frames, frame_size=[height, width], tokens=tokens,
                channels=model.config.triplane_c, floats=floats, raw_floats=raw_floats,
                grid_downsample=list(GRID_DOWNSAMPLE), grid_channels=grid_channels,
                grid_tokens=grid_tokens, grid_floats=grid_floats,
                compression_vs_raw=raw_floats / floats, grid_tokens_per_token=grid_tokens / tokens,
                grid_floats_per_float=grid_floats / floats)


def token_rows(c):  # the token part of a table
    return [("tokens per clip", f"{c['tokens']} ({c['channels']} channels each)"),
            ("floats per clip", f"{c['floats']}"),
            ("vs raw pixels", f"{c['raw_floats']} floats ({c['frames']}x{c['frame_size'][0]}x"
             f"{c['frame_size'][1]}x3): {c['compression_vs_raw']:.1f}x compression"),
            ("vs a 4x8x8 3D latent grid", f"{c['grid_tokens']} tokens = "
             f"{c['grid_tokens_per_token']:.2f}x CoordTok's; {c['grid_floats']} floats at "
             f"{c['grid_channels']} channels = {c['grid_floats_per_float']:.2f}x")]


def print_table(title, rows):
    width = max(len(label) for label, _ in rows)
    print("\n".join([title] + [f"  {label:<{width}}  {value}" for label, value in rows]))


# -----------------------------------------------------------------------------
def report(result, metrics, first_batch, out_dir):
    """Print an evaluation's table; write eval.json and previews of first_batch's clips."""
    def show(name, fmt):  # fmt may name other figures, as rFVD's clip count
        if result[name] is None:
            return f"unavailable: {result['unavailable'][name]}"
        return fmt.format(result[name], **result)

    clips, frames, model_frames = result["clips"], result["frames_per_clip"], result["model_frames"]
    frames_row = f"{frames}" + (f" (model: {model_frames})" if frames != model_frames else "")
    if result["real_frames"] != clips * frames:
        frames_row += f"; {result['real_frames']} real frames evaluated"
    no_split = "" if result["train_config"] else "; the checkpoint carries no training split"
    marks, speed = result["yardsticks"], result["encode_decode_clips_per_s"]
    rows = [("clips", f"{clips} ({result['split']} split of {result['data']}{no_split})"),
            ("frames per clip", frames_row), ("resolution", "{}x{}".format(*result["resolution"])),
            *[(label, show(name, fmt)) for name, (label, fmt, _) in metrics.items()],
            ("rFVD", show("rfvd", "{:.1f} ({rfvd_clips} clips)")),
            ("yardsticks: PSNR of", f"the clip's mean frame {marks['temporal_mean']:.2f} dB, a "
             f"blur over each decoder patch {marks['patch_blur']:.2f} dB"),
            *token_rows(result["tokens"]),
            ("encode + decode", f"{speed:.2f} clips/s on {result['device']}")]
    step = "" if result["step"] is None else f" (step {result['step']})"
    print_table(f"CoordTok evaluation of {result['checkpoint']}{step}", rows)
    write_json(os.path.join(out_dir, "eval.json"), result)
    clips, recon, n_frames, _ = first_batch
    real = int(n_frames[:PREVIEW_CLIPS].min())                   # frames real in every clip
    inputs = clips[:PREVIEW_CLIPS, :real]                                       # (K, T, H, W, 3)
    recons = data.to_uint8(recon[:PREVIEW_CLIPS, :real]).cpu()
    pairs = rearrange(torch.cat([inputs, recons], dim=3), "k t h w c -> t (k h) w c")
    data.write_video(os.path.join(out_dir, "recon.mp4"), pairs.numpy())
    data.write_png(os.path.join(out_dir, "recon.png"),
                   data.comparison_grid(inputs, recons, PREVIEW_FRAMES))
    print(f"wrote {os.path.join(out_dir, 'eval.json')}, recon.mp4 and recon.png")


def write_json(path, obj):
    with H.atomic_path(path) as temporary, open(temporary, "w") as f:
        json.dump(H.json_safe(obj), f, indent=2, allow_nan=False)


def date_and_device(device):  # the device with its GPU's name, or the CPU threads torch uses
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.get_num_threads()
    return dict(date=time.strftime("%Y-%m-%dT%H:%M:%S"), device=f"{device} ({name})")


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
    lpips, lpips_reason = M.load_lpips(args.lpips_vgg, args.lpips_lin, device)
    detector, i3d_reason = load_i3d(args.i3d, device)
    metrics = M.frame_metrics(lpips)
    batches = M.reconstruct(model, loader, num_frames, device, show=dist.is_main)
    first = next(batches, None)                                  # rank 0's first clips: previews
    figures, rfvd_reason = M.score(itertools.chain([first] if first else [], batches), metrics,
                                   detector, args.i3d_batch, device, model.patch_size, dist)
    if not dist.is_main:
        return None
    reasons = {"lpips": lpips_reason, "rfvd": rfvd_reason or i3d_reason}
    unavailable = {name: reason for name, reason in reasons.items() if figures[name] is None}
    result = dict(
        checkpoint=os.path.abspath(H.released_file(args.ckpt)), step=ckpt.get("step"),
        data=os.path.abspath(data_dir), split=split, processes=dist.world_size,
        **date_and_device(device), torch=torch.__version__, frames_per_clip=num_frames,
        model_frames=cfg.num_frames, resolution=list(cfg.frame_size), **figures,
        unavailable=unavailable, tokens=token_counts(model, num_frames),
        i3d=dict(url=I3D_URL, kwargs=M.I3D_KWARGS), model_config=dataclasses.asdict(cfg),
        train_config=train_config)
    report(result, metrics, first, args.out_dir)
    return result


# -----------------------------------------------------------------------------
# a user's own video, whole: windows of the model's length, decoded and joined


@torch.no_grad()
def reconstruct_video(model, path, args, metrics, device, stem):
    """A whole video back at the model's frame size: windows of the model's T frames every
    T - overlap frames, overlaps blended by a ramp, read once in batches. Returns the figures."""
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
        recon = data.to_uint8(torch.stack([total / weight for total, weight, _ in final]))
        inputs = torch.stack([frame for _, _, frame in final])              # (F, H, W, 3) uint8
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
        stem = name = data.safe_name(os.path.splitext(os.path.basename(path))[0])
        suffixes = itertools.count(2)
        while name.lower() in map(str.lower, stems):  # lower case: one file on a case-blind disk
            name = f"{stem}_{next(suffixes)}"
        stems.append(name)
    model, _ = load_tokenizer(args.ckpt, device)
    metrics = M.frame_metrics(M.load_lpips(args.lpips_vgg, args.lpips_lin, device)[0])
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
    counts, params = token_counts(model, cfg.num_frames), sum(p.numel() for p in model.parameters())
    print_table(f"CoordTok token counts for a clip of {cfg.num_frames} frames at "
                f"{'x'.join(map(str, cfg.frame_size))} (triplane Rs={cfg.triplane_rs}, "
                f"Rt={cfg.triplane_rt}, C={cfg.triplane_c}; {params / 1e6:.1f}M parameters)",
                token_rows(counts))
    return counts


def fvd_command(args, device):
    """FVD between --real (clips from a seeded random start) and --fake (from their first frame)."""
    for flag, folder in (("--real", args.real), ("--fake", args.fake)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} folder {folder!r} does not exist; pass a folder.")
    detector, reason = load_i3d(args.i3d, device)
    if detector is None:
        raise SystemExit(f"FVD unavailable: {reason}")
    if not (args.num_frames and args.img_size):  # the first fake video's length or size
        fakes = data.find_videos(args.fake)
        if not fakes:
            raise FileNotFoundError(f"no video in --fake {args.fake!r}; pass sample.py's folder.")
        info = data.probe_video(fakes[0][0])
    num_frames = args.num_frames or info["n_frames"]
    frame_size = data.hw(args.img_size) if args.img_size else (info["height"], info["width"])
    real, fake = (folder_features(detector, folder, num_frames, frame_size, device, args.i3d_batch,
                                  random_start=random_start, num_clips=args.num_clips,
                                  batch_size=args.batch_size, num_workers=args.num_workers)
                  for folder, random_start in ((args.real, True), (args.fake, False)))
    fvd, reason = M.fvd_from_features(real, fake)
    if fvd is None:
        raise SystemExit(f"FVD unavailable: {reason}")
    print(f"FVD {fvd:.2f}  ({len(real)} real / {len(fake)} fake clips of {num_frames} frames at "
          f"{frame_size[0]}x{frame_size[1]}; StyleGAN-V's I3D; biased upward on few clips)")
    result = dict(fvd=fvd, real=os.path.abspath(args.real), fake=os.path.abspath(args.fake),
                  real_clips=len(real), fake_clips=len(fake), num_frames=num_frames,
                  frame_size=list(frame_size), **date_and_device(device))
    write_json(os.path.join(args.out_dir, "fvd.json"), result)
    return result


def curves_command(folder):
    """<name>_curves.svg of each <name>_log.jsonl (a training run's record) in folder."""
    logs = sorted(glob.glob(os.path.join(folder, "*_log.jsonl")))
    if not logs:
        raise FileNotFoundError(f"--curves {folder} holds no *_log.jsonl; pass a run's --out_dir.")
    written = [H.write_curves(path) for path in logs]
    print("wrote " + ", ".join(written))
    return written


def main(argv=None):
    args, model_flags = parse_args(argv)
    with H.errors_as_exit(data.VideoReadError):
        if args.tokens:
            return tokens_command(args, model_flags)
        if args.curves:
            return curves_command(args.curves)
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


if __name__ == "__main__":
    main()
