"""
Video data for CoordTok: reading clips with PyAV (any file FFmpeg reads, any length or shape),
writing videos, prepared copies, the dataset, loader and split, the synthetic set, the tokens file.

  python data.py --synthetic data/synthetic                # write the synthetic set
  python data.py --prepare UCF-101 ucf128 --img_size 128   # a copy resized once, read ~10x faster
"""

import argparse
import collections
import contextlib
import hashlib
import inspect
import itertools
import multiprocessing
import os
import re
import signal
import struct
import time
import warnings
import zlib

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from einops import rearrange, repeat

import harness as H

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")

# -----------------------------------------------------------------------------
# reading videos


class VideoReadError(Exception):
    """A file that PyAV cannot open or decode as a video."""


def find_videos(root):
    """Every video file under root (links followed, each folder once) as sorted (path, class):
    class `a/b` for root/a/b/x.mp4, root's own name for a file directly in root."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist; pass --data with a folder "
                                f"of videos, or no --data for the synthetic set.")
    walk = os.walk(root, followlinks=True, onerror=lambda error: warnings.warn(
        f"skipping unreadable folder {error.filename} ({error.strerror})"))
    found, seen = [], set()
    for folder, subfolders, files in walk:
        if os.path.realpath(folder) in seen:  # a second link to it, or a loop
            subfolders.clear()
            continue
        seen.add(os.path.realpath(folder))
        name = os.path.relpath(folder, root).replace(os.sep, "/")
        name = os.path.basename(os.path.abspath(root)) if name == "." else name
        found += [(os.path.join(folder, f), name) for f in files
                  if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith(".")]
    return sorted(video for video in found if os.path.isfile(video[0]))  # a FIFO would hang


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
    stream.thread_type = "AUTO"  # FFmpeg's frame threads; the GIL is released while decoding
    return container, stream


def probe_video(path):
    """A video's frame index {"n_frames" (counted: a header's count can be wrong), "pts" (sorted
    presentation times), "keys" (keyframes' pts), "fps", "height", "width"}, or VideoReadError."""
    container, stream = _open_video(path)
    shape = dict(fps=stream.average_rate or 25, height=stream.height, width=stream.width)
    packets, decodes = [], False
    try:
        with container:
            for packet in container.demux(stream):  # every packet; decoded until a frame comes out
                if packet.size > 0:  # not the flushing packet at the end
                    packets.append((packet.pts, packet.is_keyframe))
                decodes = decodes or bool(packet.decode())
    except (av.FFmpegError, OSError) as e:
        raise VideoReadError(f"{path}: cannot decode ({e})") from e
    if not decodes:
        raise VideoReadError(f"{path}: no frames")
    if stream.frames and stream.frames != len(packets):
        warnings.warn(f"{path}: the header says {stream.frames} frames, the stream holds "
                      f"{len(packets)}; reading {len(packets)}")
    if not all(pts is not None for pts, _ in packets):  # no times: read from the start
        return {"n_frames": len(packets), "pts": None, "keys": None, **shape}
    times = np.array(packets, dtype=np.int64).reshape(-1, 2)                # (N, 2): time, key
    keys = np.sort(times[times[:, 1] == 1, 0])
    return {"n_frames": len(packets), "pts": np.sort(times[:, 0]), "keys": keys, **shape}


def warn_skipped(errors, shown=5):
    """Warn of unreadable videos: the first `shown` by name, the rest counted in one line."""
    for error in errors[:shown]:
        warnings.warn(f"skipping unreadable video {error}")
    if len(errors) > shown:
        warnings.warn(f"skipping {len(errors) - shown} more unreadable videos, not named")


def hw(size):
    """A frame size, img_size or (height, width), as (height, width)."""
    return (size, size) if isinstance(size, int) else tuple(size)


# PyAV >= 17 scales on every core by default: one is faster here, and a loader has one per core
_SCALER_THREADS = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


def to_rgb(frame, size, scaler):
    """Any decoded frame -> (H, W, 3) uint8, upright, scaled to cover (H, W) and centre-cropped.
    scaler: one VideoReformatter per video (frame.reformat makes one per frame, 3x the cost)."""
    (height, width), turns = size, round(getattr(frame, "rotation", 0) / 90) % 4
    h, w = (width, height) if turns % 2 else (height, width)  # the size as stored, turned after
    scale = max(h / frame.height, w / frame.width)
    new_w, new_h = max(w, round(frame.width * scale)), max(h, round(frame.height * scale))
    rgb = scaler.reformat(frame, width=new_w, height=new_h, format="rgb24", interpolation="AREA",
                          **_SCALER_THREADS).to_ndarray()
    rgb = np.rot90(rgb, turns)  # counter-clockwise, as FFmpeg's display matrix reads
    top, left = (rgb.shape[0] - height) // 2, (rgb.shape[1] - width) // 2
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


def frames_from(path, size, start=0, info=None):
    """A video's frames from index `start` on, through to_rgb. With probe_video's index (info) it
    seeks to the keyframe before `start` and numbers frames by their times: exact to the frame. A
    frame that does not decode is warned of; the nearest that does (before it, if any) stands in."""
    container, stream, size = *_open_video(path), hw(size)
    pts, scaler, index, previous = (info or {}).get("pts"), VideoReformatter(), -1, None
    try:
        if pts is not None and len(info["keys"]) and 0 < start < len(pts):
            keys = info["keys"]
            key = keys[max(int(np.searchsorted(keys, pts[start], side="right")) - 1, 0)]
            container.seek(int(key), stream=stream, backward=True)
            index = int(np.searchsorted(pts, key)) - 1
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:  # the decoder goes on at the next packet
                if pts is None:  # no times to tell which frames are lost
                    warnings.warn(f"{path}: skipping a packet that does not decode ({e})")
                continue
            for frame in frames:
                timed = pts is not None and frame.pts is not None
                now = int(np.searchsorted(pts, frame.pts)) if timed else index + 1
                if now > start and previous is None and index >= 0:  # a seek landed past start
                    yield from frames_from(path, size, start, {**info, "keys": []})
                    return
                if now > index + 1:
                    warnings.warn(f"{path}: {now - index - 1} frames ({index + 1} to {now - 1}) "
                                  f"do not decode; the nearest frame that does stands in for each")
                for i in range(max(index + 1, start), now + 1):  # the lost frames, then this one
                    yield to_rgb(frame if i == now or previous is None else previous, size, scaler)
                index, previous = now, frame
    except av.FFmpegError as e:
        if previous is None:
            raise VideoReadError(f"{path}: cannot decode ({e})") from e
    finally:
        container.close()


def read_clip(path, size, num_frames, start=None, rng=None, info=None):
    """A clip (num_frames, H, W, 3) uint8 from frame `start` (None: drawn with rng), zero frames
    past the video's end, and how many frames are real. size: img_size or (height, width)."""
    info = info or probe_video(path)
    start = random_start(info["n_frames"], num_frames, rng) if start is None else start
    frames = list(itertools.islice(frames_from(path, size, start, info), num_frames))
    if not frames:
        raise VideoReadError(f"{path}: no frames from frame {start} on")
    return _padded(frames, num_frames), len(frames)


def _padded(frames, num_frames):
    """Frames (n <= num_frames, H, W, 3) uint8 as a clip (num_frames, H, W, 3), zero frames last."""
    return np.pad(np.asarray(frames), ((0, num_frames - len(frames)), (0, 0), (0, 0), (0, 0)))


def random_start(n_total, num_frames, rng=None):
    """A first frame drawn uniformly among those that keep the clip inside the video."""
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.integers(0, max(n_total - num_frames, 0) + 1))


def window_starts(n_total, num_frames, stride):
    """Starts of windows covering a video: every `stride` frames, and one ending at its end."""
    last = max(n_total - num_frames, 0)
    starts = list(range(0, last + 1, stride))
    return starts if starts[-1] == last else starts + [last]


def iter_windows(path, size, num_frames, stride, info=None):
    """(start, clip (num_frames, H, W, 3) uint8, real frames) of every window_starts window, the
    video decoded once; windows past a truncated file's end are padded (dropped if wholly past)."""
    info = info or probe_video(path)
    starts = collections.deque(window_starts(info["n_frames"], num_frames, stride))
    recent, n = collections.deque(maxlen=num_frames), 0
    for n, image in enumerate(frames_from(path, size, 0, info), 1):
        recent.append(image)
        if starts and n == starts[0] + num_frames:
            yield starts.popleft(), np.stack(recent), num_frames
    while starts and starts[0] < n:  # the end came early: the rest padded from what there is
        start = starts.popleft()
        frames = list(recent)[len(recent) - (n - start):]
        yield start, _padded(frames, num_frames), len(frames)


def measure_read_speed(path, size, num_frames, clips=8, seed=0):
    """How fast one process reads a video: "frames_per_s" and "clips_per_s" at random starts (real
    frames), "decode_frames_per_s" decoding alone, "seconds_per_clip" at its start, middle, end."""
    info = probe_video(path)
    read_clip(path, size, num_frames, 0, info=info)  # untimed: the file into the page cache
    rng, begin = np.random.default_rng(seed), time.perf_counter()
    frames = sum(read_clip(path, size, num_frames, rng=rng, info=info)[1] for _ in range(clips))
    seconds, begin, decoded = time.perf_counter() - begin, time.perf_counter(), 0
    for _ in range(clips):
        container, stream = _open_video(path)
        with container:
            decoded += sum(1 for _ in itertools.islice(container.decode(stream), num_frames))
    speed = {"frames_per_s": frames / seconds, "clips_per_s": clips / seconds,
             "decode_frames_per_s": decoded / (time.perf_counter() - begin), "seconds_per_clip": {}}
    n = info["n_frames"]
    for where, start in (("start", 0), ("middle", n // 2), ("end", max(n - num_frames, 0))):
        begin = time.perf_counter()
        read_clip(path, size, num_frames, start, info=info)
        speed["seconds_per_clip"][where] = time.perf_counter() - begin
    return speed


# -----------------------------------------------------------------------------
# writing videos and pictures, each through a temporary file (harness.atomic_path)

VIDEO_CODECS = {  # codec -> the pixel format it stores
    "libx264": "yuv420p",  # H.264, what every player reads; crf sets the quality
    "mpeg4": "yuv420p",    # MPEG-4 part 2 in .avi, UCF-101's format, at about its bit rate
    "ffv1": "bgr0",        # lossless and compact (.mkv): clips a metric must see as they were
    "huffyuv": "rgb24",    # lossless (.avi), ~1.5x FFV1's size, 4x faster to decode
    "rawvideo": "rgb24",   # uncompressed (.mov): nothing to decode, the fastest prepared sets
}


@contextlib.contextmanager
def video_writer(path, fps=8, crf=12, lossless=False, codec=None):
    """Yields write(frame (H, W, 3) uint8) for a new video file that appears if the block ends
    without error. codec: one of VIDEO_CODECS, default H.264 at quality crf or lossless FFV1 RGB."""
    codec = codec or ("ffv1" if lossless else "libx264")
    if codec not in VIDEO_CODECS:
        raise ValueError(f"unknown codec {codec!r}; use one of {', '.join(VIDEO_CODECS)}.")
    pix_fmt, scaler, stream = VIDEO_CODECS[codec], VideoReformatter(), None
    with H.atomic_path(path) as temporary, av.open(temporary, mode="w") as container:
        def write(image):
            nonlocal stream
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"frames must be uint8 (H, W, 3), not {image.dtype} {image.shape}")
            if pix_fmt == "yuv420p":  # even sides: an odd last row or column is repeated
                image = np.pad(image, ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0)),
                               mode="edge")
            if stream is None:  # sized by the first frame
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width, stream.pix_fmt = *image.shape[:2], pix_fmt
                bits = str(int(0.25 * image[..., 0].size * fps))  # UCF-101's ~0.25 per pixel
                stream.options = {"libx264": {"crf": str(crf)}, "mpeg4": {"b": bits}}.get(codec, {})
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(scaler.reformat(frame, format=pix_fmt)))

        yield write
        if stream is None:
            raise ValueError(f"no frames to write to {path}.")
        container.mux(stream.encode())  # flush the encoder


def write_video(path, frames, **options):
    """(T, H, W, 3) uint8, or an iterable of frames (a long video never in memory) -> a video."""
    with video_writer(path, **options) as write:
        for image in frames:
            write(image)


def to_uint8(video):
    """[-1, 1] float -> uint8 as StyleGAN-V does for FVD: x * 127.5 + 128 clamped, truncated."""
    return (video.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def from_uint8(video):
    """uint8 (0..255) -> float in [-1, 1], the models' input range."""
    return video.float() / 127.5 - 1


def safe_name(text):
    """A file name made from data (a class name, a video's stem): no folders, no hidden files."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).lstrip(".") or "_"


def write_png(path, image):
    """(H, W, 3) uint8 -> an RGB PNG written by hand (no imaging library), filter 0 on each row."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, _ = image.shape

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)     # 8 bits, truecolour, no interlace
    with H.atomic_path(path) as temporary, open(temporary, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))


def frame_grid(videos, num_columns=8, zoom=1):
    """(N, T, H, W, 3) uint8 clips -> an image: a row per clip, num_columns evenly spaced frames."""
    videos, T = np.asarray(videos), len(videos[0])
    columns = np.unique(np.linspace(0, T - 1, min(num_columns, T)).round().astype(int))
    grid = rearrange(videos[:, columns], "n f h w c -> (n h) (f w) c")
    return grid.repeat(zoom, axis=0).repeat(zoom, axis=1)


def comparison_grid(inputs, recons, num_columns=8, zoom=1, error_gain=4):
    """(K, T, H, W, 3) uint8 x2 -> frame_grid rows: input, reconstruction, |error| x error_gain."""
    inputs, recons = np.asarray(inputs), np.asarray(recons)
    error = np.clip(np.abs(inputs.astype(np.int16) - recons.astype(np.int16)) * error_gain, 0, 255)
    rows = np.stack([inputs, recons, error.astype(np.uint8)], 1)              # (K, 3, T, H, W, 3)
    return frame_grid(rearrange(rows, "k r t h w c -> (k r) t h w c"), num_columns, zoom)


def planes_image(planes, zoom=1):
    """A triplane's planes (C, h, w) side by side, each its first 3 principal components as RGB."""
    images = []
    for z in planes:
        texels = rearrange(z.float().cpu(), "c h w -> (h w) c")
        texels = texels - texels.mean(0)
        components = torch.linalg.svd(texels, full_matrices=False).Vh[:3]         # (<=3, C)
        rgb = torch.nn.functional.pad(texels @ components.T, (0, 3 - len(components)))
        low, high = rgb.min(0).values, rgb.max(0).values
        rgb = (rgb - low) / (high - low).clamp_min(1e-8)
        rgb = rearrange(rgb, "(h w) c -> h w c", h=z.shape[1])
        images.append((rgb * 255).round().byte().numpy().repeat(zoom, 0).repeat(zoom, 1))
    return stack_images(*images, axis=1)


def stack_images(*images, axis=0, gap=4):
    """(H, W, 3) uint8 images one under another (axis 0) or side by side (1), white between."""
    if axis == 1:  # side by side: turned, one under another, turned back
        turned = [rearrange(image, "h w c -> w h c") for image in images]
        return rearrange(stack_images(*turned, gap=gap), "w h c -> h w c")
    width = max(image.shape[1] for image in images)
    return np.concatenate([np.pad(image, ((0, gap), (0, width - image.shape[1]), (0, 0)),
                                  constant_values=255) for image in images])

# -----------------------------------------------------------------------------
# preparing a data set: every video resized and cropped once, stored losslessly

# codec of the prepared copies -> their container. At 128x128 on 2 cores rawvideo reads ~45,000
# frames/s (49 KB a frame), huffyuv ~6,000 (~20 KB), UCF-101's MPEG-4 ~4,400 (~2.5 KB)
PREPARED_FORMATS = {"rawvideo": ".mov", "huffyuv": ".avi"}


def _prepare_one(job):
    """Write one prepared video: "written", "exists" or the read error."""
    source, target, size, codec = job
    if os.path.exists(target):
        return "exists"
    try:
        info = probe_video(source)  # its fps for playback only: frames are stored one for one
        write_video(target, frames_from(source, size, 0, info), fps=info["fps"], codec=codec)
        return "written"
    except VideoReadError as e:  # only reading is skipped: a failed write (disk full) stops
        return str(e)


def prepare_videos(source_root, target_root, img_size, workers=1, codec="rawvideo"):
    """A copy of source_root (same folders and names), every video at img_size, stored losslessly:
    frame i of a copy is read_clip's frame i of its source, bit for bit (bar concealed damage)."""
    if os.path.abspath(target_root).startswith(os.path.join(os.path.abspath(source_root), "")):
        raise ValueError(f"--prepare: put the copy {target_root!r} outside {source_root!r}.")
    jobs, targets = [], {}
    for path, _ in find_videos(source_root):
        relative = os.path.splitext(os.path.relpath(path, source_root))[0] + PREPARED_FORMATS[codec]
        if relative in targets:
            raise ValueError(f"{path} and {targets[relative]} would both be prepared as "
                             f"{relative}; rename one of them.")
        targets[relative] = path
        jobs.append((path, os.path.join(target_root, relative), hw(img_size), codec))
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        outcomes = list(pool.imap_unordered(_prepare_one, jobs, 4) if pool
                        else map(_prepare_one, jobs))
    unreadable = [outcome for outcome in outcomes if outcome not in ("written", "exists")]
    warn_skipped(unreadable)
    return {"written": outcomes.count("written"), "exists": outcomes.count("exists"),
            "unreadable": len(unreadable)}


# -----------------------------------------------------------------------------
# the dataset and its loader

IN_MEMORY_BYTES = 2 ** 29  # a set whose frames fit (the synthetic one) is decoded once, kept


class VideoDataset(torch.utils.data.Dataset):
    """A clip of num_frames frames per video of a folder, at frame_size (img_size or (H, W)).
    split: "train", "val" (held_out_paths) or "all". An item: {"video": uint8 (T, H, W, 3),
    "n_frames" (real ones), "label", "video_index", "start"}; ClipSampler's seed fixes the start."""

    def __init__(self, root, frame_size, num_frames, split="train", val_fraction=0.1,
                 split_file="", random_start=None):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, not {split!r}.")
        self.root, videos = os.path.abspath(root), find_videos(root)
        if not videos:
            raise FileNotFoundError(f"no readable video in {root!r} (searched for "
                                    f"{', '.join(VIDEO_EXTENSIONS)}); add videos to it.")
        self.class_names = sorted({name for _, name in videos})
        self.size, self.num_frames = hw(frame_size), num_frames
        self.random_start = split == "train" if random_start is None else random_start
        chosen = videos
        if split != "all":
            held_out = held_out_paths(videos, root, val_fraction, split_file)
            chosen = [(p, name) for p, name in videos if (p in held_out) == (split == "val")]
        self.files, self.info, unreadable = [], [], []
        for path, name in chosen:
            try:
                self.info.append(probe_video(path))
                self.files.append((path, self.class_names.index(name)))
            except VideoReadError as e:
                unreadable.append(e)
        warn_skipped(unreadable)
        if chosen and not self.files:
            raise FileNotFoundError(
                f"no readable video in the {split!r} split of {root!r}: all {len(chosen)} videos "
                f"chosen for it failed (e.g. {unreadable[0]}), the other "
                f"{len(videos) - len(chosen)} videos are in the other split; replace the files.")
        small = sum(i["n_frames"] for i in self.info) * 3 * np.prod(self.size) <= IN_MEMORY_BYTES
        self.decoded = {} if small else None

    def __len__(self):
        return len(self.files)

    def relative_paths(self):
        return [os.path.relpath(path, self.root) for path, _ in self.files]

    def __getitem__(self, index):
        index, seed = index if isinstance(index, (tuple, list)) else (index, index)
        for attempt in range(len(self.files)):  # a file that fails now: take the next one
            i = (index + attempt) % len(self.files)
            (path, label), rng = self.files[i], np.random.default_rng(seed)
            try:
                if self.decoded is not None and i not in self.decoded:
                    self.decoded[i] = np.stack(list(frames_from(path, self.size, 0, self.info[i])))
                n = len(self.decoded[i]) if self.decoded is not None else self.info[i]["n_frames"]
                start = random_start(n, self.num_frames, rng) if self.random_start else 0
                if self.decoded is not None:  # the slice read_clip would read
                    window = self.decoded[i][start:start + self.num_frames]
                    clip, n_frames = _padded(window, self.num_frames), len(window)
                else:
                    clip, n_frames = read_clip(path, self.size, self.num_frames, start,
                                               info=self.info[i])
                return _item(clip, n_frames=n_frames, label=label, video_index=i, start=start)
            except VideoReadError as e:
                warnings.warn(f"skipping unreadable video {e}")
        raise VideoReadError(f"none of the {len(self.files)} videos could be read")


def _item(clip, **numbers):
    """A dataset item: the clip (T, H, W, 3) uint8 and each number as a tensor."""
    return {"video": torch.from_numpy(clip), **{k: torch.tensor(v) for k, v in numbers.items()}}


def batched_windows(dataset, videos, stride, batch_size):
    """Every window of the given videos (iter_windows: each read once), batched as stacked items."""
    items = (_item(clip, n_frames=n_real, label=dataset.files[i][1], video_index=i, start=start)
             for i in videos
             for start, clip, n_real in iter_windows(dataset.files[i][0], dataset.size,
                                                     dataset.num_frames, stride, dataset.info[i]))
    while batch := list(itertools.islice(items, batch_size)):
        yield {k: torch.stack([item[k] for item in batch]) for k in batch[0]}


class ClipSampler(torch.utils.data.Sampler):
    """An endless, deterministic stream of (index, seed) for one rank: per epoch, a seeded shuffle
    of the clips in global batches of batch_size x world_size, rank r taking rows r * batch_size
    on, so the ranks read what one process would. It starts anywhere, decoding nothing to skip."""

    def __init__(self, num_items, shuffle, seed, rank, world_size, batch_size, start=0):
        self.num_items, self.shuffle, self.seed, self.start = num_items, shuffle, seed, start
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def __iter__(self):
        orders = {}
        for k in itertools.count(self.start):                              # this rank's k-th clip
            batch, row = divmod(k, self.batch_size)
            position = (batch * self.world_size + self.rank) * self.batch_size + row  # global
            epoch, i = divmod(position, self.num_items)
            if epoch not in orders:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                orders = {epoch: torch.randperm(self.num_items, generator=gen).tolist()
                          if self.shuffle else list(range(self.num_items))}
            index = orders[epoch][i]
            yield index, (self.seed * 1_000_003 + epoch) * 1_000_003 + index


def leave_signals_to_the_loop(worker_id):
    """Workers ignore SIGINT and SIGTERM, sent to every process: the loop saves, then ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size, shuffle, num_workers, dist=None, seed=0, start_step=0,
                infinite=True):
    """Batches of clips decoded in worker processes (none for a set in memory: they would only take
    cores from the model). infinite: ClipSampler's stream from batch start_step, else one pass."""
    if len(dataset) == 0:
        raise FileNotFoundError("the data set has no readable clips for this split; add videos "
                                "or lower --val_fraction.")
    if getattr(getattr(dataset, "dataset", dataset), "decoded", None) is not None:
        num_workers = 0
    options = dict(num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                   persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None,
                   worker_init_fn=leave_signals_to_the_loop)
    if not infinite:
        return torch.utils.data.DataLoader(dataset, batch_size, shuffle=False, **options)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    sampler = ClipSampler(len(dataset), shuffle, seed, rank, world, batch_size,
                          start=start_step * batch_size)
    return iter(torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, drop_last=True,
                                            **options))


# -----------------------------------------------------------------------------
# the split: which videos are held out, decided by each video's own name

# UCF-101 names clips v_<Class>_g<group>_c<clip>; the clips of one group share actor and scene
UCF_CLIP_NAME = re.compile(r"(v_.+_g\d+)_c\d+")


def held_out_paths(videos, root, val_fraction, split_file=""):
    """The held-out paths among videos (path, class) under root: split_file's (a UCF-101 list; one
    named "test..." lists them, any other the training ones), else the groups (UCF-101 clip groups,
    or files) whose path below root hashes below val_fraction: adding videos moves none across."""
    def list_key(path):  # a split list's name for a video in any container: (class folder, stem)
        stem = os.path.splitext(os.path.basename(path))[0]
        return os.path.basename(os.path.dirname(path)).lower(), stem.lower()

    if split_file:
        if not os.path.isfile(split_file):
            raise FileNotFoundError(f"split_file {split_file!r} does not exist; pass a list like "
                                    f"UCF-101's trainlist01.txt, or none to split by name.")
        path_of = {list_key(path): path for path, _ in videos}
        with open(split_file) as f:
            entries = [line.split()[0] for line in f if line.strip()]
        keys = [list_key(entry.replace("\\", "/")) for entry in entries]
        listed = {path_of[key] for key in keys if key in path_of}
        unmatched = [entry for entry, key in zip(entries, keys) if key not in path_of]
        if unmatched:
            warnings.warn(f"{len(unmatched)} entries of {split_file} match no video in the data "
                          f"folder (e.g. {unmatched[0]}); they are ignored.")
        is_test_list = "test" in os.path.basename(split_file).lower()
        return listed if is_test_list else {path for path, _ in videos} - listed

    def group_hash(path):  # a uniform number in [0, 1) from the name of the path's group
        stem = os.path.splitext(os.path.basename(path))[0]
        found = UCF_CLIP_NAME.fullmatch(stem)
        named = os.path.join(os.path.dirname(path), found[1] if found else stem)
        group = os.path.relpath(named, root).replace(os.sep, "/")  # `class/stem`, `stem` in root
        return int.from_bytes(hashlib.sha256(group.encode()).digest()[:8], "big") / 2 ** 64

    return {path for path, _ in videos if group_hash(path) < val_fraction}


def report_split_change(recorded, val_set, ckpt_path):
    """Say when the held-out videos a checkpoint recorded are not those of the folder now."""
    now = set(val_set.relative_paths())
    if recorded is not None and set(recorded) != now:
        gone, new = sorted(set(recorded) - now), sorted(now - set(recorded))
        warnings.warn(f"the held-out videos of {ckpt_path} are not the folder's now: "
                      f"{len(gone)} gone (e.g. {gone[:2]}), {len(new)} new (e.g. {new[:2]})")


# -----------------------------------------------------------------------------
# the synthetic set: scenes with the statistics of photographs, filmed by a moving camera

MOTIONS = ("still", "zoom", "pan", "handheld")  # the classes: how the camera moves


def pink_noise(rng, shape, size, slope=1.0):
    """Noise (*shape, size, size) float32, zero mean and unit std per image, its amplitude
    spectrum falling as 1/f^slope: photographs of natural scenes fall about as 1/f."""
    f = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None])
    f[0, 0] = np.inf                                                        # no constant term
    spectrum = rng.normal(size=(*shape, size, size // 2 + 1, 2)) @ np.array([1, 1j])
    x = np.fft.irfft2(spectrum / f ** slope, s=(size, size))
    return ((x - x.mean((-2, -1), keepdims=True)) / x.std((-2, -1), keepdims=True)).astype("f4")


def texture(rng, size, contrast=1.0):
    """RGB (3, size, size) in [0, 1]: a greyish colour, a 1/f luminance and a fainter, smoother
    variation of hue (in photographs brightness varies more than colour)."""
    slope = rng.uniform(1.0, 1.5)
    luminance, hue = pink_noise(rng, (), size, slope), pink_noise(rng, (2,), size, slope + 0.3)
    colour = rng.uniform(0.2, 0.8) + rng.uniform(-0.15, 0.15, 3)
    hue_axes = np.linalg.qr(rng.normal(size=(3, 3)))[0][:, :2]                        # (3, 2)
    rgb = (colour[:, None, None] + 0.18 * contrast * luminance
           + 0.05 * np.einsum("ck,khw->chw", hue_axes, hue))
    return np.clip(rgb, 0, 1).astype("f4")


def object_sprite(rng, size=64):
    """RGBA (4, size, size): a textured blob or polygon, lit from one side, hard or soft edged."""
    v, u = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    angle, r = np.arctan2(v, u), np.hypot(u, v)
    if rng.random() < 0.5:  # a blob: a radius that wobbles with the angle
        k = rng.integers(2, 5)
        radius = 0.7 + 0.15 * np.sin(k * angle + rng.uniform(0, 6)) + 0.08 * np.sin((k + 1) * angle)
    else:  # a polygon of 3 to 6 sides
        n = rng.integers(3, 7)
        radius = 0.75 * np.cos(np.pi / n) / np.cos((angle - rng.uniform(0, 6)) % (2 * np.pi / n)
                                                   - np.pi / n)
    alpha = np.clip((radius - r) / rng.choice([0.03, 0.3]) + 0.5, 0, 1)
    light = rng.uniform(0, 2 * np.pi)
    shading = 0.8 + 0.25 * (np.cos(light) * u + np.sin(light) * v)
    return np.concatenate([np.clip(texture(rng, size) * shading, 0, 1), alpha[None]]).astype("f4")


def camera_path(rng, motion, num_frames):
    """The camera of each frame: its centre (T, 2) in view widths and its zoom (T,), > 1 nearer."""
    t = torch.arange(num_frames) / num_frames - 0.5                                   # (T,)
    centre, zoom = torch.zeros(num_frames, 2), torch.ones(num_frames)
    if motion == "pan":
        heading, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.25, 0.75)  # view widths per video
        centre = torch.tensor([np.cos(heading), np.sin(heading)]) * speed * t[:, None]
    elif motion == "zoom":
        centre = torch.from_numpy(rng.uniform(-0.1, 0.1, 2)) * (t[:, None] + 0.5)
        zoom = torch.exp(rng.uniform(0.25, 0.6) * rng.choice([-1, 1]) * t)
    elif motion == "handheld":  # a small shake about a point, and a little breathing in depth
        centre = torch.from_numpy(rng.normal(0, 0.004, (num_frames, 2))).cumsum(0)
        centre = centre - centre.mean(0)
        zoom = 1 + torch.from_numpy(rng.normal(0, 0.004, num_frames)).cumsum(0)
    return centre.float(), zoom.float()


def film(image, centre, zoom, size, depth=1.0, position=None, scale=1.0):
    """What the camera sees of a canvas (C, S, S), RGB or RGBA: (T, C, size, size). A layer at
    `depth` moves 1/depth as fast as the camera (parallax) and spans [-1.5, 1.5]^2 view widths (its
    borders mirrored); a sprite at `position` (T, 2), 2 x scale wide, is transparent around."""
    axis = torch.linspace(-0.5, 0.5, size)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")                                 # the view
    zoom = zoom[:, None, None] ** (1 / depth)
    grid = torch.stack([centre[:, 0, None, None] / depth + xs / zoom,
                        centre[:, 1, None, None] / depth + ys / zoom], -1)        # (T, s, s, 2)
    if position is None:
        grid, padding = grid / 1.5, "reflection"
    else:
        grid, padding = (grid - position[:, None, None]) / scale, "zeros"
    canvas = torch.from_numpy(image)[None].expand(len(grid), -1, -1, -1)
    return torch.nn.functional.grid_sample(canvas, grid, padding_mode=padding, align_corners=False)


def render_video(rng, motion, num_frames, size):
    """(num_frames, size, size, 3) uint8: a far textured layer, a near one covering part of it, one
    to three objects moving in front, filmed by `motion`'s camera under a slowly changing light."""
    T, canvas = num_frames, 3 * size
    centre, zoom = camera_path(rng, motion, T)
    video = film(texture(rng, canvas), centre, zoom, size, depth=2.0)              # (T, 3, s, s)
    regions = np.clip((pink_noise(rng, (), canvas, 2.0) + rng.uniform(-1, 0.3))
                      / rng.uniform(0.05, 0.4), 0, 1)                     # large, hard or soft
    layers = [film(np.concatenate([texture(rng, canvas, 1.3), regions[None]]), centre, zoom, size)]
    t = torch.arange(T)[:, None] - T / 2
    for _ in range(rng.integers(1, 4)):
        speed = rng.uniform(0.2, 1.0) if motion == "still" else rng.uniform(0, 0.6)
        heading = rng.uniform(0, 2 * np.pi)
        velocity = torch.tensor([np.cos(heading), np.sin(heading)]).float() * speed / T
        position = torch.from_numpy(rng.uniform(-0.3, 0.3, 2)).float() + velocity * t  # (T, 2)
        layers.append(film(object_sprite(rng), centre, zoom, size, 1.0, position,
                           rng.uniform(0.12, 0.3)))
    for layer in layers:                                        # each over the ones before it
        video = video * (1 - layer[:, 3:]) + layer[:, :3] * layer[:, 3:]
    phase = torch.arange(T) / T * rng.uniform(0.3, 1) + rng.uniform()
    gain = 1 + rng.uniform(0.05, 0.2) * torch.sin(2 * np.pi * phase)                    # (T,)
    tint = 1 + torch.from_numpy(rng.normal(0, 0.04, 3)).float() * t / T               # (T, 3)
    video = video * gain[:, None, None, None] * tint[:, :, None, None]
    return to_uint8(rearrange(video, "t c h w -> t h w c") * 2 - 1).numpy()


def moving_photo(image, num_frames=64, size=64, seed=0):
    """A photograph (H, W, 3) uint8 filmed as the synthetic set is, the camera panning across its
    centre square and zooming: (num_frames, size, size, 3) uint8."""
    rng, side = np.random.default_rng(seed), min(image.shape[:2])
    top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
    photo = torch.from_numpy(image[top:top + side, left:left + side]).float() / 255
    photo = torch.nn.functional.interpolate(rearrange(photo, "h w c -> 1 c h w"),
                                            size=(3 * size, 3 * size), mode="area")[0]
    centre, zoom = camera_path(rng, "pan", num_frames)[0], camera_path(rng, "zoom", num_frames)[1]
    video = film(photo.numpy(), centre, zoom, size)
    return to_uint8(rearrange(video, "t c h w -> t h w c") * 2 - 1).numpy()


def make_synthetic(out_dir, num_classes=4, videos_per_class=48, num_frames=64, size=64, seed=0):
    """Write the synthetic set: out_dir/<motion>/<motion>_NNN.mp4, a class per camera motion;
    videos of two clips' length, so that clips are drawn from them."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        motion = MOTIONS[c % len(MOTIONS)]
        name = motion if c < len(MOTIONS) else f"{motion}_{c // len(MOTIONS)}"
        for i in range(videos_per_class):
            write_video(os.path.join(out_dir, name, f"{name}_{i:03d}.mp4"),
                        render_video(rng, motion, num_frames, size))
    return out_dir


def make_ucf_like_video(path, num_frames=175, seed=0, loops=1):
    """A video in UCF-101's format (320x240, 25 fps, MPEG-4 part 2 .avi at its bit rate, camera-like
    grain) to measure read speed without a download; `loops` times its frames make it long."""
    rng = np.random.default_rng(seed)
    video = repeat(render_video(rng, "pan", num_frames, 160), "t h w c -> t (h 2) (w 2) c")
    grain = rng.integers(-6, 7, video[:, 40:280].shape)                      # (T, 240, 320, 3)
    video = np.clip(video[:, 40:280] + grain, 0, 255).astype(np.uint8)
    write_video(path, (frame for _ in range(loops) for frame in video), fps=25, codec="mpeg4")
    return path


def ensure_synthetic(out_dir="data/synthetic"):
    """The synthetic set's folder, written first if it holds no videos yet."""
    videos = find_videos(out_dir) if os.path.isdir(out_dir) else []
    if not videos:
        print(f"writing the synthetic video set to {out_dir}/")
        make_synthetic(out_dir)
    elif {c for _, c in videos} != set(MOTIONS):
        raise ValueError(f"{out_dir} holds another synthetic set (an older version's classes); "
                         f"delete it, and the default job writes this version's.")
    return out_dir


# -----------------------------------------------------------------------------
# the tokens file: triplanes of a data set, written by tokenizer.py --encode, read by dit.py

PLANES = ("z_xy", "z_xt", "z_yt")
CLIP_FIELDS = ("labels", "n_frames", "video_index", "start")


def save_tokens(path, clips, class_names, tokenizer_ckpt, tokenizer_config, fingerprint, videos):
    """clips: the stacked planes (N, C, ., .) and label, n_frames, video_index, start (N,); saved
    with each plane's per-channel mean and std, the classes, videos and tokenizer that made them."""
    ckpt = tokenizer_ckpt if tokenizer_ckpt in H.RELEASED else os.path.abspath(tokenizer_ckpt)
    tokens = {"kind": "coordtok_tokens", "class_names": list(class_names), "videos": list(videos),
              "tokenizer_ckpt": ckpt, "tokenizer_fingerprint": fingerprint,
              "tokenizer_config": dict(tokenizer_config), "mean": {}, "std": {},
              "labels": clips["label"].long(), **{k: clips[k].long() for k in CLIP_FIELDS[1:]}}
    for name in PLANES:
        tokens[name] = plane = clips[name].float()
        tokens["mean"][name] = plane.mean(dim=(0, 2, 3))                     # (C,)
        tokens["std"][name] = plane.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)
    H.atomic_save(tokens, path)


def load_tokens(path):
    """The dict save_tokens wrote, every field checked, or one error saying what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokens file {path!r} not found; write it with "
                                f"`python tokenizer.py --encode {path}`.")
    tokens = H.read_torch_file(path, "tokens file")
    if not isinstance(tokens, dict) or tokens.get("kind") != "coordtok_tokens":
        raise ValueError(f"{path!r} is not a tokens file; write one with `python tokenizer.py "
                         f"--encode NEW_PATH`.")
    H.check_tensors(tokens, f"tokens file {path!r}")  # no views: the checks below read them all
    try:
        n, labels = len(tokens["labels"]), tokens["labels"]
        problems = [f"{k} holds {len(tokens[k])} clips, not {n}" for k in (*PLANES, *CLIP_FIELDS)
                    if len(tokens[k]) != n]
        if n == 0:
            problems.append("it holds no clips")
        for k in PLANES:
            if not torch.isfinite(tokens[k]).all():
                problems.append(f"{k} is not finite")
            for stat, v in (("mean", tokens["mean"][k]), ("std", tokens["std"][k])):
                if v.shape != tokens[k].shape[1:2] or not torch.isfinite(v).all():
                    problems.append(f"{stat} of {k} is not finite per channel")
            if (tokens["std"][k] <= 0).any():
                problems.append(f"std of {k} is not positive per channel")
        classes = max(len(tokens["class_names"]), 1)
        if n and not (labels.min() >= 0 and labels.max() < classes):
            problems.append(f"labels are not in [0, {classes})")
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        problems = [f"a field is missing or malformed ({type(e).__name__}: {e})"]
    if problems:
        raise ValueError(f"tokens file {path!r} is damaged ({'; '.join(problems)}); write it "
                         f"again with `python tokenizer.py --encode {path}`.")
    H.check_tensors(tokens, f"tokens file {path!r}", tokens.get("checksums"))
    return tokens


def check_tokens_path(path):
    """--encode PATH may replace a tokens file, never anything else (a checkpoint, a video)."""
    if os.path.exists(path):
        try:
            kind = H.read_torch_file(path).get("kind")
        except (ValueError, AttributeError, FileNotFoundError):  # not a torch dict, or a folder
            kind = None
        if kind != "coordtok_tokens":
            raise ValueError(f"--encode {path} exists and is not a tokens file; pass a new path.")
    H.check_out_dir(os.path.dirname(os.path.abspath(path)), "--encode")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--synthetic", metavar="DIR", help="folder to write the synthetic set to")
    task.add_argument("--prepare", nargs=2, metavar=("SRC", "DST"),
                      help="every video of SRC at --img_size to DST, same folders")
    parser.add_argument("--codec", default="rawvideo", choices=PREPARED_FORMATS,
                        help="--prepare: rawvideo reads fastest, huffyuv takes 2.5x less disk")
    for name, p in list(inspect.signature(make_synthetic).parameters.items())[1:]:  # --synthetic
        parser.add_argument(f"--{name}", type=int, default=p.default)
    parser.add_argument("--img_size", type=int, default=128, help="--prepare: frame height")
    parser.add_argument("--img_width", type=int, default=0, help="--prepare: width (0: square)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="--prepare: processes")
    args = parser.parse_args(argv)
    with H.errors_as_exit(VideoReadError):
        if args.prepare:
            (source, target), begin = args.prepare, time.perf_counter()
            size = (args.img_size, args.img_width or args.img_size)
            counts = prepare_videos(source, target, size, args.workers, args.codec)
            print(f"prepared {source} in {target}/ in {time.perf_counter() - begin:.0f} s: "
                  f"{counts['written']} written, {counts['exists']} already there, "
                  f"{counts['unreadable']} unreadable (skipped, named above)")
        else:
            make_synthetic(args.synthetic, args.num_classes, args.videos_per_class,
                           args.num_frames, args.size, args.seed)
            print(f"wrote {args.num_classes * args.videos_per_class} videos to {args.synthetic}/")


if __name__ == "__main__":
    main()
