"""Speed and memory of CoordTok on our own code: a markdown report, each row printed as it is
measured, every ratio measured side by side in one run, times next to the device that gave them.
Memory is the peak above what the measured calls start with (model, optimizer state, input; rows
that say "total" add it), on the CPU each in a process of its own (see measure).

  python bench.py                                    # the tiny model on the CPU, a few minutes
  python bench.py --parts scaling dit --frames 16 32      # some parts, fewer rows
  python bench.py --preset large --device cuda       # the GPU check: one H100, under 5 minutes
  python bench.py --preset large --device cuda --dry_run  # its code at tiny sizes, on the CPU
  python bench.py --parts transfer                   # do the synthetic figures predict photos?
"""

import argparse
import dataclasses
import gc
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import dit
import eval as evaluation
import harness as H
import metrics
import tokenizer as T

PARTS = ("scaling", "compile", "throughput", "dit", "gpu", "loader", "transfer")  # in this order
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's photographs
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM: MFU's denominator
ASSUMED_MFU = 0.4  # what a `large` step reaches on an H100, for the loader without a GPU check
PAPER_STAGE1 = T.TrainConfig(learning_rate=1e-4, weight_decay=1e-3)  # the paper's stage-1 AdamW


def measure(fn, device, repeats=3, budget_s=10.0):
    """fn() once untimed (it compiles there), then up to `repeats` timed calls within budget_s:
    {"seconds": their median, "first_seconds", "held_bytes": before them, "peak_bytes": the peak
    above it}: CUDA's, or the CPU's resident one if run_alone started this process, else None."""
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
    peak = torch.cuda.max_memory_allocated(device) if cuda else \
        resident_peak_bytes() if multiprocessing.parent_process() else None
    return {"seconds": statistics.median(times[1:]), "first_seconds": times[0], "held_bytes": held,
            "peak_bytes": None if peak is None else peak - held}


def resident_peak_bytes():
    """This process's peak resident memory: VmHWM, not ru_maxrss, which survives fork and exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def run_alone(device, fn, *args):
    """fn(*args), one measurement, in a process of its own on the CPU, which keeps what is freed
    and cannot reset its peak (in this one on CUDA). A process that dies gives {"error": why}."""
    if device.type == "cuda":
        return fn(*args)
    try:
        context = multiprocessing.get_context("forkserver")  # a fork of one process that
        context.set_forkserver_preload(["bench"])             # imported torch once, for all
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(fn, *args).result()
    except BrokenProcessPool:
        return {"error": "its process died (out of memory?)"}


def shape_model(cfg):  # a CoordTok on the meta device: its shapes and FLOPs, no memory
    with torch.device("meta"):
        return T.CoordTok(cfg)


def random_clip(cfg, batch_size, device):  # (B, T, H, W, 3): a step's cost ignores the pixels
    return torch.rand(batch_size, cfg.num_frames, *cfg.frame_size, 3, device=device) * 2 - 1


def adamw(model, tc, device):  # the loops' optimizer
    return torch.optim.AdamW(H.decay_groups(model, tc.weight_decay), lr=tc.learning_rate,
                             betas=(tc.beta1, tc.beta2), fused=device.type == "cuda")


def train_step(model, optimizer, loss, device):  # a step as the loops take it: clipped, checked
    def step():
        with H.autocast(device):
            value = loss()
        value.backward()
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def training_step(model, optimizer, forward, video, num_samples):
    """CoordTok's stage-1 step: patches and their pixels picked on the device, forward (the model
    or its compiled wrapper), the loss. num_samples None decodes every patch of the clip."""
    B, device = video.shape[0], video.device
    n_frames = torch.full((B,), video.shape[1], device=device)

    def loss():
        if num_samples:
            coords, targets = T.sample_patches(video, n_frames, num_samples, model.patch_size)
        else:
            coords = T.full_grid(model.grid_size, device).expand(B, -1, -1)          # (B, P, 3)
            targets = T.gather_patches(video, coords, model.patch_size)             # (B, P, D)
        return T.reconstruction_loss(forward(video, coords), targets)
    return train_step(model, optimizer, loss, device)


def tokenizer_step(cfg, batch_size, num_samples, device, compiled=False, math_attention=False):
    """measure() of training_step on a new model, and the patches it decodes per clip."""
    model = T.CoordTok(cfg).to(device)
    forward = torch.compile(model) if compiled else model
    video = random_clip(cfg, batch_size, device)
    step = training_step(model, adamw(model, PAPER_STAGE1, device), forward, video, num_samples)
    with sdpa_kernel(SDPBackend.MATH) if math_attention else nullcontext():  # backward follows
        return {**measure(step, device), "decoded": num_samples or math.prod(model.grid_size)}


class GridDiT(dit.SiT):
    """dit.SiT on a 3D latent grid (C, T', H', W') in 1 x p x p patches, carried as one plane
    (C, T'*H', W'): built for three such planes, then cut to the first (forward zips them)."""

    def __init__(self, config, grid_shape):
        channels, frames, height, width = grid_shape
        super().__init__(config, [(channels, frames * height, width)] * 3)
        del self.embeds[1:], self.heads[1:]
        self.pos_t = torch.nn.Parameter(self.pos_t[:, :0])                    # no time planes
        self.plane_shapes, self.grids = self.plane_shapes[:1], self.grids[:1]


def latents(cfg):
    """A clip's latents as a DiT takes them: CoordTok's triplane and eval's 3D latent grid."""
    model = shape_model(cfg)
    grid = tuple(evaluation.grid_latent_shape(cfg.num_frames, cfg.frame_size))
    return {"triplane": {"shape": list(model.triplane_shapes), "tokens": model.num_tokens()},
            "grid": {"shape": [grid], "tokens": math.prod(grid[1:])}}


def dit_step(sit_cfg, latent, shapes, batch_size, device):
    """measure() of a DiT's flow-matching step on latents()' "triplane" or "grid" (GridDiT)."""
    model = dit.SiT(sit_cfg, shapes) if latent == "triplane" else GridDiT(sit_cfg, shapes[0])
    model = model.to(device)
    planes = tuple(torch.randn(batch_size, *s, device=device) for s in model.plane_shapes)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    optimizer = adamw(model, dit.DiTTrainConfig(learning_rate=1e-4), device)
    loss = lambda: dit.flow_matching_loss(model, planes, labels)  # noqa: E731
    return {**measure(train_step(model, optimizer, loss, device), device),
            "dit_tokens": sum(h * w for h, w in model.grids)}


def estimated_clips_per_s(cfg):  # an H100 at ASSUMED_MFU, forward and backward (3x the forward)
    model = shape_model(cfg)  # decoding 1/32 of the clip's patches
    flops = 3 * model.flops_per_clip(math.prod(model.grid_size) // 32)
    return ASSUMED_MFU * H100_BF16_FLOPS / flops


def seconds(s):
    return "-" if s is None else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def size(b):
    return "-" if b is None else f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def cells(r, base=None):  # a measurement's time (or why none) and memory, then ratios to base's
    ratios = [f"{r[k] / base[k]:.2f}x" if r.get(k) and base.get(k) else "-"
              for k in ("seconds", "peak_bytes")] if base else []
    return [r.get("error") or seconds(r.get("seconds")), size(r.get("peak_bytes")), *ratios]


def table(title, *columns):
    print(f"\n### {title}\n\n| {' | '.join(columns)} |\n|{'---|' * len(columns)}", flush=True)


def row(*values):
    print("| " + " | ".join(map(str, values)) + " |", flush=True)


def part_scaling(configs, batch_size, num_samples, device):
    table(f"A training step as the clip grows (batch {batch_size}; sampled: {num_samples} random "
          "patches per clip, CoordTok's way; full: every patch, through the same forward)",
          "frames", "patches per clip", "sampled: time", "sampled: memory", "full: time",
          "full: memory", "full / sampled: time", "full / sampled: memory")
    rows = []
    for cfg in configs:
        sampled, full = (run_alone(device, tokenizer_step, cfg, batch_size, n, device)
                         for n in (num_samples, None))
        row(cfg.num_frames, full.get("decoded", "-"), *cells(sampled), *cells(full, sampled))
        rows.append({"frames": cfg.num_frames, "sampled": sampled, "full": full})
    if len(rows) > 1:
        (st, sm), (ft, fm) = (cells(rows[-1][key], rows[0][key])[2:] for key in ("sampled", "full"))
        print(f"\nFrom {rows[0]['frames']} to {rows[-1]['frames']} frames the sampled step's "
              f"time grows {st} and its memory {sm}; the full decode's {ft} and {fm}.", flush=True)
    return rows


def part_compile(cfg, batch_size, num_samples, device):
    table(f"The training step compiled, and with SDPA's math attention ({cfg.num_frames} frames, "
          f"batch {batch_size}, {num_samples} sampled patches per clip)", "step", "time",
          "this / eager", "first call (compiles)")
    rows = {}
    for key, name in (("eager", "eager, SDPA's own kernel choice"),
                      ("compiled", "torch.compile (inductor)"),
                      ("math_attention", "eager, SDPA's math backend")):
        r = rows[key] = run_alone(device, tokenizer_step, cfg, batch_size, num_samples, device,
                                  key == "compiled", key == "math_attention")
        time_cell, _, time_ratio, _ = cells(r, rows["eager"])  # not memory: compiling's is in it
        row(name, time_cell, time_ratio, seconds(r.get("first_seconds")))
    return rows


def part_throughput(cfg, batch_size, device):
    table(f"Encode and decode ({cfg.num_frames} frames of {'x'.join(map(str, cfg.frame_size))}, "
          f"batch {batch_size}, no gradients, {cfg.decode_chunk} temporal patches per decoder "
          "call)", "call", "time", "clips/s", "frames/s", "decode_video / this")
    model = T.CoordTok(cfg).to(device).eval()
    video, rows, frames = random_clip(cfg, batch_size, device), {}, cfg.num_frames
    with torch.no_grad(), H.autocast(device):
        triplane = model.encode(video)
        for name, call, per_clip in (  # frames a call covers per clip
                ("encode", lambda: model.encode(video), frames),
                ("decode_video", lambda: model.decode_video(triplane), frames),
                (f"decode_frames: 1 of {frames}", lambda: model.decode_frames(triplane, [0]), 1)):
            r = rows[name] = measure(call, device)
            r.update(clips_per_s=batch_size / r["seconds"],
                     frames_per_s=batch_size * per_clip / r["seconds"])
            ratio = rows["decode_video"]["seconds"] / r["seconds"] if name != "encode" else None
            row(name, seconds(r["seconds"]), f"{r['clips_per_s']:,.1f}",
                f"{r['frames_per_s']:,.0f}", f"{ratio:.2f}x" if ratio else "")
    return rows


def part_dit(clips, batch_size, device):
    sit_name = "L/2" if device.type == "cuda" else "cpu"
    sit_cfg = dit.PRESETS[sit_name]
    table(f"A DiT training step: CoordTok's triplane vs the 3D latent grid of the same clip (SiT "
          f"`{sit_name}`: width {sit_cfg.width}, depth {sit_cfg.depth}, patch "
          f"{sit_cfg.patch_size}; batch {batch_size})", "clip", "latent", "shape", "tokens",
          "DiT tokens", "time", "memory", "this / triplane: time", "this / triplane: memory")
    rows = []
    for cfg in clips:
        for latent, spec in latents(cfg).items():
            r = {"clip": "x".join(map(str, (cfg.num_frames, *cfg.frame_size))), "latent": latent,
                 **spec, **run_alone(device, dit_step, sit_cfg, latent, spec["shape"], batch_size,
                                     device)}
            row(r["clip"], "CoordTok triplane" if latent == "triplane" else "3D grid, 4x8x8 down",
                " + ".join("x".join(map(str, s)) for s in r["shape"]), r["tokens"],
                r.get("dit_tokens", "-"), *cells(r, r if latent == "triplane" else rows[-1]))
            rows.append(r)
    return rows


def part_gpu(cfg, device, dry_run):
    sit_cfg, max_batch, sampling_steps, backend = (
        (dit.SiTConfig(width=64, depth=1, heads=2), 4, 4, "eager") if dry_run
        else (dit.PRESETS["L/2"], 256, 250, "inductor"))
    with torch.device(device):  # made where it runs: `large` is 853M parameters
        model = T.CoordTok(cfg)
    table(f"GPU check: CoordTok {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M on "
          f"{'x'.join(map(str, (cfg.num_frames, *cfg.frame_size)))} clips; bf16 autocast on CUDA, "
          f"torch.compile ({backend}), SDPA, AdamW", "measurement", "time", "clips/s", "MFU",
          "peak memory, total")
    optimizer = adamw(model, PAPER_STAGE1, device)
    num_samples = math.prod(model.grid_size) // 32  # the paper's 1024 of 32768
    compiled = torch.compile(model, backend=backend)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def forward(*inputs, compiled=compiled):  # one graph for every batch (compile specialises 1)
        for tensor in inputs:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return compiled(*inputs)

    largest, batch = None, 2
    while batch <= max_batch:  # doubling while a step fits
        try:
            training_step(model, optimizer, forward, random_clip(cfg, batch, device), num_samples)()
        except torch.OutOfMemoryError:
            break
        largest, batch = batch, batch * 2
    model.zero_grad(set_to_none=True)  # what a step that ran out of memory left: its gradients,
    gc.collect()                       # and activations in its exception's reference cycles
    if largest is None:
        raise SystemExit(f"error: a training step of batch 2 does not fit on {device}.")
    video = random_clip(cfg, largest, device)
    step = measure(training_step(model, optimizer, forward, video, num_samples), device)
    flops = 3 * model.flops_per_clip(num_samples) * largest  # forward and backward
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before
    out = {"num_samples": num_samples, "largest_batch": largest, "step": step,
           "clips_per_s": largest / step["seconds"], "compiled_graphs": graphs,
           "mfu": flops / step["seconds"] / H100_BF16_FLOPS if device.type == "cuda" else None}
    total = lambda r: None if r["peak_bytes"] is None else r["held_bytes"] + r["peak_bytes"]  # noqa
    bound = " (the search's bound)" if batch > max_batch else ""
    row(f"training step at batch {largest}, the largest that fits{bound}, {num_samples} sampled "
        "patches per clip", seconds(step["seconds"]), f"{out['clips_per_s']:,.1f}",
        "-" if out["mfu"] is None else f"{out['mfu']:.1%}", size(total(step)))
    del forward, compiled, optimizer  # the training state: decoding and sampling hold weights
    gc.collect()
    with torch.no_grad(), H.autocast(device):
        triplane = model.eval().encode(random_clip(cfg, 1, device))
        decode = out["decode"] = measure(lambda: model.decode_video(triplane), device)
        row(f"decode_video, one {cfg.num_frames}-frame clip", seconds(decode["seconds"]), "", "",
            size(total(decode)))
        sit = dit.SiT(sit_cfg, [z.shape[1:] for z in triplane]).to(device).eval()
        compiled_sit = torch.compile(sit, backend=backend)  # as sample.py runs it on CUDA
        labels = torch.zeros(1, dtype=torch.long, device=device)
        sample = out["sample"] = measure(lambda: model.decode_video(
            dit.sample_planes(compiled_sit, labels, steps=sampling_steps)), device, repeats=1)
        row(f"sample one clip: SiT {sum(p.numel() for p in sit.parameters()) / 1e6:.1f}M, "
            f"{sampling_steps} SDE steps, then decode_video, both models' fp32 weights held (the "
            "paper: 9.8 s and 4.5 GB on an RTX 4090)", seconds(sample["seconds"]), "", "",
            size(total(sample)))
    return out


def part_loader(cfg, needed_clips_per_s, needed_from, loops=10):
    table(f"Loader: one process reading {cfg.num_frames}-frame clips at "
          f"{'x'.join(map(str, cfg.frame_size))} as training does (read_clip), against the "
          f"{needed_clips_per_s:,.1f} clips/s one GPU trains on ({needed_from})", "read path",
          "frames/s", "clips/s", "decoding alone: frames/s", "processes per GPU",
          f"a clip at the start / middle / end of a {175 * loops:,}-frame video")
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        clip = os.path.join("Bench", "v_Bench_g01_c01")  # UCF-101's layout: class folder, clip
        paths = {"source: MPEG-4 .avi, 320x240 (UCF-101's format)": data.make_ucf_like_video(
            os.path.join(folder, "source", clip + ".avi"), loops=loops)}
        for codec, extension in data.PREPARED_FORMATS.items():
            data.prepare_videos(os.path.join(folder, "source"), os.path.join(folder, codec),
                                cfg.frame_size, codec=codec)
            paths[f"prepared: {codec} {extension}"] = os.path.join(folder, codec, clip + extension)
        for name, path in paths.items():
            r = rows[name] = data.measure_read_speed(path, cfg.frame_size, cfg.num_frames)
            r["processes_per_gpu"] = math.ceil(needed_clips_per_s / r["clips_per_s"])
            row(name, f"{r['frames_per_s']:,.0f}", f"{r['clips_per_s']:,.1f}",
                f"{r['decode_frames_per_s']:,.0f}", r["processes_per_gpu"],
                " / ".join(map(seconds, r["seconds_per_clip"].values())))
    return {"needed_clips_per_s": needed_clips_per_s, "needed_from": needed_from,
            "read_paths": rows}


def part_transfer(ckpt, device):
    """A trained tokenizer on its held-out synthetic clips and on photographs filmed and read as
    those are (data.moving_photo, 64 frames, the first clip scored): do the clips predict photos?"""
    try:
        from skimage import data as photographs  # a bench and test dependency only
        model, saved = T.load_tokenizer(ckpt, device)
    except (ImportError, ValueError, OSError) as e:
        print(f"\ntransfer: unavailable ({e})")
        return {"unavailable": str(e)}
    cfg, train_config = model.config, saved.get("train_config") or {}
    table(f"Transfer: {ckpt} (step {saved.get('step')}, {cfg.num_frames}-frame clips at "
          f"{'x'.join(map(str, cfg.frame_size))}), PSNR against the yardsticks' (dB)", "clips of",
          "clips", "PSNR", "still frame (the clip's mean)", "patch blur", "PSNR - still frame")
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for seed, name in enumerate(PHOTOS):
            data.write_video(os.path.join(folder, name, f"{name}.mp4"),
                             data.moving_photo(getattr(photographs, name)(), seed=seed))
        sets = {"held-out synthetic clips": (saved["data"], "val")}
        sets.update({f"photograph: {name}": (os.path.join(folder, name), "all") for name in PHOTOS})
        for label, (videos, split) in sets.items():
            loader = evaluation.clip_loader(videos, cfg.frame_size, cfg.num_frames, split,
                                            val_fraction=train_config.get("val_fraction", 0.1),
                                            split_file=train_config.get("split_file", ""))
            batches = metrics.reconstruct(model, loader, cfg.num_frames, device, show=False)
            psnr = {"psnr": metrics.frame_metrics(None)["psnr"]}
            r = out[label] = metrics.score(batches, psnr, None, 1, device, model.patch_size)[0]
            marks = r["yardsticks"]
            row(label, r["clips"], f"{r['psnr']:.2f}", f"{marks['temporal_mean']:.2f}",
                f"{marks['patch_blur']:.2f}", f"{r['psnr'] - marks['temporal_mean']:+.2f}")
    photos = statistics.mean(out[f"photograph: {name}"]["psnr"] for name in PHOTOS)
    print(f"\nPhotographs: {photos:.2f} dB on average, "
          f"{photos - out['held-out synthetic clips']['psnr']:+.2f} dB from the held-out synthetic "
          f"clips.", flush=True)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=list(T.PRESETS))
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--parts", nargs="+", choices=PARTS,
                        help="default: all but gpu on CPU, gpu and loader on CUDA")
    parser.add_argument("--frames", nargs="+", type=int, default=[16, 32, 64, 128],
                        help="clip lengths, scaling")
    parser.add_argument("--batch_size", type=int, default=2, help="clips per step, scaling to dit")
    parser.add_argument("--json", default="", help="PATH: every number, written after each part")
    parser.add_argument("--ckpt", default="out/tokenizer.pt", help="transfer: a trained tokenizer")
    parser.add_argument("--dry_run", action="store_true",
                        help="gpu and loader at tiny sizes on the CPU (dynamo, eager backend)")
    args, command = parser.parse_args(argv), " ".join(["python bench.py", *argv])
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    try:
        device = H.pick_device("cpu" if args.dry_run else args.device)
    except ValueError as e:
        raise SystemExit(f"error: {str(e)[:-1]}, or rehearse the GPU check on the CPU with "
                         f"--dry_run.") from None
    frames = sorted(set(args.frames))
    configs = [dataclasses.replace(T.PRESETS[args.preset], num_frames=n) for n in frames]
    try:
        patches = [math.prod(shape_model(cfg).grid_size) for cfg in configs]
    except ValueError as e:
        raise SystemExit(f"error: --frames {' '.join(map(str, frames))} must fit "
                         f"`{args.preset}`: {e}") from None
    longest, num_samples = configs[-1], patches[-1] // 32  # the paper's 1024 of 32768
    if num_samples > patches[0]:
        raise SystemExit(f"error: --frames {frames[0]} and {frames[-1]} are too far apart: the "
                         f"{num_samples} patches sampled per clip (1/32 of the longest clip's) "
                         f"must fit in the shortest.")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        with open("/proc/cpuinfo") as f:  # Linux, as the memory readings
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), "CPU")
    threads = torch.get_num_threads()
    where = f"{name}, {threads} torch threads" if device.type == "cpu" else name
    what = "dry run: the tiny tokenizer" if args.dry_run else f"`{args.preset}` preset"
    print(f"## CoordTok bench: {what} on {device} ({where}), torch {torch.__version__}\n\n"
          f"`{command}`", flush=True)
    results = {"command": command, "device": str(device), "device_name": name, "threads": threads,
               "torch": torch.__version__, "preset": args.preset, "dry_run": args.dry_run}
    large, gpu_cfg = T.PRESETS["large"], T.PRESETS["tiny" if args.dry_run else args.preset]
    estimate = (f"`large`, estimated: 3 x flops_per_clip(1024) at {ASSUMED_MFU:.0%} of an H100's "
                f"989 TFLOP/s")
    measure_part = {
        "scaling": lambda: part_scaling(configs, args.batch_size, num_samples, device),
        "compile": lambda: part_compile(longest, args.batch_size, num_samples, device),
        "throughput": lambda: part_throughput(longest, args.batch_size, device),
        "dit": lambda: part_dit([longest] if latents(large) == latents(longest) else
                                [longest, large], args.batch_size, device),
        "gpu": lambda: part_gpu(gpu_cfg, device, args.dry_run),
        "loader": lambda: part_loader(gpu_cfg, results["gpu"]["clips_per_s"],
                                      f"measured by gpu on {where}", 1 if args.dry_run else 10)
        if "gpu" in results else part_loader(large, estimated_clips_per_s(large), estimate),
        "transfer": lambda: part_transfer(args.ckpt, device)}
    default = {"gpu", "loader"} if device.type == "cuda" or args.dry_run else set(PARTS) - {"gpu"}
    for part in sorted(set(args.parts or default), key=PARTS.index):
        results[part] = measure_part[part]()
        if args.json:  # after every part: a part that fails leaves the numbers of those before it
            evaluation.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
