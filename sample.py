"""
Sample clips from a trained SiT (dit.py) and decode them with the CoordTok tokenizer it was trained on.

  python sample.py                                   # out/dit.pt -> out/samples/*.mp4 and out/samples/grid.png
  python sample.py --num_samples 16 --class_label stars --cfg_scale 2 --sampler heun --steps 50 --seed 1

The checkpoint's EMA weights draw normalised triplanes (SDE or ODE, optionally with classifier-free
guidance), which are de-normalised with the tokens file's statistics and decoded by querying every
patch coordinate of the clip. The same --seed gives the same videos. Batched; bf16 and torch.compile
on CUDA.
"""

import os
from dataclasses import dataclass, asdict

import numpy as np
import torch
from einops import rearrange
from tqdm import tqdm

import data as D
from dit import SAMPLERS, denormalize, load_dit, sample_planes
from tokenizer import autocast, load_tokenizer, parse_config, pick_device, use_compile


@dataclass
class SampleConfig:
    ckpt: str = "out/dit.pt"     # dit.py's checkpoint (its EMA weights are used)
    tokenizer: str = ""          # tokenizer checkpoint; empty: the one the DiT checkpoint names
    out_dir: str = "out/samples"
    num_samples: int = 8
    class_label: str = ""        # class name or index; "none": unconditional; empty: cycle through the classes
    cfg_scale: float = 3.0       # classifier-free guidance; 1: none, larger: more typical of the class, less varied
    sampler: str = "sde"         # sde (Euler-Maruyama, the paper's) | euler | heun
    steps: int = 250
    diffusion: float = 1.0       # sde: noise scale of w(t) = diffusion * (1 - t); larger corrects more, 0 is the ODE
    seed: int = 0
    batch_size: int = 8
    fps: int = 8
    grid_frames: int = 16        # frames per row of the PNG grid, evenly spaced over the clip
    grid_zoom: int = 0           # pixel repeat of the grid; 0: enlarge small frames to about 96 pixels
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    compile: str = "auto"        # auto (on for CUDA) | true | false


def parse_labels(spec, class_names, num_samples, conditional):
    """--class_label -> (labels (num_samples,) long, a name per sample). The null class is len(class_names)."""
    if not conditional:
        return torch.zeros(num_samples, dtype=torch.long), ["sample"] * num_samples
    if spec == "":
        labels = torch.arange(num_samples) % len(class_names)
    elif spec.lower() == "none":
        labels = torch.full((num_samples,), len(class_names))
    elif spec in class_names:
        labels = torch.full((num_samples,), class_names.index(spec))
    elif spec.isdigit() and 0 <= int(spec) < len(class_names):
        labels = torch.full((num_samples,), int(spec))
    else:
        raise ValueError(f"--class_label {spec!r} is not one of the checkpoint's classes: "
                         f"{', '.join(f'{i}={n}' for i, n in enumerate(class_names))} (or 'none')")
    names = [class_names[i] if i < len(class_names) else "uncond" for i in labels.tolist()]
    return labels, names


def frame_grid(videos, num_columns, zoom):
    """(N, T, H, W, 3) uint8 -> one image: a row per clip, num_columns evenly spaced frames per row."""
    t, h = videos.shape[1:3]
    columns = np.linspace(0, t - 1, min(num_columns, t)).round().astype(int)
    grid = rearrange(videos[:, columns], "n k h w c -> (n h) (k w) c")               # a row of frames per clip
    zoom = zoom or max(1, round(96 / h))
    return grid.repeat(zoom, axis=0).repeat(zoom, axis=1)


def load_models(sc, device):
    """The SiT (EMA) and the tokenizer whose triplanes it was trained on."""
    model, ckpt = load_dit(sc.ckpt, device)
    tokenizer_path = sc.tokenizer or ckpt["tokenizer_ckpt"]
    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"the tokenizer {tokenizer_path} that {sc.ckpt} was trained with is missing; "
                                f"pass its new location with --tokenizer PATH")
    tokenizer, _ = load_tokenizer(tokenizer_path, device)
    trained_on = ckpt["tokenizer_config"]
    current = asdict(tokenizer.config)
    differs = [k for k in trained_on if current.get(k) != trained_on[k]]
    if differs:
        raise ValueError(f"{tokenizer_path} is not the tokenizer {sc.ckpt} was trained on ({', '.join(differs)} "
                         f"differ); pass the right one with --tokenizer PATH")
    return model, ckpt, tokenizer


@torch.no_grad()
def sample(sc: SampleConfig):
    if sc.sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sc.sampler!r}")
    if sc.num_samples < 1 or sc.batch_size < 1 or sc.steps < 1:
        raise ValueError("--num_samples, --batch_size and --steps must be >= 1")
    device = pick_device(sc.device)
    model, ckpt, tokenizer = load_models(sc, device)
    labels, names = parse_labels(sc.class_label, ckpt["class_names"], sc.num_samples, model.conditional)
    if not model.conditional and (sc.class_label or sc.cfg_scale != 1.0):
        print("the checkpoint is unconditional (one class): --class_label and --cfg_scale are ignored")
    forward = torch.compile(model) if use_compile(sc.compile, device) else model
    n_frames = tokenizer.config.num_frames
    generator = torch.Generator().manual_seed(sc.seed)  # on the CPU: the same noise on every device

    os.makedirs(sc.out_dir, exist_ok=True)
    clips = []
    batches = range(0, sc.num_samples, sc.batch_size)
    for b, first in enumerate(tqdm(batches, desc="batches", dynamic_ncols=True)):
        batch_labels = labels[first:first + sc.batch_size]
        planes = sample_planes(forward, batch_labels, sc.cfg_scale, sc.sampler, sc.steps, generator, sc.diffusion,
                               progress=True, desc=f"batch {b + 1}/{len(batches)}")  # normalised
        triplane = denormalize(planes, ckpt["mean"], ckpt["std"])                      # (B, C, ., .) each
        with autocast(device):
            video = tokenizer.decode_video(triplane)                                   # (B, T, H, W, 3)
        video = D.to_uint8(video[:, :n_frames]).cpu().numpy()
        for i, clip in enumerate(video):
            index = first + i
            D.write_video(os.path.join(sc.out_dir, f"{index:03d}_{names[index]}.mp4"), clip, fps=sc.fps)
        clips.append(video)
    grid_path = os.path.join(sc.out_dir, "grid.png")
    D.write_png(grid_path, frame_grid(np.concatenate(clips), sc.grid_frames, sc.grid_zoom))
    print(f"wrote {sc.num_samples} clips of {n_frames} frames at {video.shape[2]}x{video.shape[3]} to "
          f"{sc.out_dir}/ and the frame grid {grid_path} (a row per clip: {', '.join(names)})")


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
