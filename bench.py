"""
Speed and memory of CoordTok on our own code: a markdown report, each row printed as it is measured,
every ratio measured side by side in one run, times next to the device that gave them.

  python bench.py                                         # the tiny model on the CPU, a few minutes
  python bench.py --parts scaling dit --frames 16 32      # some parts, fewer rows
  python bench.py --preset large --device cuda            # the GPU check: one H100, under 5 minutes
  python bench.py --preset large --device cuda --dry_run  # its code at tiny sizes on the CPU, in seconds

--parts, run in this order (default: all but gpu on the CPU, gpu and loader on CUDA):
  scaling     a training step at each of --frames: decoding 1/32 of the longest clip's patches (the paper's
              1024 of 32768) vs the same model decoding every patch, as reconstructing every frame does
  compile     that step at the longest clip: eager, torch.compile, and SDPA's math attention
  throughput  encode, decode_video, and decode_frames of one frame (random access)
  dit         a DiT step on CoordTok's triplane vs the same blocks on eval.grid_latent_shape's 3D grid
  gpu         the preset's stage-1 step (bf16, torch.compile, SDPA, AdamW) at the largest batch that fits:
              time, clips/s, MFU, memory; decode_video of a clip; sampling one with SiT-L/2, 250 SDE steps
  loader      clips/s one process reads from UCF-101-like video and its prepared copies, vs the clips/s
              one GPU trains on (measured by gpu, otherwise estimated for `large` at 40% MFU of an H100)
--batch_size: clips per step, scaling to dit. --json PATH: every number, written again after each part.
--dry_run: gpu and loader with the tiny tokenizer, a 240K-parameter SiT, 4 sampling steps, batches up to
4 and compile's aot_eager backend (it traces as inductor does, but generates no code), on the CPU.

Memory is the peak above what the measured calls start with (model, optimizer state, input), "total"
where a row says so; on the CPU each measurement of it runs in a new process (see measure). Times: the
median of up to 3 calls after an untimed one, where compiling happens. Steps are eager unless a row says
compiled.
"""

import argparse
import dataclasses
import gc
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import nullcontext

import torch
import torch.nn as nn
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

import data as D
import dit
import eval as evaluation
from tokenizer import PRESETS, CoordTok, autocast, configure_torch, make_optimizer, pick_device

PARTS = ("scaling", "compile", "throughput", "dit", "gpu", "loader")  # in the order they run
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM: MFU's denominator
ASSUMED_MFU = 0.4         # what a `large` step reaches on an H100, for the loader when no GPU measured it
DRY_RUN_SIT = dit.SiTConfig(width=64, depth=2, heads=2)
MEMORY_IS_OURS = False    # set in a process started for one measurement: only there is the CPU's peak its own

# -----------------------------------------------------------------------------
# measuring: time and peak memory


def measure(fn, device, repeats=3, budget_s=10.0):
    """fn() once untimed (compiling happens there), then up to `repeats` timed calls (fewer where the first
    shows they would take over budget_s). Returns {"seconds": their median, "first_seconds", "held_bytes": the
    memory held before the calls (model, optimizer state, input), "peak_bytes": the peak above it (in a
    training step: gradients, AdamW's moments made by the first step, activations)}. CUDA: the allocator's
    peak, reset here. CPU: the peak resident memory, which a process cannot reset: None unless this process
    was started for this measurement (run_alone)."""
    global MEMORY_IS_OURS
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    else:
        with open("/proc/self/statm") as f:  # Linux: the pages resident now
            held = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    times = []
    while len(times) < 2 or len(times) <= min(repeats, budget_s / max(times[0], 1e-9)):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - held if cuda else None
    if not cuda and MEMORY_IS_OURS:  # ru_maxrss in KiB; once per process: a second would hold the first's peak
        peak, MEMORY_IS_OURS = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - held, False
    return {"seconds": statistics.median(times[1:]), "first_seconds": times[0], "held_bytes": held,
            "peak_bytes": peak}


def _own_process():
    global MEMORY_IS_OURS
    MEMORY_IS_OURS = True


def run_alone(device, fn, *args):
    """fn(*args) in a new Python process on the CPU (in this one on CUDA): memory an earlier measurement
    freed stays with its process and the peak cannot be reset, so only a new process reads a measurement's
    own. A process that dies, most likely out of memory, gives {"error": why}."""
    if device.type == "cuda":
        return fn(*args)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_own_process) as pool:
            return pool.submit(fn, *args).result()
    except BrokenProcessPool:
        return {"error": "its process died (out of memory?)"}

# -----------------------------------------------------------------------------
# what is measured


def shape_model(cfg):
    """A CoordTok on the meta device: its shapes and FLOP counts, with no memory and no compute."""
    with torch.device("meta"):
        return CoordTok(cfg)


def random_clip(cfg, batch_size, device):  # (B, T, H, W, 3) in [-1, 1]: a step's cost does not depend on pixels
    return torch.rand(batch_size, cfg.num_frames, cfg.img_size, cfg.img_size, 3, device=device) * 2 - 1


def optimizer_step(model, optimizer, loss):
    """A training step as tokenizer.py and dit.py take it: loss(), backward, gradient clipping, AdamW."""
    def step():
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def training_step(model, optimizer, forward, video, num_samples, math_attention=False):
    """CoordTok's stage-1 step: patches and their pixels picked on the device, forward (the model or its
    compiled wrapper), L2. num_samples None decodes every patch of the clip through the same forward."""
    B, device = video.shape[0], video.device
    n_frames = torch.full((B,), video.shape[1], device=device)

    def loss():
        if num_samples:
            coords, targets = D.sample_patches(video, n_frames, num_samples, model.patch_size)
        else:
            coords = D.full_grid(model.grid_size, device).expand(B, -1, -1)         # (B, P, 3)
            targets = D.gather_patches(video, coords, model.patch_size)            # (B, P, pt*ph*pw*3)
        with sdpa_kernel(SDPBackend.MATH) if math_attention else nullcontext(), autocast(device):
            return forward(video, coords, targets)[0]
    return optimizer_step(model, optimizer, loss)


def tokenizer_step(cfg, batch_size, num_samples, device, compiled=False, math_attention=False):
    """measure() of training_step on a new model, and the patches it decodes per clip."""
    configure_torch(device)
    torch.manual_seed(0)
    model = CoordTok(cfg).to(device)
    optimizer = make_optimizer(model, 1e-4, 1e-3, (0.9, 0.999), device)  # the paper's stage 1
    forward = torch.compile(model) if compiled else model
    video = random_clip(cfg, batch_size, device)
    step = training_step(model, optimizer, forward, video, num_samples, math_attention)
    return {**measure(step, device), "decoded": num_samples or math.prod(model.grid_size)}


class GridDiT(nn.Module):
    """SiT's blocks and output head on a 3D latent grid (C, T', H', W') in 1 x p x p patches, a learned position
    each. The grid travels as the one plane (C, T'*H', W'), as dit.flow_matching_loss takes planes; that
    plane's p x p patches are the grid's 1 x p x p ones, since p divides H'."""

    def __init__(self, config, grid_shape):
        super().__init__()
        channels, frames, height, width = grid_shape
        p, dim = config.patch_size, config.width
        if height % p or width % p:
            raise ValueError(f"the latent grid's {height}x{width} frames do not divide into SiT patches of {p}")
        self.config, self.plane_shapes = config, [(channels, frames * height, width)]
        self.grids = [(frames * height // p, width // p)]                    # token grid, as SiT.grids
        self.embed = nn.Conv2d(channels, dim, kernel_size=p, stride=p)
        self.pos = nn.Parameter(torch.zeros(1, math.prod(self.grids[0]), dim))
        self.time_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(dit.SiTBlock(dim, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.head = dit.OutputHead(dim, p, channels)

    def forward(self, planes, t, y):  # unconditional: y is not used
        x = rearrange(self.embed(planes[0]), "b d h w -> b (h w) d") + self.pos   # (B, N, D)
        c = self.time_mlp(dit.timestep_embedding(t).to(x.dtype))                  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        (gh, gw), p = self.grids[0], self.config.patch_size
        return (rearrange(self.head(x, c), "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=gh, w=gw, p1=p, p2=p),)


def latents(cfg):
    """A clip's two latents: CoordTok's triplane (plane shapes read off the encoder's output) and the 3D
    latent grid that token counts are compared with (eval.grid_latent_shape)."""
    model = shape_model(cfg)
    with torch.device("meta"):
        planes = model.encode(torch.zeros(1, cfg.num_frames, cfg.img_size, cfg.img_size, 3))
    grid = evaluation.grid_latent_shape(cfg.num_frames, cfg.img_size)
    return {"triplane": {"shape": [tuple(z.shape[1:]) for z in planes], "tokens": model.num_tokens()},
            "grid": {"shape": tuple(grid), "tokens": math.prod(grid[1:])}}


def dit_step(sit_cfg, latent, shape, batch_size, device):
    """measure() of a DiT's flow-matching step on a "triplane" (dit.SiT; shape: its planes) or a "grid"
    (GridDiT; shape: (C, T', H', W')), and the DiT's sequence length."""
    configure_torch(device)
    torch.manual_seed(0)
    model = (dit.SiT(sit_cfg, shape) if latent == "triplane" else GridDiT(sit_cfg, shape)).to(device)
    planes = tuple(torch.randn(batch_size, *s, device=device) for s in model.plane_shapes)  # (B, C, H, W) each
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)

    def loss():
        with autocast(device):
            return dit.flow_matching_loss(model, planes, labels)
    step = optimizer_step(model, make_optimizer(model, 1e-4, 0.0, (0.9, 0.999), device), loss)
    return {**measure(step, device), "dit_tokens": sum(h * w for h, w in model.grids)}


def estimated_clips_per_s(cfg):
    """Clips/s an H100 trains on at ASSUMED_MFU: 3x the forward's matmul FLOPs (forward and backward) of a
    clip that decodes 1/32 of its patches."""
    model = shape_model(cfg)
    return ASSUMED_MFU * H100_BF16_FLOPS / (3 * model.flops_per_clip(math.prod(model.grid_size) // 32))


def loader_processes(needed_clips_per_s, clips_per_s_per_process):
    """Loader processes that keep one GPU fed: the fewest whose clips/s together reach what it consumes."""
    return math.ceil(needed_clips_per_s / clips_per_s_per_process)

# -----------------------------------------------------------------------------
# the parts: each measures, prints its rows as they come, and returns its numbers


def seconds(s):
    return "-" if s is None else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def size(b):
    return "-" if b is None else f"{b / 2 ** 20:.0f} MiB" if b < 2 ** 30 else f"{b / 2 ** 30:.2f} GiB"


def ratio(a, b):
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}x" if a / b < 10 else f"{a / b:.1f}x"


def table(title, *columns):
    print(f"\n### {title}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns), flush=True)


def row(*cells):
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def part_scaling(configs, batch_size, num_samples, device):
    table(f"A training step as the clip grows (batch {batch_size}; sampled: {num_samples} random patches per clip, "
          "CoordTok's way; full: every patch, through the same model.forward)", "frames", "patches per clip",
          "sampled: time", "sampled: memory", "full: time", "full: memory", "full / sampled: time",
          "full / sampled: memory")
    rows = []
    for cfg in configs:
        sampled, full = (run_alone(device, tokenizer_step, cfg, batch_size, n, device) for n in (num_samples, None))
        (st, sm), (ft, fm) = ((r.get("seconds"), r.get("peak_bytes")) for r in (sampled, full))
        row(cfg.num_frames, full.get("decoded", "-"), seconds(st), size(sm), seconds(ft), size(fm), ratio(ft, st),
            ratio(fm, sm))
        rows.append({"frames": cfg.num_frames, "sampled": sampled, "full": full})
    if len(rows) > 1:
        growth = [ratio(rows[-1][m].get(k), rows[0][m].get(k)) for m in ("sampled", "full")
                  for k in ("seconds", "peak_bytes")]
        print(f"\nFrom {rows[0]['frames']} to {rows[-1]['frames']} frames the sampled step's time grows {growth[0]} "
              f"and its memory {growth[1]}; the full decode's {growth[2]} and {growth[3]}.", flush=True)
    for r, mode in ((r, m) for r in rows for m in ("sampled", "full") if "error" in r[m]):
        print(f"\nThe {mode} step at {r['frames']} frames failed: {r[mode]['error']}", flush=True)
    return rows


def part_compile(cfg, batch_size, num_samples, device):
    table(f"The training step compiled, and with SDPA's math attention ({cfg.num_frames} frames, batch {batch_size}, "
          f"{num_samples} sampled patches per clip)", "step", "time", "eager / this", "first call (compiles)")
    rows = {}
    for key, name, compiled, math_attention in (("eager", "eager, SDPA's own kernel choice", False, False),
                                                ("compiled", "torch.compile (inductor)", True, False),
                                                ("math_attention", "eager, SDPA's math backend", False, True)):
        r = rows[key] = run_alone(device, tokenizer_step, cfg, batch_size, num_samples, device, compiled,
                                  math_attention)
        row(name, seconds(r.get("seconds")), ratio(rows["eager"].get("seconds"), r.get("seconds")),
            seconds(r.get("first_seconds")))
    return rows


@torch.no_grad()
def part_throughput(cfg, batch_size, device):
    table(f"Encode and decode ({cfg.num_frames} frames of {cfg.img_size}x{cfg.img_size}, batch {batch_size}, no "
          f"gradients, {cfg.decode_chunk} temporal patches per decoder call)", "call", "time", "clips/s", "frames/s",
          "decode_video / this")
    torch.manual_seed(0)
    model = CoordTok(cfg).to(device).eval()
    video, rows = random_clip(cfg, batch_size, device), {}
    with autocast(device):
        triplane = model.encode(video)
        for name, call, frames in (("encode", lambda: model.encode(video), cfg.num_frames),
                                   ("decode_video", lambda: model.decode_video(triplane), cfg.num_frames),
                                   (f"decode_frames: 1 of {cfg.num_frames}",
                                    lambda: model.decode_frames(triplane, [0]), 1)):
            r = rows[name] = measure(call, device)
            r.update(clips_per_s=batch_size / r["seconds"], frames_per_s=batch_size * frames / r["seconds"])
            row(name, seconds(r["seconds"]), f"{r['clips_per_s']:,.1f}", f"{r['frames_per_s']:,.0f}",
                ratio(rows.get("decode_video", {}).get("seconds"), r["seconds"]) if name != "encode" else "")
    return rows


def part_dit(clips, sit_name, batch_size, device):
    sit_cfg = dit.PRESETS[sit_name]
    table(f"A DiT training step: CoordTok's triplane vs the 3D latent grid of the same clip (SiT `{sit_name}`: width "
          f"{sit_cfg.width}, depth {sit_cfg.depth}, patch {sit_cfg.patch_size}; batch {batch_size})", "clip", "latent",
          "shape", "tokens", "DiT tokens", "time", "memory", "this / triplane: time", "this / triplane: memory")
    rows = []
    for cfg in clips:
        for latent, spec in latents(cfg).items():
            r = {"clip": f"{cfg.num_frames}x{cfg.img_size}x{cfg.img_size}", "latent": latent, **spec,
                 **run_alone(device, dit_step, sit_cfg, latent, spec["shape"], batch_size, device)}
            triplane = r if latent == "triplane" else rows[-1]
            shape = (" + ".join("x".join(map(str, s)) for s in r["shape"]) if latent == "triplane"
                     else "x".join(map(str, r["shape"])))
            row(r["clip"], "CoordTok triplane" if latent == "triplane" else "3D grid, 4x8x8 down", shape, r["tokens"],
                r.get("dit_tokens", "-"), seconds(r.get("seconds")), size(r.get("peak_bytes")),
                ratio(r.get("seconds"), triplane.get("seconds")),
                ratio(r.get("peak_bytes"), triplane.get("peak_bytes")))
            rows.append(r)
    return rows


def part_gpu(cfg, sit_cfg, device, max_batch, sampling_steps, backend):
    millions = sum(p.numel() for p in shape_model(cfg).parameters()) / 1e6
    table(f"GPU check: CoordTok {millions:.0f}M on {cfg.num_frames}x{cfg.img_size}x{cfg.img_size} clips; bf16 "
          f"autocast on CUDA, torch.compile ({backend}), SDPA, AdamW", "measurement", "value", "")
    torch.manual_seed(0)
    with torch.device(device):  # made where it runs: `large` is 853M parameters
        model = CoordTok(cfg)
    optimizer = make_optimizer(model, 1e-4, 1e-3, (0.9, 0.999), device)
    compiled = torch.compile(model, backend=backend)
    num_samples = math.prod(model.grid_size) // 32  # the paper's 1024 of 32768
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def forward(*inputs):  # the batch changes in the search: one graph for all (not 1, which compile specialises)
        for tensor in inputs:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled(*inputs)

    def fits(batch):  # what an out-of-memory step held is freed when this returns
        try:
            training_step(model, optimizer, forward, random_clip(cfg, batch, device), num_samples)()
            return True
        except torch.OutOfMemoryError:
            return False

    def free():
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None

    largest, batch = None, 2
    while batch <= max_batch and fits(batch):
        largest, batch = batch, batch * 2
    free()
    if largest is None:
        raise ValueError(f"a training step of batch 2 does not fit on {device}")
    row("largest batch that fits (doubling from 2)", largest, "the search's bound" if batch > max_batch else "")
    step = measure(training_step(model, optimizer, forward, random_clip(cfg, largest, device), num_samples), device)
    flops = 3 * model.flops_per_clip(num_samples) * largest  # forward and backward: 3x the forward's matmuls
    out = {"num_samples": num_samples, "largest_batch": largest, "step": step, "clips_per_s": largest / step["seconds"],
           "mfu": flops / step["seconds"] / H100_BF16_FLOPS if device.type == "cuda" else None,
           "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before}
    row(f"training step, batch {largest}, {num_samples} sampled patches per clip", seconds(step["seconds"]),
        f"{out['clips_per_s']:,.1f} clips/s, MFU " + ("-" if out["mfu"] is None else f"{out['mfu']:.1%}"))
    total = lambda r: None if r["peak_bytes"] is None else r["held_bytes"] + r["peak_bytes"]
    row("training step: peak memory", size(total(step)), "total: weights, AdamW state, activations")
    del forward, compiled, optimizer  # the training state: decoding and sampling hold only weights
    free()
    with torch.no_grad(), autocast(device):
        triplane = model.eval().encode(random_clip(cfg, 1, device))
        decode = out["decode"] = measure(lambda: model.decode_video(triplane), device)
        row(f"decode_video, one {cfg.num_frames}-frame clip", seconds(decode["seconds"]),
            f"peak memory {size(total(decode))} total")
        sit = dit.SiT(sit_cfg, [z.shape[1:] for z in triplane]).to(device).eval()
        compiled_sit = torch.compile(sit, backend=backend)  # as sample.py runs it on CUDA
        labels = torch.zeros(1, dtype=torch.long, device=device)
        sample = out["sample"] = measure(lambda: model.decode_video(
            dit.sample_planes(compiled_sit, labels, steps=sampling_steps)), device, repeats=1)
        row(f"sample one clip: SiT {sum(p.numel() for p in sit.parameters()) / 1e6:.1f}M, {sampling_steps} SDE steps, "
            "then decode_video", seconds(sample["seconds"]), f"peak memory {size(total(sample))} total, both "
            "models' fp32 weights in it; the paper: 9.8 s and 4.5 GB on an RTX 4090")
    return out


def part_loader(cfg, needed_clips_per_s, needed_from):
    table(f"Loader: one process reading {cfg.num_frames}-frame clips at {cfg.img_size}x{cfg.img_size} as training "
          f"does (read_clip), against the {needed_clips_per_s:,.1f} clips/s one GPU trains on ({needed_from})",
          "read path", "frames/s", "clips/s", "decoding alone: frames/s", "processes per GPU")
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = {"source: MPEG-4 .avi, 320x240 (UCF-101's format)":
                 D.make_ucf_like_video(os.path.join(folder, "source", "Bench", "v_Bench_g01_c01.avi"))}
        for codec, extension in D.PREPARED_FORMATS.items():
            D.prepare_videos(os.path.join(folder, "source"), os.path.join(folder, codec), cfg.img_size, codec=codec)
            paths[f"prepared: {codec} {extension}"] = os.path.join(folder, codec, "Bench", "v_Bench_g01_c01" + extension)
        for name, path in paths.items():
            r = rows[name] = D.measure_read_speed(path, cfg.img_size, cfg.num_frames)
            r["processes_per_gpu"] = loader_processes(needed_clips_per_s, r["clips_per_s"])
            row(name, f"{r['frames_per_s']:,.0f}", f"{r['clips_per_s']:,.1f}", f"{r['decode_frames_per_s']:,.0f}",
                r["processes_per_gpu"])
    return {"needed_clips_per_s": needed_clips_per_s, "needed_from": needed_from, "read_paths": rows}

# -----------------------------------------------------------------------------
# main


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:  # Linux, as the memory readings
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "CPU")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--parts", nargs="+", choices=PARTS)
    parser.add_argument("--frames", nargs="+", type=int, default=[16, 32, 64, 128])
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--json", default="")
    parser.add_argument("--dry_run", action="store_true")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.dry_run:
        args.device, args.parts = "cpu", args.parts or ["gpu", "loader"]
    args.frames = sorted(set(args.frames))
    return args


def run(args, command):
    try:
        device = pick_device(args.device)
    except ValueError as e:
        raise ValueError(f"{e}, or rehearse the GPU check on the CPU with --dry_run") from None
    configure_torch(device)
    configs = [dataclasses.replace(PRESETS[args.preset], num_frames=frames) for frames in args.frames]
    try:
        grid_sizes = [shape_model(cfg).grid_size for cfg in configs]
    except ValueError as e:
        raise ValueError(f"--frames {' '.join(map(str, args.frames))} do not all fit the `{args.preset}` preset: "
                         f"{e}") from None
    longest, num_samples = configs[-1], math.prod(grid_sizes[-1]) // 32  # the paper's 1024 of 32768
    if not 1 <= num_samples <= math.prod(grid_sizes[0]):
        raise ValueError(f"--frames {args.frames[0]} and {args.frames[-1]} are too far apart: the {num_samples} "
                         "patches sampled per clip (1/32 of the longest clip's) must fit in the shortest")
    threads = torch.get_num_threads()
    where = device_name(device) + (f", {threads} torch thread{'s' * (threads > 1)}" if device.type == "cpu" else "")
    what = "dry run: the tiny tokenizer" if args.dry_run else f"`{args.preset}` preset"
    print(f"## CoordTok bench: {what} on {device} ({where}), torch {torch.__version__}\n\n`{command}`", flush=True)
    results = {"command": command, "device": str(device), "device_name": device_name(device), "threads": threads,
               "torch": torch.__version__, "preset": args.preset, "dry_run": args.dry_run}
    gpu_cfg, sit_cfg, max_batch, steps, backend = (
        (PRESETS["tiny"], DRY_RUN_SIT, 4, 4, "aot_eager") if args.dry_run
        else (PRESETS[args.preset], dit.PRESETS["L/2"], 256, 250, "inductor"))
    parts = args.parts or (["gpu", "loader"] if device.type == "cuda" else [p for p in PARTS if p != "gpu"])
    for part in sorted(set(parts), key=PARTS.index):
        if part == "scaling":
            results[part] = part_scaling(configs, args.batch_size, num_samples, device)
        elif part == "compile":
            results[part] = part_compile(longest, args.batch_size, num_samples, device)
        elif part == "throughput":
            results[part] = part_throughput(longest, args.batch_size, device)
        elif part == "dit":
            clips = [longest] + ([PRESETS["large"]] if latents(PRESETS["large"]) != latents(longest) else [])
            results[part] = part_dit(clips, "L/2" if device.type == "cuda" else "cpu", args.batch_size, device)
        elif part == "gpu":
            results[part] = part_gpu(gpu_cfg, sit_cfg, device, max_batch, steps, backend)
        elif part == "loader" and "gpu" in results:
            results[part] = part_loader(gpu_cfg, results["gpu"]["clips_per_s"], f"measured by gpu on {where}")
        elif part == "loader":
            results[part] = part_loader(PRESETS["large"], estimated_clips_per_s(PRESETS["large"]),
                                        f"`large`, estimated: 3 x flops_per_clip(1024) at {ASSUMED_MFU:.0%} of an "
                                        "H100's 989 TFLOP/s")
        if args.json:  # after every part: a part that fails leaves the numbers of those before it
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(parse_args(argv), " ".join(["python bench.py", *argv]))
    except ValueError as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
