"""
Speed and memory of CoordTok's training step as clips get longer, measured on our own code.

  python bench.py                                   # tiny model on the CPU, a few minutes
  python bench.py --frames 16,32 --parts scaling    # fewer rows
  python bench.py --device cuda --preset large --frames 16,32,64,128 --batch_size 8
  python bench.py --json out/bench.json             # every number, also as JSON
  python bench.py --profile                         # the top ops of one training step, then exit

The paper's central claim is that training cost stays nearly flat as clips get longer, because
only a fixed number of sampled patches is decoded, while a decoder that reconstructs every frame
grows with the clip. One run prints a markdown report with four tables, every ratio measured
side by side in that run:

  1. one training step (sample patches, forward, backward, clip, AdamW) of the same model at each
     of --frames, decoding --num_samples random patches per clip ("sampled") and decoding every
     patch of the clip ("full decode", the reconstruct-all-frames way): time and memory;
  2. eager against torch.compile, for that training step and for decode_video;
  3. encode and full-clip decode throughput (clips/s, frames/s, patches/s);
  4. one DiT training step on CoordTok's triplane tokens against the same DiT on a 3D latent grid
     of the same clip (4x8x8 down-sampling), at the bench clip and at the paper's clip.

The model is the same at every length: widths, depths and the triplane (Rs, Rt, C, hence the token
count) come from --preset; only num_frames, and with it the length of the encoder's and decoder's
position tables, follows the clip.

Memory is the peak a measurement reaches above the model and the input clip, less AdamW's
moments: gradients, activations and temporaries, which is what depends on the clip and on how much
of it is decoded (parameters and optimizer state are the same for every row; the JSON lists them).
On CUDA the peak is torch.cuda.max_memory_allocated. On the CPU it is the peak resident memory of
the process, which cannot be reset, so every measurement runs in a fresh process of its own
(`python bench.py --_worker SPEC`) where nothing measured before can hide in or add to its peak;
--max_memory_gib caps each such process, and a step that needs more is reported as out of memory.

Times are medians of --repeats calls after --warmup untimed ones (compilation happens there). On
CUDA the steps run under bf16 autocast, and model FLOP/s (CoordTok.flops_per_clip: forward matmul
FLOPs x 3 for forward and backward) is also given as MFU, a fraction of --peak_flops.
"""

import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import torch
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

import data as D
import dit
from tokenizer import (PRESETS, CoordTok, CoordTokConfig, autocast, configure_torch, make_optimizer,
                       parse_config, pick_device, validate_config)

# -----------------------------------------------------------------------------
# configuration


@dataclass
class BenchConfig:
    device: str = "auto"          # auto | cpu | cuda | cuda:N
    frames: str = "16,32,64,128"  # clip lengths of table 1; tables 2 and 3 use the longest
    batch_size: int = 4           # clips per training step
    num_samples: int = 0          # patches decoded per clip; 0: 1/32 of the longest clip's, the paper's 3.125%
    parts: str = "scaling,compile,throughput,dit"  # which tables (see above)
    warmup: int = 1               # untimed calls before timing (compilation happens here)
    repeats: int = 5              # timed calls; the median is reported
    time_budget: float = 10.0     # seconds of timed calls per measurement; slow ones get fewer repeats (>= 1)
    threads: int = 0              # torch threads on the CPU; 0: torch's default (one per core)
    max_memory_gib: float = 6.0   # CPU: address-space cap of each measurement's process
    timeout: int = 900            # seconds before a measurement's process is given up on
    compile_backend: str = "inductor"  # torch.compile backend of table 2 (aot_eager: tracing only, no codegen)
    dit_preset: str = "cpu"       # dit.PRESETS entry of table 4
    dit_batch_size: int = 4
    paper_clip: bool = True       # table 4 also at the paper's clip (128x128x128), when --preset is not large
    peak_flops: float = 989e12    # for MFU on CUDA: the accelerator's dense bf16 FLOP/s (H100 SXM)
    profile: bool = False         # print the top ops of one sampled training step and exit
    json: str = ""                # also write every number to this path


PARTS = ("scaling", "compile", "throughput", "dit")
# the paper's clip (128 frames of 128x128, the `large` preset) for the DiT comparison's second row
PAPER = PRESETS["large"]


def bench_model_config(base: CoordTokConfig, frames: int) -> CoordTokConfig:
    """The preset's model for a clip of `frames` frames: same widths, depths and triplane."""
    cfg = dataclasses.replace(base, num_frames=frames)
    try:
        validate_config(cfg)
    except ValueError as e:
        raise ValueError(f"--frames {frames} does not fit the model: {e}") from None
    return cfg


def default_num_samples(cfg: CoordTokConfig) -> int:
    return max(1, num_patches(cfg) // 32)


def num_patches(cfg: CoordTokConfig) -> int:
    """Decoder patches of one clip: gt * gh * gw."""
    return (cfg.num_frames // cfg.dec_patch_t) * (cfg.img_size // cfg.dec_patch_s) ** 2


def grid_planes(cfg: CoordTokConfig, down=(4, 8, 8)):
    """A 3D latent grid of the clip (C, T/4, H/8, W/8) as one plane (C, T/4 * H/8, W/8): same tokens."""
    t, s = cfg.num_frames // down[0], cfg.img_size // down[1]
    return [(cfg.triplane_c, t * s, cfg.img_size // down[2])]


def triplane_planes(cfg: CoordTokConfig):
    c, rs, rt = cfg.triplane_c, cfg.triplane_rs, cfg.triplane_rt
    return [(c, rs, rs), (c, rt, rs), (c, rt, rs)]


def plane_tokens(plane_shapes):
    """Tokens (C-vectors) of a latent made of (C, H, W) planes."""
    return sum(h * w for _, h, w in plane_shapes)


def dit_tokens(plane_shapes, patch):
    """The DiT's sequence length: each plane cut into patch x patch tokens."""
    return sum((h // patch) * (w // patch) for _, h, w in plane_shapes)


# -----------------------------------------------------------------------------
# measuring: time, memory


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup, repeats, time_budget):
    """Median seconds of fn() after `warmup` untimed calls. A call slower than time_budget / repeats
    gets fewer repeats (at least one), so a 40 s step does not take minutes to measure."""
    first = last = None
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        synchronize(device)
        last = time.perf_counter() - start
        first = last if first is None else first
    if last is not None:
        repeats = max(1, min(repeats, int(time_budget / max(last, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "times_s": times,
            "first_call_s": first if first is not None else times[0]}


def resident_bytes():
    """Resident memory of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_resident_bytes()


def peak_resident_bytes():
    """Peak resident memory of this process since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryMeter:
    """Peak memory above what is held when the meter starts.

    CUDA: the caching allocator's own peak (reset here). CPU: the process's peak resident memory,
    which cannot be reset; the number is only meaningful in a fresh process (see run_isolated).
    """

    def __init__(self, device):
        self.device = device
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.base = resident_bytes()

    def result(self, state_bytes=0):
        """memory_bytes: the peak above the start, less state_bytes of state that outlives the calls
        (AdamW's moments, created by the first step); process_peak_bytes: the whole peak."""
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = peak_resident_bytes()
        return {"memory_bytes": max(0, peak - self.base - state_bytes), "process_peak_bytes": peak}


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def random_clip(cfg, batch_size, device):
    """A clip of noise in [-1, 1], (B, T, H, W, 3): the cost of a step does not depend on the pixels."""
    g = torch.Generator(device).manual_seed(0)
    return torch.rand(batch_size, cfg.num_frames, cfg.img_size, cfg.img_size, 3, generator=g, device=device) * 2 - 1


def flop_rates(flops, seconds, device, peak_flops):
    rates = {"flops_per_call": flops, "tflops_per_s": flops / seconds / 1e12}
    rates["mfu"] = flops / seconds / peak_flops if device.type == "cuda" and peak_flops > 0 else None
    return rates


# -----------------------------------------------------------------------------
# the measurements: each builds what it needs, times it, and returns a flat dict


def build_train_step(model_config, mode, num_samples, batch_size, device, compile=False, attention="default",
                     compile_backend="inductor"):
    """One tokenizer training step as tokenizer.train takes it: pick patches and their pixels on the
    device, forward, L2 loss, backward, gradient clipping, AdamW. Returns (step, model, optimizer).

    mode "sampled": num_samples random patches per clip (data.sample_patches), CoordTok's way.
    mode "full": every patch of the clip (data.full_grid), the way of a decoder that reconstructs
    every frame, through the same model.forward.
    attention "default": SDPA picks its kernel (flash attention where it can); "math": SDPA's
    reference implementation (matmul, softmax, matmul), to see what the fused kernel is worth.
    """
    if mode not in ("sampled", "full"):
        raise ValueError(f"mode must be 'sampled' or 'full', got {mode!r}")
    if attention not in ("default", "math"):
        raise ValueError(f"attention must be 'default' or 'math', got {attention!r}")
    # a fresh context each step: sdpa_kernel's can only be entered once
    backend = nullcontext if attention == "default" else lambda: sdpa_kernel(SDPBackend.MATH)
    cfg = model_config
    if mode == "sampled" and not 1 <= num_samples <= num_patches(cfg):
        raise ValueError(f"--num_samples {num_samples} must be between 1 and the {num_patches(cfg)} patches "
                         f"of a {cfg.num_frames}-frame clip")
    torch.manual_seed(0)
    video = random_clip(cfg, batch_size, device)                          # (B, T, H, W, 3)
    n_frames = torch.full((batch_size,), cfg.num_frames, device=device)
    model = CoordTok(cfg).to(device)
    optimizer = make_optimizer(model, 1e-4, 1e-3, (0.9, 0.999), device)
    forward = torch.compile(model, backend=compile_backend) if compile else model
    generator = torch.Generator(device).manual_seed(0)

    def step():
        if mode == "sampled":
            coords, targets = D.sample_patches(video, n_frames, num_samples, model.patch_size, generator)
        else:  # full_grid is frame-major, and so is the patchified clip flattened in (t, h, w) order
            coords = D.full_grid(model.grid_size, device).expand(batch_size, -1, -1)      # (B, P, 3)
            targets = rearrange(D.patchify(video, model.patch_size), "b t h w d -> b (t h w) d")
        with backend(), autocast(device):
            loss, _ = forward(video, coords, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model, optimizer


def measure_train_step(model_config, mode="sampled", num_samples=256, batch_size=4, device="cpu", compile=False,
                       attention="default", warmup=1, repeats=5, time_budget=10.0, peak_flops=0.0,
                       compile_backend="inductor"):
    """Time and memory of one training step (see build_train_step), and its model FLOP/s."""
    device = torch.device(device)
    step, model, optimizer = build_train_step(model_config, mode, num_samples, batch_size, device, compile, attention,
                                              compile_backend)
    meter = MemoryMeter(device)  # model and clip exist: what follows is the step's
    timing = time_calls(step, device, warmup, repeats, time_budget)
    # AdamW's moments are the same for any clip and any decoding: counted apart, not in memory_bytes
    optimizer_state = tensor_bytes(t for state in optimizer.state.values() for t in state.values())
    decoded = num_samples if mode == "sampled" else num_patches(model_config)
    flops = 3 * model.flops_per_clip(decoded) * batch_size  # forward + backward (twice the forward)
    return {"measurement": "train_step", "mode": mode, "compiled": compile, "attention": attention,
            "frames": model_config.num_frames, "batch_size": batch_size, "decoded_patches": decoded,
            "clip_patches": num_patches(model_config),
            **timing, **meter.result(optimizer_state), "parameter_bytes": tensor_bytes(model.parameters()),
            "optimizer_state_bytes": optimizer_state, **flop_rates(flops, timing["time_s"], device, peak_flops),
            "threads": torch.get_num_threads()}


@torch.no_grad()
def measure_encode(model_config, batch_size=4, device="cpu", compile=False, warmup=1, repeats=5,
                   time_budget=10.0, compile_backend="inductor"):
    """Clip -> triplane, in eval mode."""
    device = torch.device(device)
    cfg = model_config
    torch.manual_seed(0)
    video = random_clip(cfg, batch_size, device)
    model = CoordTok(cfg).to(device).eval()
    encode = torch.compile(model.encode, backend=compile_backend) if compile else model.encode

    def call():
        with autocast(device):
            encode(video)

    meter = MemoryMeter(device)
    timing = time_calls(call, device, warmup, repeats, time_budget)
    return {"measurement": "encode", "compiled": compile, "frames": cfg.num_frames, "batch_size": batch_size,
            **timing, **throughput(cfg, batch_size, timing["time_s"]), **meter.result(),
            "threads": torch.get_num_threads()}


@torch.no_grad()
def measure_decode_video(model_config, batch_size=4, device="cpu", compile=False, warmup=1, repeats=5,
                         time_budget=10.0, compile_backend="inductor"):
    """Triplane -> every patch of the clip (decode_video, decode_chunk temporal patches at a time)."""
    device = torch.device(device)
    cfg = model_config
    torch.manual_seed(0)
    model = CoordTok(cfg).to(device).eval()
    with autocast(device):
        triplane = model.encode(random_clip(cfg, batch_size, device))
    if compile:
        # compile the decoder of one chunk, not decode_video: its loop over chunks stays in Python and
        # calls the one compiled graph each time (tracing the loop unrolls it: several times the compile)
        model.decode = torch.compile(model.decode, backend=compile_backend)

    def call():
        with autocast(device):
            model.decode_video(triplane)

    meter = MemoryMeter(device)
    timing = time_calls(call, device, warmup, repeats, time_budget)
    return {"measurement": "decode_video", "compiled": compile, "frames": cfg.num_frames,
            "batch_size": batch_size, **timing, **throughput(cfg, batch_size, timing["time_s"]),
            **meter.result(), "threads": torch.get_num_threads()}


def throughput(cfg, batch_size, seconds):
    return {"clips_per_s": batch_size / seconds, "frames_per_s": batch_size * cfg.num_frames / seconds,
            "patches_per_s": batch_size * num_patches(cfg) / seconds}


def measure_dit_step(sit_config, plane_shapes, batch_size=4, device="cpu", compile=False, warmup=1, repeats=5,
                     time_budget=10.0, peak_flops=0.0, compile_backend="inductor"):
    """One DiT training step as dit.train takes it: flow-matching loss, backward, gradient clipping,
    AdamW, EMA update; unconditional, on planes of the given shapes.

    The triplane is three planes; a 3D latent grid (C, T', H', W') is passed as the one plane
    (C, T'*H', W'), which has the same number of tokens for the same patch size.
    """
    device = torch.device(device)
    plane_shapes = [tuple(s) for s in plane_shapes]
    torch.manual_seed(0)
    planes = tuple(torch.randn(batch_size, *shape, device=device) for shape in plane_shapes)  # (B, C, H, W) each
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    model = dit.SiT(sit_config, plane_shapes, num_classes=1).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = make_optimizer(model, 1e-4, 0.0, (0.9, 0.999), device)
    forward = torch.compile(model, backend=compile_backend) if compile else model
    generator = torch.Generator(device).manual_seed(0)

    def step():
        with autocast(device):
            loss = dit.flow_matching_loss(forward, planes, labels, generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dit.ema_update(ema, model, 0.9999)

    meter = MemoryMeter(device)
    timing = time_calls(step, device, warmup, repeats, time_budget)
    optimizer_state = tensor_bytes(t for state in optimizer.state.values() for t in state.values())
    flops = 3 * model.flops_per_sample() * batch_size
    return {"measurement": "dit_step", "compiled": compile, "plane_shapes": [list(s) for s in plane_shapes],
            "tokens": plane_tokens(plane_shapes), "dit_tokens": dit_tokens(plane_shapes, sit_config.patch_size),
            "batch_size": batch_size, **timing, **meter.result(optimizer_state),
            "parameter_bytes": tensor_bytes(model.parameters()), "optimizer_state_bytes": optimizer_state,
            **flop_rates(flops, timing["time_s"], device, peak_flops), "threads": torch.get_num_threads()}


def op_group(name):
    """Which kind of work an op (CPU) or kernel (CUDA) of the profile is."""
    n = name.lower()
    if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear") or any(
            k in n for k in ("gemm", "nvjet", "cutlass", "attention", "flash", "fmha", "sdpa")):  # CUDA kernels
        return "matrix work (matmuls, attention)"
    if any(k in n for k in ("topk", "gather", "grid_sampler", "index", "scatter", "embedding", "masked_fill",
                            "aten::rand", "aten::sort")):
        return "patch sampling, triplane lookup, position indexing"
    if any(k in n for k in ("copy", "aten::cat", "cat_", "clone", "contiguous", "aten::stack", "memcpy", "memset")):
        return "data movement (copies, cat)"
    return "everything else (elementwise, norms, optimizer)"


def profile_train_step(model_config, num_samples=256, batch_size=4, device="cpu", steps=3, row_limit=10):
    """The ops that take the most self time in `steps` sampled training steps (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile
    device = torch.device(device)
    step, _, _ = build_train_step(model_config, "sampled", num_samples, batch_size, device)
    step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)  # microseconds, every op counted once
    rows = [{"op": e.key, "group": op_group(e.key), "self_ms_per_step": getattr(e, key) / 1e3 / steps,
             "percent": 100 * getattr(e, key) / total, "calls_per_step": e.count / steps}
            for e in events[:row_limit]]
    groups = {}
    for e in events:
        groups[op_group(e.key)] = groups.get(op_group(e.key), 0.0) + 100 * getattr(e, key) / total
    return {"measurement": "profile", "frames": model_config.num_frames, "batch_size": batch_size,
            "decoded_patches": num_samples, "step_s_profiled": seconds, "self_ms_per_step": total / 1e3 / steps,
            "clock": "device" if device.type == "cuda" else "cpu", "rows": rows,
            "group_percent": dict(sorted(groups.items(), key=lambda kv: -kv[1]))}


# -----------------------------------------------------------------------------
# one measurement per process


MEASUREMENTS = {f.__name__: f for f in (measure_train_step, measure_encode, measure_decode_video, measure_dit_step)}
RESULT_PREFIX = "BENCH_RESULT "


def _to_json(kwargs):
    return {k: asdict(v) if dataclasses.is_dataclass(v) else str(v) if isinstance(v, torch.device) else v
            for k, v in kwargs.items()}


def _from_json(kwargs):
    kwargs = dict(kwargs)
    if "model_config" in kwargs:
        kwargs["model_config"] = CoordTokConfig(**kwargs["model_config"])
    if "sit_config" in kwargs:
        kwargs["sit_config"] = dit.SiTConfig(**kwargs["sit_config"])
    return kwargs


def run_isolated(function, threads=0, max_memory_gib=0.0, timeout=900, **kwargs):
    """Run MEASUREMENTS[function](**kwargs) in a fresh Python process and return its result dict.

    A fresh process per measurement is what makes the CPU's peak resident memory mean something:
    nothing allocated (or cached by the allocator) by an earlier measurement is in it. A
    measurement that fails returns {"error": reason} instead, e.g. "out of memory".
    """
    spec = {"function": function, "kwargs": _to_json(kwargs), "threads": threads, "max_memory_gib": max_memory_gib}
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, os.path.join(here, "bench.py"), "--_worker", json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=here)
    except subprocess.TimeoutExpired:
        return {"error": f"took longer than {timeout} s (--timeout)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    if proc.returncode in (-9, 137):  # SIGKILL, most likely the kernel's out-of-memory killer
        return {"error": "out of memory (the process was killed)"}
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"the measurement's process exited with code {proc.returncode}: {last}"}


def describe_error(e, max_memory_gib):
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    out_of_memory = (isinstance(e, MemoryError) or "OutOfMemoryError" in type(e).__name__
                     or "can't allocate memory" in text or "not enough memory" in text)
    if out_of_memory:
        cap = f" (the {max_memory_gib:g} GiB cap of --max_memory_gib)" if max_memory_gib > 0 else ""
        return f"out of memory{cap}"
    return text[:300]


def worker_main(spec_json):
    """`python bench.py --_worker SPEC`: one measurement, its result printed as one JSON line."""
    spec = json.loads(spec_json)
    kwargs = _from_json(spec["kwargs"])
    device = torch.device(kwargs.get("device", "cpu"))
    cap = spec.get("max_memory_gib", 0.0)
    if device.type == "cpu" and cap > 0:  # a CUDA process maps far more address space than it uses
        limit = int(cap * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if spec.get("threads", 0) > 0:
        torch.set_num_threads(spec["threads"])
    configure_torch(device)
    try:
        result = MEASUREMENTS[spec["function"]](**kwargs)
    except Exception as e:  # reported in the table, so that one failure does not end the whole run
        result = {"error": describe_error(e, cap)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# -----------------------------------------------------------------------------
# the report


def seconds_text(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def bytes_text(b):
    return f"{b / 2 ** 20:.0f} MiB" if b < 2 ** 30 else f"{b / 2 ** 30:.2f} GiB"


def ratio_text(x):
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def ok(result):
    return result is not None and "error" not in result


def cell(result, key, text):
    """A table cell: the formatted number, or why there is none."""
    if result is None:
        return "-"
    if not ok(result):
        return "out of memory" if result["error"].startswith("out of memory") else "failed (see below)"
    return text(result[key])


def ratio_cell(a, b, key):
    return ratio_text(b[key] / a[key]) if ok(a) and ok(b) and a[key] > 0 else "-"


def failures(named_results):
    """Why the cells that hold no number hold none, as a list under the table."""
    notes = [f"- {name}: {r['error']}" for name, r in named_results if r is not None and not ok(r)]
    return ["", "Failed:", *notes] if notes else []


def extrapolated_memory(rows, mode, frames):
    """Memory of a step that could not run, extrapolated linearly in clip length from the two
    longest clips that did (activations grow linearly with the tokens; attention is SDPA)."""
    measured = [(row["frames"], row[mode]["memory_bytes"]) for row in rows if ok(row[mode])]
    if len(measured) < 2:
        return None
    (f0, m0), (f1, m1) = measured[-2:]
    return m1 + (m1 - m0) / (f1 - f0) * (frames - f1)


def scaling_table(rows, device):
    flops_header = "sampled: model TFLOP/s" + (" (MFU)" if device.type == "cuda" else "")
    lines = ["| frames | patches per clip | sampled: patches | sampled: step | sampled: memory | "
             f"{flops_header} | full decode: step | full decode: memory | full / sampled: time | "
             "full / sampled: memory |", "|" + "---|" * 10]

    def flops(r):
        mfu = f" ({r['mfu']:.1%})" if r.get("mfu") is not None else ""
        return f"{r['tflops_per_s']:.3g}{mfu}"

    named = []
    for row in rows:
        s, f = row["sampled"], row["full"]
        patches = next((r["clip_patches"] for r in (s, f) if ok(r)), "-")
        lines.append(f"| {row['frames']} | {patches} | {cell(s, 'decoded_patches', str)} | "
                     f"{cell(s, 'time_s', seconds_text)} | {cell(s, 'memory_bytes', bytes_text)} | "
                     f"{flops(s) if ok(s) else '-'} | {cell(f, 'time_s', seconds_text)} | "
                     f"{cell(f, 'memory_bytes', bytes_text)} | {ratio_cell(s, f, 'time_s')} | "
                     f"{ratio_cell(s, f, 'memory_bytes')} |")
        named += [(f"sampled, {row['frames']} frames", s), (f"full decode, {row['frames']} frames", f)]
    lines.append("")
    first, last = rows[0], rows[-1]
    if len(rows) > 1:
        growth = {(mode, key): ratio_cell(first[mode], last[mode], key) if ok(first[mode]) and ok(last[mode])
                  else "not measured" for mode in ("sampled", "full") for key in ("memory_bytes", "time_s")}
        lines.append(f"From {first['frames']} to {last['frames']} frames: memory of the sampled step "
                     f"{growth['sampled', 'memory_bytes']}, of the full-decode step {growth['full', 'memory_bytes']}; "
                     f"time of the sampled step {growth['sampled', 'time_s']}, of the full-decode step "
                     f"{growth['full', 'time_s']}.")
    if ok(last["sampled"]) and ok(last["full"]):
        lines.append(f"At {last['frames']} frames the full decode needs "
                     f"{ratio_cell(last['sampled'], last['full'], 'memory_bytes')} the memory and "
                     f"{ratio_cell(last['sampled'], last['full'], 'time_s')} the time of the sampled step.")
    state = next((r for r in (last["sampled"], last["full"]) if ok(r)), None)
    if state is not None:
        lines.append(f"Not counted, the same in every row: the parameters ({bytes_text(state['parameter_bytes'])}) "
                     f"and their AdamW moments ({bytes_text(state['optimizer_state_bytes'])}).")
    for row in rows:
        if not ok(row["full"]) and row["full"]["error"].startswith("out of memory"):
            estimate = extrapolated_memory(rows, "full", row["frames"])
            need = f", needs ~{bytes_text(estimate)} (extrapolated)" if estimate else ""
            lines.append(f"The full-decode step cannot run at {row['frames']} frames{need}.")
    return lines + failures(named)


def compile_table(rows, frames, batch_size):
    lines = [f"| workload ({frames} frames, batch {batch_size}) | eager | compiled | speed-up | "
             "compile time | eager memory | compiled memory |", "|" + "---|" * 7]
    named = []
    for row in rows:
        e, c = row["eager"], row["compiled"]
        compile_s = seconds_text(c["first_call_s"] - c["time_s"]) if ok(c) else "-"
        lines.append(f"| {row['workload']} | {cell(e, 'time_s', seconds_text)} | {cell(c, 'time_s', seconds_text)} | "
                     f"{ratio_cell(c, e, 'time_s')} | {compile_s} | {cell(e, 'memory_bytes', bytes_text)} | "
                     f"{cell(c, 'memory_bytes', bytes_text)} |")
        named += [(f"{row['workload']}, eager", e), (f"{row['workload']}, compiled", c)]
    return lines + failures(named)


def throughput_table(rows, cfg):
    pt, ps = cfg.dec_patch_t, cfg.dec_patch_s
    lines = [f"| workload ({cfg.num_frames} frames of {cfg.img_size}x{cfg.img_size}) | batch | time per call | "
             f"clips/s | frames/s | patches/s ({pt}x{ps}x{ps}) |", "|" + "---|" * 6]
    number = lambda x: f"{x:.3g}" if x < 1000 else f"{x:,.0f}"
    for r in rows:
        lines.append(f"| {r['workload']} | {r.get('batch_size', '-')} | {cell(r, 'time_s', seconds_text)} | "
                     f"{cell(r, 'clips_per_s', number)} | {cell(r, 'frames_per_s', number)} | "
                     f"{cell(r, 'patches_per_s', number)} |")
    return lines + failures([(r["workload"], r) for r in rows])


def dit_table(rows, patch):
    lines = [f"| clip | latent | shape (C, H, W) per plane | tokens | DiT tokens (patch {patch}) | step | memory | "
             "time vs triplane | memory vs triplane |", "|" + "---|" * 9]
    named = []
    for row in rows:
        for latent in ("triplane", "grid"):
            r = row[latent]
            shapes = " + ".join("x".join(map(str, s)) for s in row[f"{latent}_shapes"])
            name = "CoordTok triplane" if latent == "triplane" else "3D grid, 4x8x8 down"
            lines.append(f"| {row['clip']} | {name} | {shapes} | {row[f'{latent}_tokens']} | "
                         f"{row[f'{latent}_dit_tokens']} | {cell(r, 'time_s', seconds_text)} | "
                         f"{cell(r, 'memory_bytes', bytes_text)} | {ratio_cell(row['triplane'], r, 'time_s')} | "
                         f"{ratio_cell(row['triplane'], r, 'memory_bytes')} |")
            named.append((f"{row['clip']}, {name}", r))
    return lines + failures(named)


def profile_table(result):
    lines = [f"Top ops of the sampled training step ({result['frames']} frames, batch {result['batch_size']}, "
             f"{result['decoded_patches']} patches per clip), by self {result['clock']} time; "
             f"{seconds_text(result['step_s_profiled'])} per step under the profiler.", "",
             "| op | kind | self ms per step | share | calls per step |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['op']} | {r['group'].split(' (')[0]} | {r['self_ms_per_step']:.2f} | "
                     f"{r['percent']:.1f}% | {r['calls_per_step']:g} |")
    shares = ", ".join(f"{name} {share:.1f}%" for name, share in result["group_percent"].items())
    return lines + ["", f"Self time by kind, all ops: {shares}."]


# -----------------------------------------------------------------------------
# main


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def parse_list(text, flag, allowed=None, kind=str):
    try:
        values = [kind(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"--{flag} must be a comma-separated list, got {text!r}") from None
    if not values or (allowed and any(v not in allowed for v in values)):
        raise ValueError(f"--{flag} {text!r}: expected a comma-separated list"
                         + (f" of {', '.join(allowed)}" if allowed else ""))
    return values


def run_bench(base, bc, preset_name, command):
    """Measure what --parts asks for, print the report, return every number (the --json content)."""
    device = pick_device(bc.device)
    frames = sorted(set(parse_list(bc.frames, "frames", kind=int)))
    if frames[0] < 1:
        raise ValueError(f"--frames must be positive clip lengths, got {bc.frames!r}")
    parts = parse_list(bc.parts, "parts", allowed=PARTS)
    configs = {f: bench_model_config(base, f) for f in frames}
    longest = configs[frames[-1]]
    num_samples = bc.num_samples or default_num_samples(longest)
    if not 1 <= num_samples <= num_patches(configs[frames[0]]):
        raise ValueError(f"--num_samples {num_samples} must be between 1 and the {num_patches(configs[frames[0]])} "
                         f"patches of the shortest clip ({frames[0]} frames)")
    if bc.dit_preset not in dit.PRESETS:
        raise ValueError(f"unknown --dit_preset {bc.dit_preset!r}; choose one of {', '.join(dit.PRESETS)}")
    sit = dit.PRESETS[bc.dit_preset]
    if bc.threads > 0:
        torch.set_num_threads(bc.threads)
    results = {"command": command, "device": str(device), "device_name": device_name(device),
               "torch": torch.__version__, "threads": torch.get_num_threads() if device.type == "cpu" else None,
               "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
               "preset": preset_name, "num_samples": num_samples, "model_config": asdict(longest),
               "bench_config": asdict(bc), "scaling": [], "compile": [], "throughput": [], "dit": []}
    if bc.profile:  # one process, no memory numbers: only the ranking of the ops matters
        configure_torch(device)
        results["profile"] = profile_train_step(longest, num_samples, bc.batch_size, device)
        print("\n".join(profile_table(results["profile"])))
        return results

    cache = {}

    def measure(label, function, **kwargs):
        """Run a measurement in its own process, once: tables that show the same one share it."""
        kwargs = {"device": str(device), "warmup": bc.warmup, "repeats": bc.repeats,
                  "time_budget": bc.time_budget, **kwargs}
        key = json.dumps([function, _to_json(kwargs)], sort_keys=True)
        if key not in cache:
            print(f"measuring {label} ...", end=" ", file=sys.stderr, flush=True)
            start = time.time()
            cache[key] = run_isolated(function, bc.threads, bc.max_memory_gib, bc.timeout, **kwargs)
            status = "ok" if ok(cache[key]) else cache[key]["error"]
            print(f"{status} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
        return cache[key]

    def train_step(cfg, mode, compile=False, attention="default"):
        label = f"training step, {mode}, {cfg.num_frames} frames" + (", compiled" if compile else "") + (
            f", {attention} attention" if attention != "default" else "")
        # the first compiled call compiles; a second can still recompile, so it is not timed either
        return measure(label, "measure_train_step", model_config=cfg, mode=mode, num_samples=num_samples,
                       batch_size=bc.batch_size, compile=compile, attention=attention, peak_flops=bc.peak_flops,
                       warmup=max(bc.warmup, 2) if compile else bc.warmup, compile_backend=bc.compile_backend)

    def decode_video(compile):
        return measure(f"decode_video, {longest.num_frames} frames{', compiled' if compile else ''}",
                       "measure_decode_video", model_config=longest, batch_size=bc.batch_size, compile=compile,
                       warmup=max(bc.warmup, 2) if compile else bc.warmup, compile_backend=bc.compile_backend)

    if "scaling" in parts:
        results["scaling"] = [{"frames": f, "sampled": train_step(configs[f], "sampled"),
                               "full": train_step(configs[f], "full")} for f in frames]
    if "compile" in parts:
        results["compile"] = [
            {"workload": "training step, sampled", "eager": train_step(longest, "sampled"),
             "compiled": train_step(longest, "sampled", compile=True)},
            {"workload": "decode_video", "eager": decode_video(False), "compiled": decode_video(True)}]
        results["attention"] = {"default": train_step(longest, "sampled"),
                                "math": train_step(longest, "sampled", attention="math")}
    if "throughput" in parts:
        encode = measure(f"encode, {longest.num_frames} frames", "measure_encode", model_config=longest,
                         batch_size=bc.batch_size)
        results["throughput"] = [{"workload": "encode", **encode}, {"workload": "decode_video", **decode_video(False)}]
        if "compile" in parts:
            results["throughput"].append({"workload": "decode_video, compiled", **decode_video(True)})
    if "dit" in parts:
        same = triplane_planes(longest) == triplane_planes(PAPER) and grid_planes(longest) == grid_planes(PAPER)
        clips = [("bench clip", longest)] + ([("paper clip", PAPER)] if bc.paper_clip and not same else [])
        for name, cfg in clips:
            row = {"clip": f"{name}: {cfg.num_frames}x{cfg.img_size}x{cfg.img_size}"}
            for latent, shapes in (("triplane", triplane_planes(cfg)), ("grid", grid_planes(cfg))):
                row[f"{latent}_shapes"] = shapes
                row[f"{latent}_tokens"] = plane_tokens(shapes)
                row[f"{latent}_dit_tokens"] = dit_tokens(shapes, sit.patch_size)
                row[latent] = measure(f"DiT step, {latent}, {row['clip']}", "measure_dit_step", sit_config=sit,
                                      plane_shapes=shapes, batch_size=bc.dit_batch_size, peak_flops=bc.peak_flops)
            results["dit"].append(row)
    if device.type == "cpu":  # what the measuring processes ran with
        results["threads"] = next((r["threads"] for r in cache.values() if ok(r)), results["threads"])
    print(report(results, bc, device, longest, sit))
    return results


def report(results, bc, device, longest, sit):
    """The markdown report: a header naming what was run where, then one table per part measured."""
    load = (f"; load average {results['load_average']:.1f} on {results['cpu_count']} cores at the start"
            if results["load_average"] is not None else "")
    threads = f", {results['threads']} thread{'s' if results['threads'] != 1 else ''}" if device.type == "cpu" else ""
    lines = [f"## CoordTok bench: `{results['preset']}` preset, batch {bc.batch_size}, "
             f"{results['num_samples']} sampled patches per clip", "",
             f"Device {device} ({results['device_name']}), torch {results['torch']}{threads}{load}. "
             f"Command: `{results['command']}`", "",
             "Memory: the peak above the model and the input clip, less the AdamW moments (so: gradients, "
             "activations, temporaries), each measurement in a fresh process; "
             + ("torch.cuda.max_memory_allocated. " if device.type == "cuda" else "peak resident memory. ")
             + f"Times: median of up to {bc.repeats} calls after {bc.warmup} untimed ({bc.time_budget:g} s "
             "of timed calls at most, at least one)."]
    if results["scaling"]:
        lines += ["", "### 1. One training step as the clip grows: sampled patches vs every patch", "",
                  f"Sampled: {results['num_samples']} random patches per clip, CoordTok's way. Full decode: every "
                  "patch of the clip through the same model.forward, the way of a decoder that reconstructs every "
                  "frame.", ""]
        lines += scaling_table(results["scaling"], device)
    if results["compile"]:
        backend = "" if bc.compile_backend == "inductor" else f" (backend {bc.compile_backend})"
        lines += ["", f"### 2. Eager vs torch.compile{backend}", ""]
        lines += compile_table(results["compile"], longest.num_frames, bc.batch_size)
        fused, math_ = results["attention"]["default"], results["attention"]["math"]
        lines.append("")
        if ok(fused) and ok(math_):
            lines.append(f"Attention backend, eager training step: SDPA's own choice of kernel "
                         f"{seconds_text(fused['time_s'])}, {bytes_text(fused['memory_bytes'])}; its math backend "
                         f"{seconds_text(math_['time_s'])}, {bytes_text(math_['memory_bytes'])} "
                         f"({ratio_cell(fused, math_, 'time_s')} the time).")
        lines += failures([("training step, math attention", math_)])
        if device.type == "cpu":
            lines.append("On the CPU a compiled process's peak also holds the compiler's own memory.")
    if results["throughput"]:
        lines += ["", "### 3. Encode and full-clip decode throughput (eval mode, no gradients)", ""]
        lines += throughput_table(results["throughput"], longest)
    if results["dit"]:
        lines += ["", f"### 4. One DiT training step (SiT `{bc.dit_preset}`, batch {bc.dit_batch_size}) on CoordTok's "
                      "tokens vs a 3D latent grid of the same clip", ""]
        lines += dit_table(results["dit"], sit.patch_size)
        tri, grid = triplane_planes(PAPER), grid_planes(PAPER)
        lines += ["", f"At the paper's clip (128 frames of 128x128) CoordTok has {plane_tokens(tri)} tokens, "
                      f"{dit_tokens(tri, 2)} DiT tokens at patch 2; a 4x8x8 latent grid has {plane_tokens(grid)}, "
                      f"{dit_tokens(grid, 2)} DiT tokens."]
    return "\n".join(lines).rstrip()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--_worker"]:
        return worker_main(argv[1])
    if any(a.split("=")[0] == "--num_frames" for a in argv):
        raise SystemExit("error: bench.py sets the clip length with --frames (a list, e.g. --frames 16,32), "
                         "not --num_frames")
    base, bc = parse_config((CoordTokConfig, BenchConfig), PRESETS, argv, description=__doc__.split("\n\n")[0].strip())
    preset_name = next((a.split("=", 1)[1] if "=" in a else argv[i + 1]
                        for i, a in enumerate(argv) if a.split("=")[0] == "--preset"), "tiny")
    command = " ".join(["python bench.py", *argv])
    try:
        results = run_bench(base, bc, preset_name, command)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if bc.json:
        os.makedirs(os.path.dirname(os.path.abspath(bc.json)), exist_ok=True)
        with open(bc.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {bc.json}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
