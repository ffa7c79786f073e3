"""The training harness the scripts share (a first reader may skip this file): processes, signals,
the schedule, a run's record, flags and configs, safe files, fetched weights, the authors' files."""

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from einops import rearrange

# -----------------------------------------------------------------------------
# processes and devices


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    ddp: bool

    @property
    def is_main(self):
        return self.rank == 0

    def share(self, n):
        """This rank's items of range(n): a contiguous block, the first ones on rank 0."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)


def pick_device(flag="auto"):
    if flag == "auto":
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    if flag != "cpu" and not re.fullmatch(r"cuda(:\d+)?", flag):
        raise ValueError(f"--device {flag!r} is not one of auto, cpu, cuda, cuda:N.")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {flag}: CUDA is not available; use --device cpu.")
    if flag.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(flag)


def setup_distributed(device_flag="auto"):
    """Single process, or one rank of `torchrun` (NCCL on CUDA, gloo on CPU)."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in
                          (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")))
    device = pick_device(device_flag)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device, world > 1)


def cleanup_distributed(dist):
    if dist.ddp:
        torch.distributed.destroy_process_group()


def gather_to_main(dist, obj):
    """[every rank's obj] on rank 0 (None elsewhere); [obj] in a single process (dist None)."""
    if dist is None or not dist.ddp:
        return [obj]
    out = [None] * dist.world_size if dist.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


@contextlib.contextmanager
def errors_as_exit(*kinds):
    """A known error (a wrong flag, a missing or damaged file) ends the script with its message."""
    try:
        yield
    except (ValueError, OSError, WeightsUnavailable, *kinds) as e:
        raise SystemExit(f"error: {e}") from None


def autocast(device):  # bf16 on CUDA, fp32 on the CPU
    cuda = device.type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


def agree(dist, *values):
    """The largest of each value over the ranks, an int: all stop at one step, for one reason."""
    if dist.ddp:
        values = torch.tensor(values, dtype=torch.float64, device=dist.device)
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return [int(v) for v in values]


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) as requests to stop: the list of those
    received, read by the loop after each step. A second one acts as it would (ends, raises)."""
    received = []

    def catch(signum, frame):
        received.append(signum)
        signal.signal(signum, previous[signum])

    previous = {s: signal.signal(s, catch) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# the schedule, the optimizer's groups, skipped steps


def lr_at(step, tc):
    """Linear warmup, then constant, or cosine decay to min_lr at lr_decay_iters (0: max_iters)."""
    if step < tc.warmup_iters:
        return tc.learning_rate * (step + 1) / tc.warmup_iters
    if tc.lr_schedule == "constant":
        return tc.learning_rate
    end = tc.lr_decay_iters or tc.max_iters
    progress = min(1.0, (step - tc.warmup_iters) / max(1, end - tc.warmup_iters))
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (tc.learning_rate - tc.min_lr)


def decay_groups(model, weight_decay):
    """The optimizer's groups: weight decay on linear and convolution weights, none on the rest."""
    decayed = {id(m.weight) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]


def diverged(bad_steps, ckpt_path):
    """The error after bad_steps non-finite steps in a row, naming the last good checkpoint."""
    kept = ckpt_path if os.path.exists(ckpt_path) else "no checkpoint was written"
    return ValueError(f"{bad_steps} non-finite steps in a row (last good file: {kept}); lower "
                      f"--learning_rate or check the data, then --resume.")


def warn_skipped_step(bad_steps, max_bad_steps, ckpt_path):
    """A step skipped for a non-finite gradient; the run stops after max_bad_steps in a row."""
    warnings.warn(f"non-finite loss or gradient, step skipped ({bad_steps} in a row)")
    if bad_steps >= max_bad_steps:
        raise diverged(bad_steps, ckpt_path)


def end_run(dist, tc, lock, log, step, signum, ckpt_path, note=""):
    """Close the run's record (drawing its curves) and its lock, and say how it ended. A run a
    signal stopped exits as one the signal ended (143 SIGTERM, 130 SIGINT), for relaunch scripts."""
    curves = log.close()
    if dist.is_main and signum:
        print(f"{signal.Signals(signum).name} at step {step}: saved {ckpt_path}; continue it "
              f"with --resume")
    elif dist.is_main:
        stopped = f", stopped by --max_time {tc.max_time}" if step < tc.max_iters else ""
        print(f"saved {ckpt_path} (step {step}{stopped}); its curves: {curves}{note}")
    lock.close()
    cleanup_distributed(dist)
    if signum:
        raise SystemExit(128 + signum)


# -----------------------------------------------------------------------------
# the record of a run: a JSON line per log interval and evaluation, and its curves


class RunLog:
    """out_dir/<name>_log.jsonl, and wandb_project if given: a JSON line per record from rank 0,
    flushed (a kill loses at most one); a resumed run keeps those up to its step, then appends."""

    def __init__(self, out_dir, name, start_step, enabled, wandb_project="", config=None):
        self.path, self.file, self.wandb = os.path.join(out_dir, f"{name}_log.jsonl"), None, None
        if not enabled:
            return
        kept = [r for r in read_log(self.path) if r["step"] <= start_step] if start_step else []
        with atomic_path(self.path) as temporary, open(temporary, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self.file = open(self.path, "a")
        if wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=name, config=config)

    def write(self, record):  # {"step": ..., figures}; NaN and inf written as null (valid JSON)
        if self.file is None:
            return
        record = json_safe(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self):  # draws the curves: returns their path (None where not enabled)
        if self.file is not None:
            self.file.close()
            return write_curves(self.path)


def json_safe(obj):
    """obj with NaN and inf as None: JSON that strict parsers read (null)."""
    return json.loads(json.dumps(obj), parse_constant=lambda constant: None)


def read_log(path):
    """The records of a RunLog file; a line torn by a kill is left out."""
    records = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict) and "step" in r]


def write_curves(log_path):
    """<name>_curves.svg beside a RunLog file: a panel per figure, held_out_psnr (red) with psnr."""
    panels = {}  # name -> {record key: [(step, value)]}
    for r in read_log(log_path):
        for key, v in r.items():
            if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                lines = panels.setdefault(key.removeprefix("held_out_"), {})
                lines.setdefault(key, []).append((r["step"], v))
    w, h = 296, 126  # a plot, inside a panel of 340 x 190 with room for its title and axes
    rows = (len(panels) + 1) // 2
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="688" height="{rows * 190}" font-family='
           '"sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>']
    for n, (name, lines) in enumerate(panels.items()):
        left, top = n % 2 * 340 + 44, n // 2 * 190 + 24
        (x0, x1), (y0, y1) = ((min(v), max(v)) for v in zip(*sum(lines.values(), [])))
        if any(key.startswith("held_out_") for key in lines):
            name += " (red: held out)"
        svg.append(f'<text x="{left}" y="{top - 8}">{name}</text><rect x="{left}" y="{top}" '
                   f'width="{w}" height="{h}" fill="none" stroke="#999"/><text x="{left - 42}" '
                   f'y="{top + 10}">{y1:.3g}</text><text x="{left - 42}" y="{top + h}">{y0:.3g}'
                   f'</text><text x="{left}" y="{top + h + 16}">{x0}</text><text x="{left + w}" '
                   f'y="{top + h + 16}" text-anchor="end">step {x1}</text>')
        for key, line in lines.items():
            xy = " ".join(f"{left + (x - x0) / max(x1 - x0, 1) * w:.1f},"
                          f"{top + h - (y - y0) / max(y1 - y0, 1e-12) * h:.1f}" for x, y in line)
            colour = "#d62728" if key.startswith("held_out_") else "#1f77b4"
            svg.append(f'<polyline points="{xy}" fill="none" stroke-width="1.5" '
                       f'stroke="{colour}"/>')
    path = log_path.removesuffix("_log.jsonl") + "_curves.svg"
    with atomic_path(path) as temporary, open(temporary, "w") as f:
        f.write("".join(svg) + "</svg>\n")
    return path


# -----------------------------------------------------------------------------
# flags and configs


def _parse_bool(s):
    if s.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("1", "true", "yes", "on")


# metadata of fields that several configs have
SEED = {"below": 2 ** 32}  # the seeds drawn from, seed * 1_000_003 + step, fit in 64 bits
COMPILE = {"choices": ("auto", "true", "false")}  # auto: on for CUDA


@dataclass
class LoopConfig:
    """The flags both training loops take (tokenizer.TrainConfig and dit.DiTTrainConfig add their
    own): the schedule, AdamW, clipping, the record, checkpoints, stopping, the processes. A field
    added later defaults to what older code did: a checkpoint without it loads with that default."""
    out_dir: str = "out"
    resume: bool = False         # continue the run in out_dir exactly where it stopped
    max_iters: int = 3000
    batch_size: int = 8          # clips per step on each process
    grad_accum: int = 1
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    lr_schedule: str = field(default="cosine", metadata={"choices": ("constant", "cosine")})
    warmup_iters: int = field(default=100, metadata={"min": 0})
    lr_decay_iters: int = 0      # 0: max_iters
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0       # 0: no clipping
    log_interval: int = 10
    ckpt_interval: int = 500
    max_time: float = 0.0        # minutes; stop (and save) once exceeded, 0: no limit
    max_bad_steps: int = 20      # non-finite steps in a row before the run stops
    peak_flops: float = 989e12   # MFU: the accelerator's dense bf16 FLOP/s (H100 SXM)
    seed: int = field(default=0, metadata=SEED)
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    compile: str = field(default="auto", metadata=COMPILE)
    wandb_project: str = ""      # also log to this wandb project (pip install wandb)


def field_problems(config):
    """What is wrong with a config's values, as its fields declare in their metadata: "choices"
    (the values allowed), "min" and "below" (the bounds of a number). Without "min", a float or an
    int whose default is 0 (off, none, automatic) is >= 0, another int >= 1; numbers are finite."""
    problems = []
    for f in dataclasses.fields(config):
        value, choices = getattr(config, f.name), f.metadata.get("choices")
        if choices and value not in choices:
            problems.append(f"--{f.name} {value!r} is not one of {', '.join(map(str, choices))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low = f.metadata.get("min", 0 if isinstance(value, float) or f.default == 0 else 1)
        below = f.metadata.get("below", math.inf)
        if not math.isfinite(value):
            problems.append(f"--{f.name} must be a finite number, got {value}")
        elif not low <= value < below:
            bounds = f"in [{low}, {below:,})" if below < math.inf else f">= {low}"
            problems.append(f"--{f.name} must be {bounds}, got {value}")
    return problems


def check_config(config, problems=()):
    """Fail at start, naming the flags to change: field_problems, then the caller's problems."""
    problems = field_problems(config) + list(problems)
    if problems:
        raise ValueError("invalid configuration: " + "; ".join(problems) + ".")


def parse_config(config_classes, presets, argv=None, description="", default_preset="tiny"):
    """Every field of every dataclass becomes a flag; `--preset NAME` picks the first one's base.
    Returns the configs and the flags written on the command line (names without dashes)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=default_preset)
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in presets:
        raise SystemExit(f"error: unknown --preset {preset!r}; choose one of {', '.join(presets)}.")
    parser = argparse.ArgumentParser(description=description, parents=[pre], allow_abbrev=False)
    bases = [presets[preset]] + [cls() for cls in config_classes[1:]]
    for base in bases:
        group = parser.add_argument_group(type(base).__name__)
        for f in dataclasses.fields(base):
            default = getattr(base, f.name)  # a bool alone (`--resume`) means true
            kind = dict(type=_parse_bool, nargs="?", const=True) if isinstance(default, bool) \
                else dict(type=type(default))
            group.add_argument(f"--{f.name}", default=default, **kind)
    args = vars(parser.parse_args(argv))
    explicit = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    configs = tuple(type(b)(**{f.name: args[f.name] for f in dataclasses.fields(b)}) for b in bases)
    return configs, explicit


def config_from_dict(cls, saved, source):
    """cls(**saved) from a file: an unknown field is an error, a missing one takes its default."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ValueError(f"{source} holds a {cls.__name__} with fields this code does not know "
                         f"({unknown}); use the code version that wrote it.")
    for name in sorted(names - set(saved)):
        print(f"{source} predates --{name}: it loads with the default, "
              f"{getattr(cls(), name)!r}", file=sys.stderr)
    return cls(**saved)


def resumed_config(saved, given, explicit, keep=()):
    """A resumed run's training config: the checkpoint's values, but `given`'s for the flags on
    this command line, the fields in keep and those it lacks; and the overrides, to print."""
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(given)})
    if unknown:
        raise ValueError(f"the checkpoint's training config has fields this code does not know "
                         f"({unknown}); resume it with the code version that wrote it.")
    values, overrides = {}, []
    for f in dataclasses.fields(given):
        mine = getattr(given, f.name)
        values[f.name] = mine if f.name in keep or f.name in explicit else saved.get(f.name, mine)
        if f.name in explicit and f.name not in keep and f.name in saved and mine != saved[f.name]:
            overrides.append(f"  override: --{f.name} {mine} (the checkpoint had {saved[f.name]})")
    return type(given)(**values), overrides


def check_model_flags(trained, cfg, explicit, source):
    """Model flags written that differ from the trained model are an error; --preset is ignored."""
    changed = [f"--{n}" for n in sorted(explicit) if hasattr(trained, n)
               and getattr(cfg, n) != getattr(trained, n)]
    if changed:
        raise ValueError(f"{source} holds a trained model, and {', '.join(changed)} differ from "
                         f"it; drop them, or start a new model without it.")
    if "preset" in explicit:
        print(f"--preset is ignored: the model is the one {source} holds", file=sys.stderr)


def resume_from(ckpt_path, kind, cfg, tc, explicit, keep):
    """(checkpoint, model config, training config, overrides to print) of a resumed run."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--resume found no checkpoint at {ckpt_path}; pass the --out_dir "
                                f"of the run, or drop --resume to start a new one.")
    ckpt = load_checkpoint(ckpt_path, kind)
    saved = config_from_dict(type(cfg), ckpt["model_config"], ckpt_path)
    check_model_flags(saved, cfg, explicit, f"--resume's {ckpt_path}")
    return (ckpt, saved, *resumed_config(ckpt["train_config"], tc, explicit, keep))


# -----------------------------------------------------------------------------
# files: written atomically, locked while a run writes them, read as tensors only


def check_out_dir(path, flag="--out_dir"):
    """Create the output folder, check that it takes files: fail at start, not at the first save."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ValueError(f"{flag} {path!r} is not writable ({e.strerror or e}); "
                         f"pass a writable folder.") from None


UMASK = os.umask(0o022)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """A new temporary path beside `path` to write it through, renamed to path when the block
    ends without error: made exclusively (no planted link is followed, no two writers share it),
    hidden (data folders skip it), with path's extension (writers choose the format by it)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, extension = os.path.splitext(name)
    fd, temporary = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{extension}", dir=folder)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held while written: remove_stale_partials leaves it alone
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~UMASK)  # the permissions a plain open() would give
        os.fsync(fd)  # the file's data on disk before it takes the name
        os.replace(temporary, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        free = shutil.disk_usage(folder).free
        if free > 2 ** 20 and not (isinstance(e, OSError) and e.errno == 28):
            raise
        kept = "the earlier file is intact" if os.path.exists(path) else "nothing was written"
        raise OSError(28, f"the disk is full ({free} bytes free) writing {path}; {kept}; "
                          f"free some space and run again") from None
    finally:
        os.close(fd)
        if os.path.lexists(temporary):
            os.remove(temporary)


def atomic_save(obj, path):
    """torch.save of a dict, with the checksums of its tensors, which loading verifies."""
    obj = {**obj, "checksums": {name: checksum(t) for name, t in named_tensors(obj)}}
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


def named_tensors(tree, prefix=""):
    """(name, tensor) of each tensor in nested dicts (our files); a name joins keys by dots."""
    for key, value in tree.items():
        if isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value
        elif isinstance(value, dict):
            yield from named_tensors(value, f"{prefix}{key}.")


def checksum(tensor):
    return zlib.crc32(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())


def check_tensors(tree, source, checksums=None):
    """Refuse a view (stride 0 or overlapping: a small file asking for much memory) and bit rot."""
    for name, tensor in named_tensors(tree):
        if not tensor.is_contiguous():
            raise ValueError(f"{source}: {name} {tuple(tensor.shape)} is a strided view (stride 0 "
                             f"or overlapping), which no file of ours holds; use another file.")
        if checksums is not None and checksums.get(name) != checksum(tensor):
            raise ValueError(f"{source} is damaged: {name} differs from the checksum written with "
                             f"it (bit rot or a broken copy); copy it again or use another file.")


@contextlib.contextmanager
def run_lock(ckpt_path):
    """Hold ckpt_path while this run writes it: two runs never write one checkpoint. The kernel's
    lock (flock) on a hidden file beside it ends with its process; the file names the holder."""
    folder, name = os.path.split(os.path.abspath(ckpt_path))
    lock = os.path.join(folder, f".{name}.lock")
    if os.path.isdir(lock) or os.path.islink(lock):
        raise ValueError(f"{lock} is a folder or a link, where a lock file belongs; remove it.")
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ValueError(f"another run ({f.read(100).strip()}) is writing {ckpt_path}; wait "
                             f"for it or pass another --out_dir.") from None
        with contextlib.suppress(OSError):  # a full disk: the lock holds without its note
            f.truncate(0)
            f.write(f"process {os.getpid()} on {socket.gethostname()}")
            f.flush()
        yield


def lock_run(ckpt_path, resume, dist):
    """Before any work, rank 0 checks ckpt_path's folder, holds run_lock on it until the returned
    stack closes, refuses a fresh run a trained checkpoint, removes stale partials. All raise."""
    lock, error = contextlib.ExitStack(), [""]
    if dist.is_main:
        try:
            check_out_dir(os.path.dirname(ckpt_path))
            lock.enter_context(run_lock(ckpt_path))
            if not resume and os.path.exists(ckpt_path):
                raise ValueError(f"{ckpt_path} already holds a trained checkpoint; continue it "
                                 f"with --resume, or pass another --out_dir.")
            remove_stale_partials(os.path.dirname(os.path.abspath(ckpt_path)))
        except ValueError as e:
            error = [str(e)]
    if dist.ddp:
        torch.distributed.broadcast_object_list(error, 0)
    if error[0]:
        lock.close()
        raise ValueError(error[0])
    return lock


def remove_stale_partials(folder):
    """Delete the partial files of killed saves (atomic_path's) that no live writer holds."""
    count, size = 0, 0
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not (name.startswith(".") and ".partial" in name and os.path.isfile(path)):
            continue
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a writer holds it while it writes
            except BlockingIOError:
                continue
            count, size = count + 1, size + os.path.getsize(path)
            os.remove(path)
    if count:
        print(f"removed {count} partial files of killed saves ({size / 2 ** 20:.1f} MB) from "
              f"{folder}")


def read_torch_file(path, what="checkpoint"):
    """torch.load, memory-mapped (tensors are read when used) and tensors only: no pickled code
    (the authors' SiT files hold an argparse.Namespace, which is allowed)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist; check the path.")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        cached = os.path.abspath(path).startswith(os.path.abspath(torch.hub.get_dir()) + os.sep)
        advice = "; delete the cached download and fetch it again" if cached else ""
        raise ValueError(f"{what} {path} is corrupt or not a torch file "
                         f"({type(e).__name__}: {str(e)[:200]}){advice}.") from None


def load_checkpoint(path, kind, ckpt=None):
    if ckpt is None:  # read here for a resumed run, which reads all of it: all is checked
        ckpt = load_checkpoint(path, kind, read_torch_file(path))
        check_tensors(ckpt, path, ckpt.get("checksums"))
        return ckpt
    found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != kind:
        raise ValueError(f"{path} is a {found!r} file, not a {kind!r} checkpoint; check the path.")
    return ckpt


def load_model_file(path, kind, config_class, make, weights, from_official, what):
    """(model, checkpoint dict): make(config, ckpt) on the meta device given the file's `weights`
    as they are (memory-mapped, only they are read), or the authors' release (kind "official")."""
    path = released_file(path)
    ckpt = read_torch_file(path)
    if isinstance(ckpt, dict) and ckpt.get("kind") is None:
        try:
            model = from_official(ckpt)
        except NotOfficial:
            raise ValueError(f"{path} is neither a {what} checkpoint of ours nor the authors' "
                             f"released {what}; check the path.") from None
        return model, {"kind": "official", "model_config": dataclasses.asdict(model.config),
                       "source": os.path.abspath(path)}
    config = config_from_dict(config_class, load_checkpoint(path, kind, ckpt)["model_config"], path)
    unused = {"model", "ema", "optimizer"} - {weights}  # a lean read: left unread, unchecked
    check_tensors({k: v for k, v in ckpt.items() if k not in unused}, path, ckpt.get("checksums"))
    with torch.device("meta"):
        model = make(config, ckpt)
    return load_state(model, ckpt[weights], "checkpoint", buffers=True), ckpt


def load_state(model, state, what, hint="", buffers=False):
    """load_state_dict naming what is wrong: keys (a renamed or removed parameter; a buffer, unless
    `buffers`: files of our state_dict()s), shapes (hint: what to pass), NaN or inf; assigns."""
    ours = model.state_dict() if buffers else dict(model.named_parameters())
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    kinds = [{re.sub(r"\.\d+\.", ".#.", k) for k in keys} for keys in (ours, state)]
    if (missing or unexpected) and kinds[0] != kinds[1]:  # not just another number of blocks
        raise ValueError(f"the {what} weights and our model have different parameters: missing "
                         f"{missing[:4]}, unexpected {unexpected[:4]}; a parameter was renamed, "
                         f"removed or made a buffer; map it where the weights are converted.")
    wrong = [f"{k} {tuple(v.shape)} vs ours {tuple(ours[k].shape)}" for k, v in state.items()
             if k in ours and v.shape != ours[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"the {what} weights do not fit {hint or 'this configuration'}: blocks "
                         f"missing {missing[:2]}, unexpected {unexpected[:2]}, shapes {wrong[:2]}.")
    bad = [k for k, v in state.items()  # a NaN or inf reaches the sum: 15x faster than isfinite
           if v.is_floating_point() and not v.sum(dtype=torch.float32).isfinite()]
    if bad:
        raise ValueError(f"the {what} weights {bad[:4]} are not finite; use an earlier checkpoint.")
    model.load_state_dict(state, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{left[:4]} got no weights from the {what} file: left on the meta device"
                         f" by harness.load_model_file (for tokenizer.load_tokenizer, dit.load_dit)"
                         f" or from_official; compute them in forward or make them persistent.")
    return model


def weights_fingerprint(model):
    """A hash of the model's weights (names, shapes, values): which tokenizer made a tokens file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------
# weights fetched on first use: the torch hub cache, hash-checked where the name carries it


class WeightsUnavailable(RuntimeError):
    pass


def fetch(url, path="", flag=""):
    """The local file of url: `path` (given with `flag`), or the torch hub cache, downloaded there
    first; a name carrying a hash (torchvision's vgg16-397923af.pth) is checked against it."""
    name = os.path.basename(url).split("?")[0]
    if path:
        if not os.path.isfile(path):
            raise WeightsUnavailable(f"{path} does not exist; pass the path of {name} with {flag}.")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    expected = re.search(r"-([a-f0-9]{8,})\.", name)  # torchvision's: the sha256's start
    if not os.path.isfile(cached):
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # a silent network fails in a minute instead of hanging
        try:
            print(f"fetching {url} to {cached}", file=sys.stderr)
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(url, cached, expected and expected[1], progress=False)
        except Exception as e:
            advice = f" or pass its path with {flag}" if flag else ""
            raise WeightsUnavailable(f"could not fetch {url} ({type(e).__name__}: {e}); download "
                                     f"it to {cached}{advice}.") from None
        finally:
            socket.setdefaulttimeout(previous)
    elif expected:
        digest = hashlib.sha256()
        with open(cached, "rb") as f:  # in blocks (hashlib.file_digest needs Python 3.11)
            for block in iter(lambda: f.read(2 ** 20), b""):
                digest.update(block)
        if not digest.hexdigest().startswith(expected[1]):
            raise WeightsUnavailable(f"{cached} does not match the hash in its name; delete it "
                                     f"and fetch {url} again.")
    return cached


# -----------------------------------------------------------------------------
# the authors' released files (github.com/huiwon-jang/CoordTok), mapped onto our modules

HUB = "https://huggingface.co/huiwon/CoordTok/resolve/main/"
RELEASED = {"coordtok_ucf101": HUB + "CoordTok_UCF101_1M_50K.pth",
            "coordtok_sit_l2_ucf101": HUB + "CoordTok_SiT_L_2_UCF101_600K.pt"}


def released_file(path):
    """A checkpoint path, or the name of the authors' released file (RELEASED), fetched."""
    if path not in RELEASED:
        return path
    try:
        return fetch(RELEASED[path])
    except WeightsUnavailable as e:
        raise ValueError(str(e)) from None


class NotOfficial(ValueError):
    pass


def unwrap_state_dict(source, marker_key, what, prefer=("model",)):
    """The authors' state dict from a file or dict: bare, or under one of the keys in `prefer`,
    DDP's "module." prefix removed; anything without marker_key is refused."""
    is_path = isinstance(source, (str, os.PathLike))
    name = source if is_path else "the state dict"
    state = read_torch_file(released_file(source), f"official {what} file") if is_path else source
    if isinstance(state, dict):  # the first key in `prefer` that holds a dict, else the file's
        state = next((state[key] for key in prefer if isinstance(state.get(key), dict)), state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if not isinstance(state, dict) or marker_key not in state:
        raise NotOfficial(f"{name} is not the authors' {what}: it has no {marker_key!r} (bare, or "
                         f"under {' or '.join(map(repr, prefer))}); check the path.")
    check_tensors(state, name)
    return state


OFFICIAL_PAPER_KWARGS = dict(  # their arguments for the paper's CoordTok (their defaults differ)
    video_shape=(128, 128, 128), enc_embed_dim=1024, enc_num_layers=24, enc_num_heads=16,
    enc_patch_size_xy=16, enc_patch_size_t=8, enc_patch_type="transformer",
    enc_patch_num_layers=8, latent_resolution_xy=16, latent_resolution_t=32, latent_n_features=8,
    latent_patch_size_xy=8, latent_patch_size_t=16, dec_embed_dim=1024, dec_num_layers=24,
    dec_num_heads=16, dec_patch_size_xy=8, dec_patch_size_t=1, lpips_loss_scale=0.0)

# their names -> ours. Their "x" is the row axis: their yt plane, indexed by (t, column), is our xt
OUR_PLANE = {"xy": "xy", "yt": "xt", "xt": "yt"}
OFFICIAL_TOKENIZER_NAMES = [
    (r"^encoder\.encoder\.patch_embed\.proj\.", "patch_embed."),
    (r"^encoder\.encoder\.cls_token$", "cls_token"), (r"^encoder\.encoder\.pos_emb$", "enc_pos"),
    (r"^encoder\.encoder\.layers\.", "enc_blocks."), (r"^encoder\.encoder\.norm\.", "ln_enc."),
    (r"^encoder\.cross_pos_emb$", "cross_pos"), (r"^encoder\.transformer\.norm\.", "ln_query."),
    (r"^encoder\.transformer\.layers\.", "query_blocks."),
    *[(rf"^weight_tokens_{p}$", f"plane_{q}") for p, q in OUR_PLANE.items()],
    *[(rf"^encoder\.patch_embeds_{p}\.proj\.", f"query_embed_{q}.") for p, q in OUR_PLANE.items()],
    *[(rf"^encoder\.projectors_{p}\.", f"to_{q}.") for p, q in OUR_PLANE.items()],
    (r"^decoder\.transformer\.pos_embed$", "dec_pos"),
    (r"^decoder\.transformer\.patch_embed\.", "dec_embed."),
    (r"^decoder\.transformer\.layers\.", "dec_blocks."),
    (r"^decoder\.transformer\.norm\.", "ln_dec."), (r"^decoder\.projector\.", "to_pixels."),
    # in the query blocks: torch's MultiheadAttention (packed in_proj) and an nn.Sequential MLP
    (r"_attn\.in_proj_weight$", "_attn.qkv.weight"), (r"_attn\.out_proj\.", "_attn.proj."),
    (r"\.mlp\.0\.", ".mlp.fc1."), (r"\.mlp\.3\.", ".mlp.fc2."),
]


OFFICIAL_FIELDS = dict(  # our config fields <- their constructor's arguments
    enc_patch_t="enc_patch_size_t", enc_patch_s="enc_patch_size_xy", enc_width="enc_embed_dim",
    enc_heads="enc_num_heads", enc_layers="enc_patch_num_layers", query_layers="enc_num_layers",
    triplane_rs="latent_resolution_xy", triplane_rt="latent_resolution_t",
    triplane_c="latent_n_features", query_patch_s="latent_patch_size_xy",
    query_patch_t="latent_patch_size_t", dec_width="dec_embed_dim", dec_heads="dec_num_heads",
    dec_layers="dec_num_layers", dec_patch_t="dec_patch_size_t", dec_patch_s="dec_patch_size_xy")


def official_tokenizer_fields(official_kwargs=None):
    """Our CoordTokConfig's fields for the authors' CoordTok(**official_kwargs), the paper's."""
    unknown = set(official_kwargs or {}) - set(OFFICIAL_PAPER_KWARGS)
    if unknown:
        raise ValueError(f"unknown official CoordTok arguments {sorted(unknown)}; use some of "
                         f"{', '.join(OFFICIAL_PAPER_KWARGS)}.")
    k = {**OFFICIAL_PAPER_KWARGS, **(official_kwargs or {})}
    frames, height, width = k["video_shape"]
    if height != width or k["enc_patch_type"] != "transformer":
        raise ValueError(f"the authors' code builds square frames and enc_patch_type "
                         f"'transformer' only, not {k['video_shape']} and {k['enc_patch_type']!r}.")
    chunk = max(1, 1024 // (height // k["dec_patch_size_xy"]) ** 2)  # as their evaluation decodes
    return dict(num_frames=frames, img_size=height, decode_chunk=chunk,
                **{ours: k[theirs] for ours, theirs in OFFICIAL_FIELDS.items()})


def official_tokenizer(source, official_kwargs=None):
    """(our CoordTokConfig's fields, our state dict, what to pass when they do not fit) for the
    authors' CoordTok: a file, a released name or a state dict."""
    state = unwrap_state_dict(source, "encoder.encoder.patch_embed.proj.weight", "tokenizer")
    fields, ours = official_tokenizer_fields(official_kwargs), {}
    for name, tensor in state.items():
        for pattern, replacement in OFFICIAL_TOKENIZER_NAMES:
            name = re.sub(pattern, replacement, name)
        if name.startswith("plane_"):                                   # (1, R, R', C) -> ours
            tensor = rearrange(tensor, "1 h w c -> 1 c h w").contiguous()
        elif name == "dec_pos":                                         # (1, gt, gh, gw, D)
            tensor = tensor[0]
        if name.endswith("cross_attn.qkv.weight"):  # packed (3D, D): our q and kv projections
            q, kv = tensor[:len(tensor) // 3], tensor[len(tensor) // 3:]
            ours[name.replace("qkv", "q")], ours[name.replace("qkv", "kv")] = q, kv
        else:
            ours[name] = tensor
    return fields, ours, official_hint(official_kwargs, "the paper's configuration")


def official_hint(official_kwargs, paper):
    given = f"official_kwargs {official_kwargs}" if official_kwargs else paper
    return f"{given} (pass the arguments they were built with as official_kwargs)"


# their constructor arguments for the paper's generator, SiT-L/2 on the (32, 16, 8) triplane
OFFICIAL_SIT_PAPER_KWARGS = dict(input_size=(32, 16), patch_size=2, in_channels=8,
                                 hidden_size=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                                 class_dropout_prob=0.0, num_classes=1, learn_sigma=True)

# their names -> ours (their planes xy, yt, xt are our z_xy, z_xt, z_yt: index 0, 1, 2)
OFFICIAL_SIT_NAMES = [
    *[(rf"^x_embedder_{p}\.proj\.", f"embeds.{i}.") for i, p in enumerate(["xy", "yt", "xt"])],
    *[(rf"^final_layer_{p}\.", f"heads.{i}.") for i, p in enumerate(["xy", "yt", "xt"])],
    (r"^pos_embed_xy$", "pos_xy"), (r"^pos_embed_t$", "pos_t"), (r"^type_embed$", "plane_type"),
    (r"^t_embedder\.mlp\.", "time_mlp."), (r"^y_embedder\.embedding_table\.", "class_embed."),
    (r"\.adaLN_modulation\.1\.", ".modulation."), (r"^(heads\.\d)\.linear\.", r"\1.proj."),
]


def official_sit(source, official_kwargs=None):
    """(our SiTConfig's fields, plane shapes, classes, our state dict, what to pass when they do
    not fit) for the authors' SiT: a file, a released name or a state dict."""
    state = unwrap_state_dict(source, "x_embedder_xy.proj.weight", "SiT", prefer=("ema", "model"))
    unknown = set(official_kwargs or {}) - set(OFFICIAL_SIT_PAPER_KWARGS)
    if unknown:
        raise ValueError(f"unknown official SiT arguments {sorted(unknown)}; use some of "
                         f"{', '.join(OFFICIAL_SIT_PAPER_KWARGS)}.")
    k = {**OFFICIAL_SIT_PAPER_KWARGS, **(official_kwargs or {})}
    (rt, rs), c = k["input_size"], k["in_channels"]
    fields = dict(width=k["hidden_size"], depth=k["depth"], mlp_ratio=k["mlp_ratio"],
                  heads=k["num_heads"], patch_size=k["patch_size"], learn_sigma=k["learn_sigma"],
                  conditional=k["num_classes"] > 1, class_dropout=k["class_dropout_prob"])
    ours = {}
    for name, tensor in state.items():
        for pattern, replacement in OFFICIAL_SIT_NAMES:
            name = re.sub(pattern, replacement, name)
        ours[name] = tensor
    return (fields, [(c, rs, rs), (c, rt, rs), (c, rt, rs)], k["num_classes"], ours,
            official_hint(official_kwargs, "the paper's SiT-L/2"))
