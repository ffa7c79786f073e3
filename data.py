"""
Video data for CoordTok: reading clips with PyAV, writing mp4, the built-in synthetic set,
the patch/coordinate helpers of the training step, and the tokens file read by dit.py.

  python data.py --synthetic data/synthetic     # write the synthetic set (mp4, a few classes)

The file reads top to bottom: finding and decoding videos, writing them, the dataset and its
loader, the synthetic set, the patch helpers (run on the training device, vectorised), and
the tokens file.
"""

import argparse
import math
import os
import struct
import warnings
import zlib

import av
import numpy as np
import torch
from einops import rearrange

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")

# -----------------------------------------------------------------------------
# reading videos


class VideoReadError(Exception):
    """A file that PyAV cannot open or decode as a video."""


def find_videos(root):
    """Every video file under root as (path, class_name), sorted; the class is the parent folder's name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist; pass --data with a folder of videos "
                                f"(class = parent folder name), or leave --data empty for the synthetic set")
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith("."):
                path = os.path.join(folder, name)
                found.append((path, os.path.basename(os.path.dirname(path))))
    return sorted(found)


def _open_video(path):
    """(container, first video stream), or VideoReadError naming the file."""
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoReadError(f"{path}: cannot open ({e})") from e
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame threads inside FFmpeg; the GIL is released while decoding
    return container, stream


def _frame_count(stream, container):
    """The number of frames from the header, or estimated from the duration (0 when unknown)."""
    if stream.frames:
        return stream.frames
    if stream.duration and stream.time_base and stream.average_rate:
        return int(stream.duration * stream.time_base * stream.average_rate)
    if container.duration and stream.average_rate:
        return int(container.duration / av.time_base * stream.average_rate)
    return 0


def probe_video(path):
    """Frame count of a readable video (at least 1), or VideoReadError: opens it and decodes the first frame."""
    container, stream = _open_video(path)
    try:
        n_total = _frame_count(stream, container)
        first = next(container.decode(stream), None)
    except (av.FFmpegError, OSError) as e:
        raise VideoReadError(f"{path}: cannot decode ({e})") from e
    finally:
        container.close()
    if first is None:
        raise VideoReadError(f"{path}: no frames")
    return max(n_total, 1)


def _to_rgb_square(frame, img_size):
    """A decoded frame of any pixel format and size -> (img_size, img_size, 3) uint8: the shorter side
    resized (area averaging, i.e. antialiased when shrinking), then the centre cropped."""
    w, h = frame.width, frame.height
    scale = img_size / min(w, h)
    new_w, new_h = max(img_size, round(w * scale)), max(img_size, round(h * scale))
    rgb = frame.reformat(width=new_w, height=new_h, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (new_h - img_size) // 2, (new_w - img_size) // 2
    return rgb[top:top + img_size, left:left + img_size]


def read_clip(path, img_size, num_frames, start=None, rng=None, n_total=None):
    """num_frames consecutive frames of a video as (num_frames, img_size, img_size, 3) uint8, and how many
    of them are real (a video shorter than the clip is padded with zero frames).

    start=None draws the first frame at random (training, with rng); an int fixes it (evaluation).
    Decoding stops at the clip's last frame; frames before the start are decoded but not converted.
    """
    container, stream = _open_video(path)
    frames = []
    try:
        if n_total is None:
            n_total = _frame_count(stream, container)
        if start is None:
            rng = rng if rng is not None else np.random.default_rng()
            start = int(rng.integers(0, max(n_total - num_frames, 0) + 1))
        for i, frame in enumerate(container.decode(stream)):
            if i >= start:
                frames.append(_to_rgb_square(frame, img_size))
                if len(frames) == num_frames:
                    break
        if not frames and start > 0:  # the header overstated the length: take the clip from the start
            container.seek(0)
            for frame in container.decode(stream):
                frames.append(_to_rgb_square(frame, img_size))
                if len(frames) == num_frames:
                    break
    except (av.FFmpegError, OSError) as e:
        if not frames:
            raise VideoReadError(f"{path}: cannot decode ({e})") from e
        # a truncated file: keep the frames that decoded
    finally:
        container.close()
    if not frames:
        raise VideoReadError(f"{path}: no frames")
    clip = np.zeros((num_frames, img_size, img_size, 3), dtype=np.uint8)
    clip[:len(frames)] = np.stack(frames)
    return clip, len(frames)


# -----------------------------------------------------------------------------
# writing videos


def write_video(path, frames, fps=8, crf=12, lossless=False):
    """(T, H, W, 3) uint8 frames -> a video file.

    Default: H.264 (yuv420p, the format every player reads) at quality crf; odd heights/widths are padded
    by one edge row/column because yuv420p needs even sizes. lossless=True: FFV1 in RGB (use a .mkv
    path), which reads back bit-exact, for clips that a metric must see as they were generated."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video needs uint8 frames of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if not lossless:
        _, h, w, _ = frames.shape
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    codec, pix_fmt, options = ("ffv1", "bgr0", {}) if lossless else ("libx264", "yuv420p", {"crf": str(crf)})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = options
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())  # flush the encoder


def to_uint8(video):
    """[-1, 1] float -> uint8 tensor, as StyleGAN-V converts generated frames for FVD: x * 127.5 + 128,
    clamped, truncated (that is, rounded half up)."""
    return (video.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def from_uint8(video):
    """uint8 (0..255) -> float in [-1, 1], the models' input range."""
    return video.float() / 127.5 - 1


def atomic_save(obj, path):
    """torch.save to path + ".tmp", then rename: a kill mid-save never destroys the last good file, and
    leaves at most one temporary file (the next save overwrites it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_png(path, image):
    """(H, W, 3) uint8 -> an RGB PNG: signature, IHDR, one zlib IDAT (filter 0 on each row), IEND.
    Written by hand so that previews need no imaging library."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, _ = image.shape

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1)  # filter byte per row
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)              # 8 bits, truecolour, no interlace
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
                + chunk(b"IEND", b""))


def comparison_grid(inputs, recons, num_columns=8, error_gain=4):
    """Input, reconstruction and error of a few clips as one image: uint8 (K, T, H, W, 3) x2 -> (3*K*H,
    F*W, 3), three rows per clip (input, reconstruction, |input - reconstruction| x error_gain) and
    num_columns evenly spaced frames per row."""
    inputs, recons = np.asarray(inputs), np.asarray(recons)
    columns = np.unique(np.linspace(0, inputs.shape[1] - 1, min(num_columns, inputs.shape[1])).round().astype(int))
    error = np.clip(np.abs(inputs.astype(np.int16) - recons.astype(np.int16)) * error_gain, 0, 255).astype(np.uint8)
    rows = np.stack([inputs[:, columns], recons[:, columns], error[:, columns]], axis=1)  # (K, 3, F, H, W, 3)
    return rearrange(rows, "k r f h w c -> (k r h) (f w) c")


# -----------------------------------------------------------------------------
# the dataset and its loader


def _split_files(videos, split, val_fraction):
    """Deterministic split by file: in each class, files ordered by a hash of their name; the first
    round(val_fraction * n) of them (at least one when the class has two or more) are held out."""
    if split == "all":
        return videos
    by_class = {}
    for path, name in videos:
        by_class.setdefault(name, []).append(path)
    chosen = []
    for name, paths in by_class.items():
        paths = sorted(paths, key=lambda p: (zlib.crc32(os.path.basename(p).encode()), p))
        n_val = round(val_fraction * len(paths))
        if val_fraction > 0 and len(paths) >= 2:
            n_val = max(n_val, 1)
        keep = paths[:n_val] if split == "val" else paths[n_val:]
        chosen += [(p, name) for p in keep]
    return sorted(chosen)


class VideoDataset(torch.utils.data.Dataset):
    """Clips of num_frames frames at img_size x img_size from a folder of videos (class = parent folder).

    split: "train", "val" (held-out files, never seen in training) or "all". An item is
    {"video": uint8 (T, S, S, 3), "n_frames": real frames, "label": class index}. The index may be an int,
    or (index, seed) from make_loader's sampler, which fixes the random start so a resumed run reads the
    same clips. Unreadable files are skipped with a warning when the dataset is built.
    """

    def __init__(self, root, img_size, num_frames, split="train", random_start=True, val_fraction=0.1):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, not {split!r}")
        videos = find_videos(root)
        self.class_names = sorted({name for _, name in videos})
        self.img_size, self.num_frames, self.random_start = img_size, num_frames, random_start
        self.files, self.frame_counts = [], []
        chosen = _split_files(videos, split, val_fraction)
        for path, name in chosen:
            try:
                self.frame_counts.append(probe_video(path))
            except VideoReadError as e:
                warnings.warn(f"skipping unreadable video {e}")
                continue
            self.files.append((path, self.class_names.index(name)))
        if not videos or (chosen and not self.files):
            raise FileNotFoundError(f"no readable video in {root!r} (searched recursively for "
                                    f"{', '.join(VIDEO_EXTENSIONS)}); put videos in class sub-folders")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        index, seed = index if isinstance(index, (tuple, list)) else (index, index)
        for attempt in range(len(self.files)):  # a file that fails now (not when probed): take the next one
            i = (index + attempt) % len(self.files)
            path, label = self.files[i]
            start = None if self.random_start else 0
            try:
                clip, n_frames = read_clip(path, self.img_size, self.num_frames, start,
                                           np.random.default_rng(seed), self.frame_counts[i])
            except VideoReadError as e:
                warnings.warn(f"skipping unreadable video {e}")
                continue
            return {"video": torch.from_numpy(clip), "n_frames": torch.tensor(n_frames),
                    "label": torch.tensor(label)}
        raise VideoReadError(f"none of the {len(self.files)} videos could be read")


class ClipSampler(torch.utils.data.Sampler):
    """An endless, deterministic stream of (index, seed) pairs for one process.

    Like DistributedSampler, each epoch is a permutation (seeded by seed + epoch) split across the
    ranks, padded by wrapping around so every rank gets as many clips; unlike it, the stream can start
    at any position (a resumed run skips what it already read without decoding it) and each clip
    carries a seed for its random start, so the data of a resumed run is exactly the unbroken run's.
    """

    def __init__(self, num_items, shuffle, seed, rank, world_size, start=0):
        self.num_items, self.shuffle, self.seed = num_items, shuffle, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self):
        per_rank = math.ceil(self.num_items / self.world_size)
        epoch, offset = divmod(self.start, per_rank)
        while True:
            if self.shuffle:
                order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                order = torch.arange(self.num_items)
            order = order.repeat(math.ceil(per_rank * self.world_size / self.num_items))[:per_rank * self.world_size]
            mine = order[self.rank::self.world_size].tolist()
            for index in mine[offset:]:
                yield index, (self.seed * 1_000_003 + epoch) * 1_000_003 + index
            epoch, offset = epoch + 1, 0


def make_loader(dataset, batch_size, shuffle, num_workers, distributed, seed=0, start_step=0,
                infinite=True, drop_last=True):
    """Batches of clips, decoded in worker processes.

    infinite=True: an endless stream for training (ClipSampler; under DDP each rank reads its own share),
    starting after start_step batches. infinite=False: one pass over the dataset in order (encode, eval).
    """
    if len(dataset) == 0:
        raise FileNotFoundError("the dataset has no readable clips for this split; add videos or lower "
                                "--val_fraction")
    pin = torch.cuda.is_available()
    options = dict(num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0,
                   prefetch_factor=4 if num_workers > 0 else None)
    if not infinite:
        return torch.utils.data.DataLoader(dataset, batch_size, shuffle=False, drop_last=drop_last, **options)
    rank, world = 0, 1
    if distributed:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = ClipSampler(len(dataset), shuffle, seed, rank, world, start=start_step * batch_size)
    return iter(torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, **options))


# -----------------------------------------------------------------------------
# the synthetic set: textured objects moving, turning and changing colour on varied backgrounds

SHAPES = ("discs", "squares", "triangles", "stars")


def _shape_distance(shape, u, v):
    """Signed distance (negative inside, in units of the object's radius) of the points (u, v) of the
    object's own frame, for each shape."""
    r = np.hypot(u, v)
    if shape == "discs":
        return r - 1
    if shape == "squares":
        return np.maximum(np.abs(u), np.abs(v)) - 0.85
    angle = np.arctan2(v, u)
    if shape == "triangles":  # the distance to the nearest of three edges
        return np.max([u * np.cos(a) + v * np.sin(a) for a in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6)], 0) - 0.6
    return r - (0.75 + 0.3 * np.cos(5 * angle))  # stars: a five-lobed radius


def _render_video(rng, shape, num_frames, size):
    """One clip (num_frames, size, size, 3) uint8 of 1-2 textured objects of one shape."""
    ys, xs = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")  # (S, S)
    t = np.arange(num_frames)[:, None, None] / max(num_frames - 1, 1)                       # (T, 1, 1)
    # background: a gradient between two colours plus a slow wave drifting over time
    c0, c1 = rng.uniform(0.1, 0.9, 3), rng.uniform(0.1, 0.9, 3)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * xs + np.sin(direction) * ys + 1.4) / 2.8                     # (S, S) in (0, 1)
    k = rng.uniform(1.5, 3.5, 2) * rng.choice([-1, 1], 2)
    wave = 0.08 * np.sin(2 * np.pi * (k[0] * xs + k[1] * ys) / 2 + rng.uniform(0, 6) + 3 * t)  # (T, S, S)
    video = c0 + (c1 - c0) * ramp[None, :, :, None] + wave[..., None]                      # (T, S, S, 3)
    for _ in range(rng.integers(1, 3)):
        radius = rng.uniform(0.14, 0.24)
        pos0, vel = rng.uniform(0.25, 0.75, 2), rng.uniform(-0.45, 0.45, 2)
        # straight-line motion reflected at the borders (a triangle wave keeps it inside)
        path = pos0 + vel * t[:, 0, 0, None]                                                 # (T, 2)
        lo, hi = radius, 1 - radius
        path = lo + np.abs(np.mod(path - lo, 2 * (hi - lo)) - (hi - lo))
        angle = rng.uniform(0, 2 * np.pi) + rng.uniform(-1.5, 1.5) * t                          # (T, 1, 1) turning
        scale = radius * (1 + 0.1 * np.sin(2 * np.pi * t * rng.uniform(0.5, 1.5)))          # pulsing size
        du, dv = (xs - path[:, None, None, 0]) / scale, (ys - path[:, None, None, 1]) / scale  # (T, S, S)
        u = np.cos(angle) * du + np.sin(angle) * dv
        v = -np.sin(angle) * du + np.cos(angle) * dv
        alpha = np.clip(0.5 - _shape_distance(shape, u, v) * scale * size / 2.5, 0, 1)[..., None]  # soft edge
        # texture: stripes in the object's own frame (they turn with it), colours drifting over time
        stripes = np.sin(np.pi * rng.uniform(1.2, 2.4) * u + rng.uniform(0, 6))[..., None]
        base = rng.uniform(0.2, 0.8, 3)
        colour = np.clip(base + 0.25 * np.sin(2 * np.pi * (t[..., None] + rng.uniform(0, 1, 3))), 0, 1)
        texture = colour * (0.7 + 0.3 * stripes)                                          # (T, S, S, 3)
        video = video * (1 - alpha) + texture * alpha
    return (np.clip(video, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_synthetic(out_dir, num_classes=4, videos_per_class=48, num_frames=32, size=64, seed=0):
    """Write the synthetic set: out_dir/<shape>/<shape>_NNN.mp4, one class per object shape."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        name = SHAPES[c % len(SHAPES)] + (f"_{c // len(SHAPES)}" if c >= len(SHAPES) else "")
        for i in range(videos_per_class):
            clip = _render_video(rng, SHAPES[c % len(SHAPES)], num_frames, size)
            write_video(os.path.join(out_dir, name, f"{name}_{i:03d}.mp4"), clip)
    return out_dir


def ensure_synthetic(out_dir="data/synthetic"):
    """The synthetic set's folder, written first if it has no videos yet."""
    if not (os.path.isdir(out_dir) and find_videos(out_dir)):
        print(f"writing the synthetic video set to {out_dir}/")
        make_synthetic(out_dir)
    return out_dir


# -----------------------------------------------------------------------------
# patch helpers: coordinates and target pixels, on the training device, vectorised


def patchify(video, patch_size):
    """(B, T, H, W, 3) -> (B, gt, gh, gw, pt*ph*pw*3), each patch laid out as (pt ph pw c)."""
    pt, ph, pw = patch_size
    return rearrange(video, "b (t pt) (h ph) (w pw) c -> b t h w (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(patches, patch_size):
    """(B, gt, gh, gw, pt*ph*pw*3) -> (B, T, H, W, 3), the inverse of patchify."""
    pt, ph, pw = patch_size
    return rearrange(patches, "b t h w (pt ph pw c) -> b (t pt) (h ph) (w pw) c", pt=pt, ph=ph, pw=pw)


def full_grid(grid_size, device=None):
    """Every (t, y, x) of a patch grid, frame-major (t slowest, then y, then x): (gt*gh*gw, 3) long."""
    axes = [torch.arange(n, device=device) for n in grid_size]
    return rearrange(torch.stack(torch.meshgrid(*axes, indexing="ij")), "d t h w -> (t h w) d")


def gather_patches(video, coords, patch_size):
    """The pixels of the patches at coords: video (B, T, H, W, 3), coords (B, N, 3) -> (B, N, pt*ph*pw*3)."""
    patches = patchify(video, patch_size)                                   # (B, gt, gh, gw, D)
    _, gt, gh, gw, dim = patches.shape
    flat_index = (coords[..., 0] * gh + coords[..., 1]) * gw + coords[..., 2]  # (B, N)
    patches = rearrange(patches, "b t h w d -> b (t h w) d")
    return torch.gather(patches, 1, flat_index[..., None].expand(-1, -1, dim))


def _grid_size(video, patch_size):
    _, t, h, w, _ = video.shape
    return t // patch_size[0], h // patch_size[1], w // patch_size[2]


def sample_patches(video, n_frames, num_samples, patch_size, generator=None):
    """num_samples distinct random patches per clip, only from temporal patches made of real frames
    (a temporal patch with at least one real frame counts as real when it is the clip's only one).

    video (B, T, H, W, 3), n_frames (B,) -> coords (B, N, 3) long, targets (B, N, pt*ph*pw*3).
    Random keys, +inf on padded patches, and the N smallest: uniform sampling without replacement,
    batched, with no loop over clips or patches.
    """
    gt, gh, gw = _grid_size(video, patch_size)
    grid = full_grid((gt, gh, gw), video.device)                            # (P, 3)
    keys = torch.rand(video.shape[0], grid.shape[0], device=video.device, generator=generator)  # (B, P)
    real_t = (n_frames // patch_size[0]).clamp_min(1)                      # (B,) real temporal patches
    keys = keys.masked_fill(grid[None, :, 0] >= real_t[:, None], float("inf"))
    chosen = keys.topk(num_samples, dim=1, largest=False).indices           # (B, N) real patches first
    # a clip with fewer real patches than num_samples repeats its real ones instead of taking padding
    n_real = real_t[:, None] * (gh * gw)                                    # (B, 1)
    slot = torch.arange(num_samples, device=video.device)[None]             # (1, N)
    chosen = chosen.gather(1, torch.where(slot < n_real, slot, slot % n_real))
    coords = grid[chosen]                                                   # (B, N, 3)
    return coords, gather_patches(video, coords, patch_size)


def sample_frames(video, n_frames, num_frames_k, patch_size, generator=None):
    """Every patch of K distinct random real temporal patches ("whole frames") per clip, frame-major
    within each: coords (B, K*gh*gw, 3), targets (B, K*gh*gw, pt*ph*pw*3)."""
    gt, gh, gw = _grid_size(video, patch_size)
    keys = torch.rand(video.shape[0], gt, device=video.device, generator=generator)  # (B, gt)
    real_t = (n_frames // patch_size[0]).clamp_min(1)
    keys = keys.masked_fill(torch.arange(gt, device=video.device)[None] >= real_t[:, None], float("inf"))
    frames = keys.topk(num_frames_k, dim=1, largest=False).indices         # (B, K)
    frame_grid = full_grid((1, gh, gw), video.device)                       # (gh*gw, 3) with t = 0
    coords = frame_grid[None, None] + torch.stack(
        [frames, torch.zeros_like(frames), torch.zeros_like(frames)], -1)[:, :, None]  # (B, K, gh*gw, 3)
    coords = rearrange(coords, "b k p d -> b (k p) d")
    return coords, gather_patches(video, coords, patch_size)


# -----------------------------------------------------------------------------
# the tokens file: triplanes of a dataset, written by tokenizer.py --encode, read by dit.py

PLANES = ("z_xy", "z_xt", "z_yt")


def save_tokens(path, planes, labels, class_names, n_frames, tokenizer_ckpt, tokenizer_config):
    """Write the three stacked planes (N, C, ., .) with labels, class names, per-plane per-channel mean and
    std (over clips and positions), n_frames, and the tokenizer that made them. Atomic: temp file + rename."""
    tokens = {"kind": "coordtok_tokens", "labels": labels.long(), "class_names": list(class_names),
              "n_frames": n_frames.long(), "tokenizer_ckpt": tokenizer_ckpt,
              "tokenizer_config": dict(tokenizer_config), "mean": {}, "std": {}}
    for name, plane in zip(PLANES, planes):
        plane = plane.float()
        tokens[name] = plane
        tokens["mean"][name] = plane.mean(dim=(0, 2, 3))                    # (C,)
        tokens["std"][name] = plane.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)  # (C,) population, as the authors
    atomic_save(tokens, path)


def load_tokens(path):
    """The dict written by save_tokens, or an error that says how to make one (never by writing over a
    file that is something else)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokens file {path!r} not found; write it with "
                                f"`python tokenizer.py --encode {path}` after training the tokenizer")
    try:
        tokens = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable torch file ({str(e)[:200]}); write a tokens file to a new "
                         f"path with `python tokenizer.py --encode NEW_PATH`") from None
    if not isinstance(tokens, dict) or tokens.get("kind") != "coordtok_tokens":
        kind = tokens.get("kind") if isinstance(tokens, dict) else type(tokens).__name__
        raise ValueError(f"{path!r} is not a tokens file (kind {kind!r}, expected 'coordtok_tokens'); "
                         f"write one to a new path with `python tokenizer.py --encode NEW_PATH`")
    return tokens


def main():
    parser = argparse.ArgumentParser(description="Write the built-in synthetic video set.")
    parser.add_argument("--synthetic", required=True, metavar="DIR", help="folder to write the mp4s to")
    parser.add_argument("--num_classes", type=int, default=4)
    parser.add_argument("--videos_per_class", type=int, default=48)
    parser.add_argument("--num_frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_synthetic(args.synthetic, args.num_classes, args.videos_per_class, args.num_frames, args.size, args.seed)
    print(f"wrote {args.num_classes * args.videos_per_class} videos to {args.synthetic}/")


if __name__ == "__main__":
    main()
