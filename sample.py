"""
Sample clips from a trained SiT (dit.py) and decode them with the CoordTok it was trained on.

  python sample.py                         # out/dit.pt -> out/samples/*.mp4 and grid.png
  python sample.py --num_samples 16 --class_label stars --cfg_scale 2 --sampler heun --steps 50
  python sample.py --frames 8:16           # decode only frames 8..15 of each clip
  torchrun --nproc_per_node=8 sample.py --num_samples 2048 --format lossless   # for FVD
  python sample.py --ckpt coordtok_sit_l2_ucf101 --tokenizer coordtok_ucf101 --tokens T.pt

The EMA weights draw normalised triplanes (SDE or ODE, optionally guided), de-normalised with the
tokens file's statistics and decoded at the frames asked for. Sample k depends only on --seed and k.
"""

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import data
import harness as H
from dit import SAMPLERS, denormalize, load_dit, sample_planes
from tokenizer import load_tokenizer


@dataclass
class SampleConfig:
    ckpt: str = "out/dit.pt"     # dit.py's checkpoint (EMA weights), or the authors' SiT
    tokenizer: str = ""          # tokenizer checkpoint; "": the one the DiT checkpoint names
    tokens: str = ""             # tokens file whose statistics undo the normalisation
    force: bool = False          # decode with a tokenizer or statistics the SiT was not trained on
    out_dir: str = "out/samples"
    num_samples: int = field(default=8, metadata={"below": 1_000_001})  # FVD takes 2k to 50k
    class_label: str = ""        # class name or index; "none": unconditional; "": cycle classes
    cfg_scale: float = 3.0       # classifier-free guidance; 1: none
    sampler: str = field(default="sde", metadata={"choices": SAMPLERS})  # sde: the paper's
    steps: int = 250
    diffusion: float = 1.0       # sde: w(t) = diffusion (1 - t), SiT's "sigma" form; 0: the ODE
    frames: str = ""             # frames to decode, "start:stop" or one index; "": every frame
    # mp4 (H.264, for viewing) | lossless (FFV1 .mkv, for FVD)
    format: str = field(default="mp4", metadata={"choices": ("mp4", "lossless")})
    seed: int = field(default=0, metadata=H.SEED)
    batch_size: int = 8
    fps: int = 8
    grid_clips: int = field(default=16, metadata={"min": 0})  # the PNG grid's rows: first clips
    grid_frames: int = 16        # frames per row of the grid, evenly spaced
    grid_zoom: int = 0           # pixel repeat of the grid; 0: small frames to about 96 pixels
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    compile: str = field(default="auto", metadata=H.COMPILE)


def parse_labels(spec, class_names, num_samples, model):
    """--class_label -> (labels (num_samples,) long, a file-name-safe name per sample)."""
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
        none = " or 'none'" if model.null_class is not None else ""
        raise ValueError(f"--class_label {spec!r} is not a class of the checkpoint; use one of "
                         f"{', '.join(f'{i}={n}' for i, n in enumerate(class_names))}{none}.")
    return labels, [data.safe_name(class_names[i]) if i < len(class_names) else "uncond"
                    for i in labels.tolist()]


def parse_frames(spec, num_frames):
    """--frames "start:stop" or "index" -> a range of frame indices (every frame when empty)."""
    if not spec:
        return range(num_frames)
    try:
        start, stop = map(int, spec.split(":")) if ":" in spec else (int(spec), int(spec) + 1)
    except ValueError:
        raise ValueError(f"--frames {spec!r}: pass start:stop (e.g. 64:72) or an index.") from None
    if not 0 <= start < stop <= num_frames:
        raise ValueError(f"--frames {spec!r} is outside the clip's frames 0:{num_frames}.")
    return range(start, stop)


def load_models(sc, device):
    """The SiT (EMA), its token statistics and class names, and the tokenizer whose triplanes it
    models, checked to be the one it was trained on (its weights' fingerprint)."""
    model, ckpt = load_dit(sc.ckpt, device)
    stats = data.load_tokens(sc.tokens) if sc.tokens else ckpt if "mean" in ckpt else None
    if stats is None:
        raise ValueError(f"{sc.ckpt} holds no token statistics; pass --tokens PATH, the tokens "
                         f"file of its tokenizer (`python tokenizer.py --encode PATH`).")
    tokenizer_path = sc.tokenizer or ckpt.get("tokenizer_ckpt", "")
    if not tokenizer_path:
        raise FileNotFoundError(f"{sc.ckpt} names no tokenizer; pass it with --tokenizer PATH.")
    tokenizer, _ = load_tokenizer(tokenizer_path, device)
    if [tuple(s) for s in model.plane_shapes] != list(tokenizer.triplane_shapes):
        raise ValueError(f"{tokenizer_path} makes planes {tokenizer.triplane_shapes}, the SiT "
                         f"models {model.plane_shapes}; pass its tokenizer with --tokenizer.")
    fingerprint = H.weights_fingerprint(tokenizer)
    for source, recorded in ((sc.ckpt, ckpt.get("tokenizer_fingerprint")),
                             (sc.tokens, stats.get("tokenizer_fingerprint"))):
        if recorded and recorded != fingerprint and not sc.force:
            raise ValueError(f"{source} comes from another tokenizer than {tokenizer_path} "
                             f"(fingerprint {recorded}, not {fingerprint}); pass its own "
                             f"tokenizer and tokens, or --force.")
    return model, stats, list(ckpt.get("class_names", [])), tokenizer


@torch.no_grad()
def sample(sc: SampleConfig, explicit=frozenset()):
    H.check_config(sc)
    H.check_out_dir(sc.out_dir)
    dist = H.setup_distributed(sc.device)
    model, stats, class_names, tokenizer = load_models(sc, dist.device)
    frames = parse_frames(sc.frames, tokenizer.config.num_frames)
    labels, names = parse_labels(sc.class_label, class_names, sc.num_samples, model)
    if model.null_class is None and "cfg_scale" in explicit and dist.is_main:
        print("the checkpoint has no null class, so --cfg_scale (guidance) is ignored")
    compiles = sc.compile == "true" or (sc.compile == "auto" and dist.device.type == "cuda")
    forward = torch.compile(model) if compiles else model
    extension = ".mkv" if sc.format == "lossless" else ".mp4"
    mine, grid, seconds = list(dist.share(sc.num_samples)), {}, 0.0
    batches = [mine[i:i + sc.batch_size] for i in range(0, len(mine), sc.batch_size)]
    for b, indices in enumerate(tqdm(batches, desc="batches", disable=not dist.is_main)):
        # a CPU generator per sample: sample k is the same whatever the batch, device or processes
        generators = [torch.Generator().manual_seed(sc.seed * 1_000_003 + k) for k in indices]
        t0 = time.perf_counter()
        planes = sample_planes(forward, labels[indices], sc.cfg_scale, sc.sampler, sc.steps,
                               generators, sc.diffusion, progress=dist.is_main,
                               desc=f"batch {b + 1}/{len(batches)}")           # normalised
        triplane = denormalize(planes, stats["mean"], stats["std"])
        with H.autocast(dist.device):
            video = data.to_uint8(tokenizer.decode_frames(triplane, frames)).cpu().numpy()
        seconds += time.perf_counter() - t0
        for k, clip in zip(indices, video):
            data.write_video(os.path.join(sc.out_dir, f"{k:03d}_{names[k]}{extension}"), clip,
                             fps=sc.fps, lossless=sc.format == "lossless")
            if k < sc.grid_clips:  # only the grid's frames are kept
                grid[k] = clip[np.linspace(0, len(clip) - 1, min(sc.grid_frames, len(clip)))
                               .round().astype(int)]
    shares = H.gather_to_main(dist, (grid, seconds))
    if dist.is_main:
        rows = {k: v for g, _ in shares for k, v in g.items()}
        grid_path, grid_note = os.path.join(sc.out_dir, "grid.png"), ""
        if rows:
            zoom = sc.grid_zoom or max(1, round(96 / tokenizer.config.img_size))
            data.write_png(grid_path, data.frame_grid(np.stack([rows[k] for k in sorted(rows)]),
                                                      sc.grid_frames, zoom))
            grid_note = f" and {grid_path} (a row per clip: {', '.join(names[:len(rows)])})"
        per_clip = sum(s for _, s in shares) / sc.num_samples
        height, width = tokenizer.config.frame_size
        print(f"wrote {sc.num_samples} clips of {len(frames)} frames (frames {frames.start}:"
              f"{frames.stop}) at {height}x{width} to {sc.out_dir}/{grid_note}; {per_clip:.2f} s "
              f"per clip on {dist.device} x{dist.world_size}")
    H.cleanup_distributed(dist)


def main(argv=None):
    (sc,), explicit = H.parse_config((SampleConfig,), {"default": SampleConfig()}, argv,
                                     description=__doc__.split("\n\n")[1], default_preset="default")
    with H.errors_as_exit(data.VideoReadError):
        sample(sc, explicit)


if __name__ == "__main__":
    main()
