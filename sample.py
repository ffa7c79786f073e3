"""
Sample clips from a trained SiT (dit.py) and decode them with the CoordTok tokenizer it was trained on.

  python sample.py                                   # out/dit.pt -> out/samples/*.mp4 and out/samples/grid.png
  python sample.py --num_samples 16 --class_label stars --cfg_scale 2 --sampler heun --steps 50 --seed 1
  python sample.py --frames 64:72                    # decode only frames 64..71 of each clip (random access)
  python sample.py --format lossless                 # FFV1 .mkv files, bit-exact, for eval.py --fvd
  python sample.py --ckpt CoordTok_SiT_L_2_UCF101_600K.pt --tokenizer CoordTok_UCF101_1M_50K.pth \
      --tokens out/tokens.pt                         # the authors' released generator and tokenizer

The checkpoint's EMA weights draw normalised triplanes (SDE or ODE, optionally with classifier-free
guidance), which are de-normalised with the tokens file's statistics and decoded by querying the patch
coordinates of the frames asked for. Sample k depends only on --seed and k, whatever the batch size or
device. bf16 and torch.compile on CUDA.
"""

import os
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

import data as D
from dit import SAMPLERS, denormalize, load_dit, sample_planes
from tokenizer import autocast, check_out_dir, load_tokenizer, parse_config, pick_device, use_compile


@dataclass
class SampleConfig:
    ckpt: str = "out/dit.pt"     # dit.py's checkpoint (its EMA weights), or the authors' released SiT
    tokenizer: str = ""          # tokenizer checkpoint; empty: the one the DiT checkpoint names
    tokens: str = ""             # tokens file whose statistics undo the normalisation (needed for the authors' SiT)
    out_dir: str = "out/samples"
    num_samples: int = 8
    class_label: str = ""        # class name or index; "none": unconditional; empty: cycle through the classes
    cfg_scale: float = 3.0       # classifier-free guidance; 1: none, larger: more typical of the class, less varied
    sampler: str = "sde"         # sde (Euler-Maruyama, SiT's and the paper's) | euler | heun
    steps: int = 250
    diffusion: float = 1.0       # sde: w(t) = diffusion * (1 - t), SiT's "sigma" form; 0 is the ODE
    frames: str = ""             # frames to decode, "start:stop" or one index; empty: every frame
    format: str = "mp4"          # mp4 (H.264, for viewing) | lossless (FFV1 .mkv, bit-exact, for FVD)
    seed: int = 0
    batch_size: int = 8
    fps: int = 8
    grid_frames: int = 16        # frames per row of the PNG grid, evenly spaced over the clip
    grid_zoom: int = 0           # pixel repeat of the grid; 0: enlarge small frames to about 96 pixels
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    compile: str = "auto"        # auto (on for CUDA) | true | false


def parse_labels(spec, class_names, num_samples, model):
    """--class_label -> (labels (num_samples,) long, a name per sample)."""
    if not model.conditional:
        return torch.zeros(num_samples, dtype=torch.long), ["sample"] * num_samples
    if spec == "":
        labels = torch.arange(num_samples) % len(class_names)
    elif spec.lower() == "none" and model.null_class is not None:
        labels = torch.full((num_samples,), model.null_class)
    elif spec in class_names:
        labels = torch.full((num_samples,), class_names.index(spec))
    elif spec.isdigit() and 0 <= int(spec) < len(class_names):
        labels = torch.full((num_samples,), int(spec))
    else:
        none = " (or 'none')" if model.null_class is not None else ""
        raise ValueError(f"--class_label {spec!r} is not one of the checkpoint's classes: "
                         f"{', '.join(f'{i}={n}' for i, n in enumerate(class_names))}{none}")
    names = [class_names[i] if i < len(class_names) else "uncond" for i in labels.tolist()]
    return labels, names


def parse_frames(spec, num_frames):
    """--frames "start:stop" or "index" -> a range of frame indices inside the clip (every frame when empty)."""
    if not spec:
        return range(num_frames)
    try:
        start, stop = (int(v) for v in spec.split(":")) if ":" in spec else (int(spec), int(spec) + 1)
    except ValueError:
        raise ValueError(f"--frames {spec!r}: expected start:stop (e.g. 64:72) or one frame index") from None
    if not 0 <= start < stop <= num_frames:
        raise ValueError(f"--frames {spec!r} is outside the clip's frames 0:{num_frames}")
    return range(start, stop)


def frame_grid(videos, num_columns, zoom):
    """(N, T, H, W, 3) uint8 -> one image: a row per clip, num_columns evenly spaced frames per row."""
    t, h = videos.shape[1:3]
    columns = np.linspace(0, t - 1, min(num_columns, t)).round().astype(int)
    grid = rearrange(videos[:, columns], "n k h w c -> (n h) (k w) c")               # a row of frames per clip
    zoom = zoom or max(1, round(96 / h))
    return grid.repeat(zoom, axis=0).repeat(zoom, axis=1)


def load_models(sc, device):
    """The SiT (EMA), its token statistics and class names, and the tokenizer whose triplanes it models."""
    model, ckpt = load_dit(sc.ckpt, device)
    stats = ckpt if "mean" in ckpt else None
    if sc.tokens:  # the tokens file's statistics (the authors' SiT file has none)
        stats = D.load_tokens(sc.tokens)
    if stats is None:
        raise ValueError(f"{sc.ckpt} holds no token statistics; pass --tokens PATH, the tokens file of the "
                         f"tokenizer it was trained on (`python tokenizer.py --encode PATH --init_from TOKENIZER`)")
    tokenizer_path = sc.tokenizer or ckpt.get("tokenizer_ckpt", "")
    if not tokenizer_path or not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"the tokenizer {tokenizer_path or '(not named in ' + sc.ckpt + ')'} is missing; "
                                f"pass it with --tokenizer PATH")
    tokenizer, _ = load_tokenizer(tokenizer_path, device)
    trained_on = ckpt.get("tokenizer_config", {})
    current = asdict(tokenizer.config)
    differs = [k for k in trained_on if current.get(k) != trained_on[k]]
    c, rs, rt = tokenizer.config.triplane_c, tokenizer.config.triplane_rs, tokenizer.config.triplane_rt
    if differs or [tuple(s) for s in model.plane_shapes] != [(c, rs, rs), (c, rt, rs), (c, rt, rs)]:
        what = ", ".join(differs) or "triplane shapes"
        raise ValueError(f"{tokenizer_path} is not the tokenizer {sc.ckpt} was trained on ({what} differ); "
                         f"pass the right one with --tokenizer PATH")
    return model, stats, list(ckpt.get("class_names", [])), tokenizer


@torch.no_grad()
def sample(sc: SampleConfig):
    if sc.sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sc.sampler!r}")
    if sc.num_samples < 1 or sc.batch_size < 1 or sc.steps < 1:
        raise ValueError("--num_samples, --batch_size and --steps must be >= 1")
    if sc.format not in ("mp4", "lossless"):
        raise ValueError(f"--format must be mp4 or lossless, got {sc.format!r}")
    check_out_dir(sc.out_dir)
    device = pick_device(sc.device)
    model, stats, class_names, tokenizer = load_models(sc, device)
    frames = parse_frames(sc.frames, tokenizer.config.num_frames)
    labels, names = parse_labels(sc.class_label, class_names, sc.num_samples, model)
    if model.null_class is None and (sc.class_label or sc.cfg_scale != 1.0):
        print("the checkpoint has no null class: --class_label none and --cfg_scale are ignored")
    forward = torch.compile(model) if use_compile(sc.compile, device) else model
    extension = ".mkv" if sc.format == "lossless" else ".mp4"

    clips, seconds = [], 0.0
    batches = range(0, sc.num_samples, sc.batch_size)
    for b, first in enumerate(tqdm(batches, desc="batches", dynamic_ncols=True)):
        batch_labels = labels[first:first + sc.batch_size]
        # one CPU generator per sample: sample k is the same clip whatever the batch size and device
        generators = [torch.Generator().manual_seed(sc.seed * 1_000_003 + k)
                      for k in range(first, first + len(batch_labels))]
        t0 = time.perf_counter()
        planes = sample_planes(forward, batch_labels, sc.cfg_scale, sc.sampler, sc.steps, generators, sc.diffusion,
                               progress=True, desc=f"batch {b + 1}/{len(batches)}")  # normalised
        triplane = denormalize(planes, stats["mean"], stats["std"])                     # (B, C, ., .) each
        with autocast(device):
            video = tokenizer.decode_frames(triplane, frames)                           # (B, F, H, W, 3)
        video = D.to_uint8(video).cpu().numpy()
        seconds += time.perf_counter() - t0
        for i, clip in enumerate(video):
            index = first + i
            D.write_video(os.path.join(sc.out_dir, f"{index:03d}_{names[index]}{extension}"), clip, fps=sc.fps,
                          lossless=sc.format == "lossless")
        clips.append(video)
    grid_path = os.path.join(sc.out_dir, "grid.png")
    D.write_png(grid_path, frame_grid(np.concatenate(clips), sc.grid_frames, sc.grid_zoom))
    print(f"wrote {sc.num_samples} clips of {len(frames)} frames (frames {frames.start}:{frames.stop}) at "
          f"{video.shape[2]}x{video.shape[3]} to {sc.out_dir}/ and the frame grid {grid_path} (a row per clip: "
          f"{', '.join(names)}); {seconds / sc.num_samples:.2f} s per clip to sample and decode on {device}")


def main(argv=None):
    # one set of flags and no presets: parse_config's --preset has only this default to pick
    (sc,) = parse_config((SampleConfig,), {"default": SampleConfig()}, argv,
                         description=__doc__.split("\n\n")[0], default_preset="default")
    try:
        sample(sc)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
