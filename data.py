"""
Video data for CoordTok: reading clips with PyAV, writing videos, preparing a data set for fast
reading, the built-in synthetic set, the patch/coordinate helpers of the training step, and the
tokens file read by dit.py.

  python data.py --synthetic data/synthetic     # write the synthetic set (mp4, a few classes)
  python data.py --prepare UCF-101 ucf128 --img_size 128   # a copy resized once: --data ucf128 reads
                                                            # clips ~10x faster, bit for bit the same

The file reads top to bottom: finding and decoding videos, writing them, preparing a resized
copy of a data set, the dataset and its loader, the synthetic set, the patch helpers (run on the
training device, vectorised), and the tokens file.
"""

import argparse
import contextlib
import itertools
import math
import multiprocessing
import os
import re
import struct
import time
import warnings
import zlib

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from einops import rearrange, repeat

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


# PyAV >= 17 scales with a thread per core unless told otherwise: at these frame sizes one thread is
# faster, and a loader already runs a process per core
_SCALER_THREADS = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}


def _to_rgb_square(frame, img_size, scaler):
    """A decoded frame of any pixel format and size -> (img_size, img_size, 3) uint8: the shorter side
    resized (area averaging, i.e. antialiased when shrinking), then the centre cropped. A frame that is
    already img_size square (a prepared copy) is only converted to RGB, not resampled.

    scaler is a VideoReformatter kept for the whole video: it keeps FFmpeg's scaler between frames,
    where frame.reformat would set one up for every frame (3x the cost of the resize itself)."""
    w, h = frame.width, frame.height
    scale = img_size / min(w, h)
    new_w, new_h = max(img_size, round(w * scale)), max(img_size, round(h * scale))
    rgb = scaler.reformat(frame, width=new_w, height=new_h, format="rgb24", interpolation="AREA",
                          **_SCALER_THREADS).to_ndarray()
    top, left = (new_h - img_size) // 2, (new_w - img_size) // 2
    return rgb[top:top + img_size, left:left + img_size]


def _square_frames(path, container, stream, img_size, start=0):
    """The frames of an open video from index start on, each through _to_rgb_square; frames before start
    are decoded but not converted. No seeking: keyframe seeks are not frame-exact. A decoding error ends
    the frames (a truncated file keeps those that decoded), or is VideoReadError if none came out."""
    scaler = VideoReformatter()
    converted = 0
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i >= start:
                yield _to_rgb_square(frame, img_size, scaler)
                converted += 1
    except (av.FFmpegError, OSError) as e:
        if not converted:
            raise VideoReadError(f"{path}: cannot decode ({e})") from e


def read_clip(path, img_size, num_frames, start=None, rng=None, n_total=None):
    """num_frames consecutive frames of a video as (num_frames, img_size, img_size, 3) uint8, and how many
    of them are real (a video shorter than the clip is padded with zero frames).

    start=None draws the first frame at random (training, with rng); an int fixes it (evaluation).
    Decoding starts at the first frame and stops at the clip's last one.
    """
    clip = np.zeros((num_frames, img_size, img_size, 3), dtype=np.uint8)
    n_real = 0
    container, stream = _open_video(path)
    try:
        if n_total is None:
            n_total = _frame_count(stream, container)
        if start is None:
            start = random_start(n_total, num_frames, rng)
        frames = itertools.islice(_square_frames(path, container, stream, img_size, start), num_frames)
        for n_real, image in enumerate(frames, 1):
            clip[n_real - 1] = image
    finally:
        container.close()
    if n_real == 0 and start > 0:  # the header overstated the length: take the clip from the start
        return read_clip(path, img_size, num_frames, start=0)
    if n_real == 0:
        raise VideoReadError(f"{path}: no frames")
    return clip, n_real


def random_start(n_total, num_frames, rng=None):
    """A clip's first frame drawn uniformly among those that keep the clip inside the video (0 if shorter)."""
    rng = rng if rng is not None else np.random.default_rng()
    return int(rng.integers(0, max(n_total - num_frames, 0) + 1))


def clip_from(frames, num_frames, start=None, rng=None):
    """The clip read_clip gives, cut from a video already decoded (T, S, S, 3): zero-padded, and its real frames."""
    start = random_start(len(frames), num_frames, rng) if start is None else start
    clip = np.zeros((num_frames, *frames.shape[1:]), dtype=np.uint8)
    window = frames[start:start + num_frames]
    clip[:len(window)] = window
    return clip, len(window)


def measure_read_speed(path, img_size, num_frames, clips=8, seed=0):
    """How fast this process reads one video file: {"frames_per_s", "clips_per_s"} of the training read
    path (read_clip at random starts, as VideoDataset reads; real frames counted), and "decode_frames_per_s",
    decoding alone (the first num_frames frames, nothing converted): the most a read path can reach."""
    n_total = probe_video(path)
    read_clip(path, img_size, num_frames, 0, n_total=n_total)  # untimed: the file into the page cache
    rng = np.random.default_rng(seed)
    frames, begin = 0, time.perf_counter()
    for _ in range(clips):
        frames += read_clip(path, img_size, num_frames, rng=rng, n_total=n_total)[1]
    read_seconds = time.perf_counter() - begin
    decoded, begin = 0, time.perf_counter()
    for _ in range(clips):
        container, stream = _open_video(path)
        try:
            decoded += sum(1 for _ in itertools.islice(container.decode(stream), num_frames))
        finally:
            container.close()
    decode_seconds = time.perf_counter() - begin
    return {"frames_per_s": frames / read_seconds, "clips_per_s": clips / read_seconds,
            "decode_frames_per_s": decoded / decode_seconds}


# -----------------------------------------------------------------------------
# writing videos


# codec -> the pixel format it stores
VIDEO_CODECS = {
    "libx264": "yuv420p",  # H.264, what every player reads; crf sets the quality
    "mpeg4": "yuv420p",    # MPEG-4 part 2 in .avi, UCF-101's format, at about its bit rate
    "ffv1": "bgr0",        # lossless and compact (.mkv): clips a metric must see as they were made
    "huffyuv": "rgb24",    # lossless (.avi), ~1.5x FFV1's size, 4x faster to decode: prepared data sets
    "rawvideo": "rgb24",   # uncompressed (.mov): nothing to decode, the fastest prepared data sets
}


def write_video(path, frames, fps=8, crf=12, lossless=False, codec=None):
    """(T, H, W, 3) uint8 frames, or any iterable of (H, W, 3) uint8 frames (encoded as they come, so a
    long video never sits in memory) -> a video file.

    codec: one of VIDEO_CODECS; by default H.264 (yuv420p) at quality crf, or FFV1 in RGB with
    lossless=True (use a .mkv path), which reads back bit-exact. The yuv420p codecs need even sizes: odd
    heights/widths are padded by one edge row/column. "mpeg4" aims at 0.25 bits per pixel, about
    UCF-101's rate (~500 kb/s at 320x240, 25 fps)."""
    codec = codec or ("ffv1" if lossless else "libx264")
    if codec not in VIDEO_CODECS:
        raise ValueError(f"write_video: unknown codec {codec!r}; use one of {', '.join(VIDEO_CODECS)}")
    pix_fmt = VIDEO_CODECS[codec]
    scaler = VideoReformatter()  # one colour converter for the whole video (see _to_rgb_square)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = None
        for image in frames:
            image = np.asarray(image)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"write_video needs uint8 frames of shape (H, W, 3), as a (T, H, W, 3) array or "
                                 f"a sequence; got a frame of {image.dtype} {image.shape}")
            if pix_fmt == "yuv420p":
                image = np.pad(image, ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0)), mode="edge")
            if stream is None:  # sized by the first frame
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = image.shape[:2]
                stream.pix_fmt = pix_fmt
                options = {"libx264": {"crf": str(crf)}, "mpeg4": {"b": str(int(0.25 * image[..., 0].size * fps))}}
                stream.options = options.get(codec, {})
            frame = scaler.reformat(av.VideoFrame.from_ndarray(image, format="rgb24"), format=pix_fmt)
            container.mux(stream.encode(frame))
        if stream is None:
            raise ValueError(f"write_video: no frames to write to {path}")
        container.mux(stream.encode())  # flush the encoder


def to_uint8(video):
    """[-1, 1] float -> uint8 tensor, as StyleGAN-V converts generated frames for FVD: x * 127.5 + 128,
    clamped, truncated (that is, rounded half up)."""
    return (video.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def from_uint8(video):
    """uint8 (0..255) -> float in [-1, 1], the models' input range."""
    return video.float() / 127.5 - 1


@contextlib.contextmanager
def atomic_path(path, temporary=None):
    """The temporary path to write `path` through (default path + ".tmp"): renamed to path when the block
    ends without error, removed otherwise. A kill mid-write never leaves a truncated file under path, nor
    more than one temporary file (the next write reuses its name)."""
    temporary = temporary or f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def atomic_save(obj, path):
    """torch.save that never destroys the last good file (atomic_path)."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


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
# preparing a data set: every video resized and cropped once, stored losslessly at img_size

# codec of the prepared copies -> their container. Read path at 128x128 on a 2-core CPU: rawvideo ~48,000
# frames/s (49 KB a frame on disk), huffyuv ~6,000 (~20 KB), the MPEG-4 source ~4,700 (~2.5 KB). For
# UCF-101's ~2.5M frames that is ~120 GB raw or ~50 GB huffyuv, against 6.5 GB of source.
PREPARED_FORMATS = {"rawvideo": ".mov", "huffyuv": ".avi"}


def _prepare_one(job):
    """Write one prepared video; returns (source, what happened): "written", "exists" or the read error."""
    source, target, img_size, codec = job
    if os.path.exists(target):
        return source, "exists"
    # a hidden temporary name that find_videos skips: a killed run never leaves a file that looks complete
    stem, extension = os.path.splitext(os.path.basename(target))
    partial = os.path.join(os.path.dirname(target), f".{stem}.partial{extension}")
    try:
        probe_video(source)
        container, stream = _open_video(source)
        try:
            fps = stream.average_rate or 25  # for playback only: frames are stored one for one
            with atomic_path(target, partial) as temporary:
                write_video(temporary, _square_frames(source, container, stream, img_size), fps=fps, codec=codec)
        finally:
            container.close()
        return source, "written"
    except VideoReadError as e:  # only reading is skipped: a failed write (disk full) stops the run
        return source, str(e)


def prepare_videos(source_root, target_root, img_size, workers=1, codec="rawvideo"):
    """A copy of source_root with every video at img_size x img_size (shorter side resized, centre
    cropped, by the same code as read_clip), in the same folders and under the same names, stored
    losslessly (codec: one of PREPARED_FORMATS): frame i of a copy is frame i of read_clip on its source,
    bit for bit, and read_clip reads the copy without resizing it, several times faster.

    Runs in `workers` processes; skips outputs that exist (a re-run resumes) and unreadable sources (a
    warning names each). Returns {"written", "exists", "unreadable"} counts."""
    if os.path.abspath(target_root).startswith(os.path.join(os.path.abspath(source_root), "")):
        raise ValueError(f"--prepare: put the copy {target_root!r} outside {source_root!r}, or the source folder "
                         f"would hold every video twice")
    jobs, targets = [], {}
    for path, _ in find_videos(source_root):
        relative = os.path.splitext(os.path.relpath(path, source_root))[0] + PREPARED_FORMATS[codec]
        if relative in targets:
            raise ValueError(f"{path} and {targets[relative]} would both be prepared as {relative}; "
                             f"rename one of them")
        targets[relative] = path
        jobs.append((path, os.path.join(target_root, relative), img_size, codec))
    counts = {"written": 0, "exists": 0, "unreadable": 0}
    with multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        outcomes = pool.imap_unordered(_prepare_one, jobs, chunksize=4) if pool else map(_prepare_one, jobs)
        for source, outcome in outcomes:
            if outcome not in counts:
                warnings.warn(f"skipping unreadable video {outcome}")
                outcome = "unreadable"
            counts[outcome] += 1
    return counts


# -----------------------------------------------------------------------------
# the dataset and its loader


# UCF-101 names clips v_<Class>_g<group>_c<clip>; the clips of one group share actor and scene
UCF_CLIP_NAME = re.compile(r"(v_.+_g\d+)_c\d+")


def _video_key(path):
    """(class folder, file name without extension), lower case: how a split list names a video, whatever
    the container (a prepared .avi copy of an .mp4 still matches)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(path)).lower(), stem.lower()


def _held_out_by_group(videos, val_fraction):
    """The held-out paths of a deterministic split by group: in each class, the groups (UCF-101's
    v_<Class>_gNN, otherwise each file on its own) ordered by a hash of their name; the first
    round(val_fraction * n) groups (at least one when the class has two or more) are held out."""
    groups_by_class = {}
    for path, name in videos:
        stem = os.path.splitext(os.path.basename(path))[0]
        group = UCF_CLIP_NAME.fullmatch(stem)
        groups_by_class.setdefault(name, {}).setdefault(group[1] if group else stem, []).append(path)
    held_out = set()
    for groups in groups_by_class.values():
        order = sorted(groups, key=lambda g: (zlib.crc32(g.encode()), g))
        n_val = round(val_fraction * len(order))
        if val_fraction > 0 and len(order) >= 2:
            n_val = max(n_val, 1)
        held_out.update(path for g in order[:n_val] for path in groups[g])
    return held_out


def _held_out_by_list(videos, split_file):
    """The held-out paths of an official split list (UCF-101's trainlist01.txt / testlist01.txt: one
    `Class/v_Class_gNN_cNN.avi [label]` per line). A list whose name contains "test" names the held-out
    videos; any other list names the training videos, and the rest are held out."""
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"split_file {split_file!r} does not exist; give a list like UCF-101's "
                                f"trainlist01.txt or testlist01.txt, or leave it empty to split by a hash of the names")
    path_of = {_video_key(path): path for path, _ in videos}
    listed, unmatched = set(), []
    with open(split_file) as f:
        for entry in (line.split()[0] for line in f if line.strip()):
            key = _video_key(entry.replace("\\", "/"))
            if key in path_of:
                listed.add(path_of[key])
            else:
                unmatched.append(entry)
    if unmatched:
        warnings.warn(f"{len(unmatched)} entries of {split_file} match no video in the data folder (e.g. "
                      f"{unmatched[0]}); they are ignored. Is the folder the whole data set?")
    is_test_list = "test" in os.path.basename(split_file).lower()
    return listed if is_test_list else {path for path, _ in videos} - listed


def _split_files(videos, split, val_fraction, split_file=""):
    """The (path, class) pairs of one split: "all", or "train" / "val" by split_file if given, otherwise
    by a hash of the group names (_held_out_by_group)."""
    if split == "all":
        return videos
    held_out = (_held_out_by_list(videos, split_file) if split_file
                else _held_out_by_group(videos, val_fraction))
    return sorted((path, name) for path, name in videos if (path in held_out) == (split == "val"))


IN_MEMORY_BYTES = 2 ** 29  # a data set whose frames, decoded at the clip size, fit in this is kept in memory


class VideoDataset(torch.utils.data.Dataset):
    """Clips of num_frames frames at img_size x img_size from a folder of videos (class = parent folder).

    split: "train", "val" (held-out videos, never seen in training) or "all". The held-out videos:
    split_file, a list such as UCF-101's (a "test" list names them; a train list names the training
    videos, and the rest are held out), or else about val_fraction of each class's groups, chosen by a
    hash of their names (a UCF-101 group, v_<Class>_gNN, is one actor and scene: its clips stay together;
    other files are each their own group). An item is {"video": uint8 (T, S, S, 3), "n_frames": real
    frames, "label": class index}. The index may be an int, or (index, seed) from make_loader's sampler,
    which fixes the random start so a resumed run reads the same clips. Unreadable files are skipped with
    a warning when the dataset is built.
    """

    def __init__(self, root, img_size, num_frames, split="train", random_start=True, val_fraction=0.1,
                 split_file="", clip_stride=0):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, not {split!r}")
        videos = find_videos(root)
        if not videos:
            raise FileNotFoundError(f"no readable video in {root!r} (searched recursively for "
                                    f"{', '.join(VIDEO_EXTENSIONS)}); put videos in class sub-folders")
        self.class_names = sorted({name for _, name in videos})
        self.img_size, self.num_frames, self.random_start = img_size, num_frames, random_start
        self.files, self.frame_counts, unreadable = [], [], []
        chosen = _split_files(videos, split, val_fraction, split_file)
        for path, name in chosen:
            try:
                self.frame_counts.append(probe_video(path))
            except VideoReadError as e:
                warnings.warn(f"skipping unreadable video {e}")
                unreadable.append(os.path.basename(path))
                continue
            self.files.append((path, self.class_names.index(name)))
        # a data set this small (the synthetic one) is decoded once, here: afterwards a clip is a slice of it
        self.decoded = None
        if sum(self.frame_counts) * img_size ** 2 * 3 <= IN_MEMORY_BYTES:
            whole = [read_clip(path, img_size, n, start=0, n_total=n)  # each video as one clip of all its frames
                     for (path, _), n in zip(self.files, self.frame_counts)]
            self.decoded = [clip[:n_real] for clip, n_real in whole]
            self.frame_counts = [len(frames) for frames in self.decoded]
        # the items: one clip per video (random or first start), or every window of clip_stride frames
        self.clips = [(i, start) for i, n in enumerate(self.frame_counts)
                      for start in (window_starts(n, num_frames, clip_stride) if clip_stride > 0 else [None])]
        if chosen and not self.files:
            others = (f"; the other {len(videos) - len(chosen)} videos of the folder are in the other split"
                      if split != "all" else "")
            raise FileNotFoundError(
                f"no readable video in the {split!r} split of {root!r}: all {len(chosen)} videos chosen for it "
                f"failed to read (e.g. {', '.join(unreadable[:2])}; the warnings above say why){others}. Replace "
                f"or remove the unreadable files, or choose the split differently (val_fraction, split_file)")

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        index, seed = index if isinstance(index, (tuple, list)) else (index, index)
        for attempt in range(len(self.clips)):  # a file that fails now (not when probed): take the next clip
            i, start = self.clips[(index + attempt) % len(self.clips)]
            path, label = self.files[i]
            if start is None:
                start = None if self.random_start else 0
            try:
                if self.decoded is not None:
                    clip, n_frames = clip_from(self.decoded[i], self.num_frames, start, np.random.default_rng(seed))
                else:
                    clip, n_frames = read_clip(path, self.img_size, self.num_frames, start,
                                               np.random.default_rng(seed), self.frame_counts[i])
            except VideoReadError as e:
                warnings.warn(f"skipping unreadable video {e}")
                continue
            return {"video": torch.from_numpy(clip), "n_frames": torch.tensor(n_frames),
                    "label": torch.tensor(label), "video_index": torch.tensor(i), "start": torch.tensor(start or 0)}
        raise VideoReadError(f"none of the {len(self.files)} videos could be read")


def window_starts(n_total, num_frames, stride):
    """First frames of the clips that cover a video of n_total frames: every `stride` frames from 0, and one
    more ending at the video's last frame; one clip from frame 0 when the video is no longer than a clip."""
    if n_total <= num_frames:
        return [0]
    starts = list(range(0, n_total - num_frames + 1, stride))
    return starts if starts[-1] == n_total - num_frames else starts + [n_total - num_frames]


class ClipSampler(torch.utils.data.Sampler):
    """An endless, deterministic stream of (index, seed) pairs for one process.

    The global stream is one permutation of the clips per epoch (seeded by seed + epoch), one after
    another; it is cut into global batches of batch_size x world_size clips and rank r takes rows
    r * batch_size ... (r + 1) * batch_size of each. So the ranks read different clips, and together
    exactly what one process with the global batch reads. The stream can start at any position (a resumed
    run skips what it already read without decoding it), and each clip carries a seed for its random
    start, so the data of a resumed run is exactly the unbroken run's.
    """

    def __init__(self, num_items, shuffle, seed, rank, world_size, batch_size, start=0):
        self.num_items, self.shuffle, self.seed = num_items, shuffle, seed
        self.rank, self.world_size, self.batch_size, self.start = rank, world_size, batch_size, start

    def __iter__(self):
        orders = {}
        for k in itertools.count(self.start):                              # this rank's k-th clip
            batch, row = divmod(k, self.batch_size)
            position = (batch * self.world_size + self.rank) * self.batch_size + row  # in the global stream
            epoch, i = divmod(position, self.num_items)
            if epoch not in orders:
                generator = torch.Generator().manual_seed(self.seed + epoch)
                orders = {epoch: torch.randperm(self.num_items, generator=generator).tolist() if self.shuffle
                          else list(range(self.num_items))}
            index = orders[epoch][i]
            yield index, (self.seed * 1_000_003 + epoch) * 1_000_003 + index


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
    sampler = ClipSampler(len(dataset), shuffle, seed, rank, world, batch_size, start=start_step * batch_size)
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


def make_ucf_like_video(path, num_frames=175, seed=0):
    """Write a video in UCF-101's format, for read-speed measurements without a download: 320x240,
    25 fps, MPEG-4 part 2 in .avi at about its bit rate (7 s, as its clips last on average). The content:
    a synthetic clip rendered at 160x160, doubled and cropped, with a camera-like grain so the encoder
    spends the bits that real footage costs."""
    rng = np.random.default_rng(seed)
    video = repeat(_render_video(rng, "stars", num_frames, 160), "t h w c -> t (h 2) (w 2) c")[:, 40:280]
    grain = rng.integers(-6, 7, video.shape)                                # (T, 240, 320, 3)
    write_video(path, np.clip(video + grain, 0, 255).astype(np.uint8), fps=25, codec="mpeg4")
    return path


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


def random_keys(batch, n, generator, device, share=(0, 1)):
    """Uniform random keys (batch, n) for this process's rows of a global batch: share = (rank, world_size);
    all ranks draw the same world_size x batch rows and keep their own, so the draws do not depend on the
    number of processes."""
    rank, world = share
    return torch.rand(batch * world, n, device=device, generator=generator)[rank * batch:(rank + 1) * batch]


def random_flips(video, generator=None, share=(0, 1)):
    """Each clip (B, T, H, W, 3) mirrored left-right with probability 1/2 (which ones: drawn for the global
    batch, see random_keys). A mirrored clip of moving objects is as likely a clip as the original."""
    mirrored = random_keys(video.shape[0], 1, generator, video.device, share)[:, :, None, None, None] < 0.5
    return torch.where(mirrored, video.flip(3), video)


def sample_patches(video, n_frames, num_samples, patch_size, generator=None, share=(0, 1)):
    """num_samples distinct random patches per clip, only from temporal patches made of real frames
    (a temporal patch with at least one real frame counts as real when it is the clip's only one).

    video (B, T, H, W, 3), n_frames (B,) -> coords (B, N, 3) long, targets (B, N, pt*ph*pw*3).
    Random keys, +inf on padded patches, and the N smallest: uniform sampling without replacement,
    batched, with no loop over clips or patches. share: see random_keys.
    """
    gt, gh, gw = _grid_size(video, patch_size)
    grid = full_grid((gt, gh, gw), video.device)                            # (P, 3)
    keys = random_keys(video.shape[0], grid.shape[0], generator, video.device, share)  # (B, P)
    real_t = (n_frames // patch_size[0]).clamp_min(1)                      # (B,) real temporal patches
    keys = keys.masked_fill(grid[None, :, 0] >= real_t[:, None], float("inf"))
    chosen = keys.topk(num_samples, dim=1, largest=False).indices           # (B, N) real patches first
    # a clip with fewer real patches than num_samples repeats its real ones instead of taking padding
    n_real = real_t[:, None] * (gh * gw)                                    # (B, 1)
    slot = torch.arange(num_samples, device=video.device)[None]             # (1, N)
    chosen = chosen.gather(1, torch.where(slot < n_real, slot, slot % n_real))
    coords = grid[chosen]                                                   # (B, N, 3)
    return coords, gather_patches(video, coords, patch_size)


def sample_frames(video, n_frames, num_frames_k, patch_size, generator=None, share=(0, 1)):
    """Every patch of K distinct random real temporal patches ("whole frames") per clip, frame-major
    within each: coords (B, K*gh*gw, 3), targets (B, K*gh*gw, pt*ph*pw*3). A clip with fewer than K real
    temporal patches repeats its real ones, as sample_patches does."""
    gt, gh, gw = _grid_size(video, patch_size)
    keys = random_keys(video.shape[0], gt, generator, video.device, share)  # (B, gt)
    real_t = (n_frames // patch_size[0]).clamp_min(1)[:, None]             # (B, 1)
    keys = keys.masked_fill(torch.arange(gt, device=video.device)[None] >= real_t, float("inf"))
    frames = keys.topk(num_frames_k, dim=1, largest=False).indices         # (B, K) real frames first
    slot = torch.arange(num_frames_k, device=video.device)[None]           # (1, K)
    frames = frames.gather(1, torch.where(slot < real_t, slot, slot % real_t))  # (B, K)
    frame_grid = full_grid((1, gh, gw), video.device)                       # (gh*gw, 3) with t = 0
    coords = frame_grid[None, None] + torch.stack(
        [frames, torch.zeros_like(frames), torch.zeros_like(frames)], -1)[:, :, None]  # (B, K, gh*gw, 3)
    coords = rearrange(coords, "b k p d -> b (k p) d")
    return coords, gather_patches(video, coords, patch_size)


# -----------------------------------------------------------------------------
# the tokens file: triplanes of a dataset, written by tokenizer.py --encode, read by dit.py

PLANES = ("z_xy", "z_xt", "z_yt")


def save_tokens(path, planes, labels, class_names, n_frames, tokenizer_ckpt, tokenizer_config, videos=(),
                video_index=None, start=None):
    """Write the three stacked planes (N, C, ., .) with labels, class names, per-plane per-channel mean and
    std (over clips and positions), n_frames, where each clip comes from (videos: the video files;
    video_index, start (N,): a clip's video and first frame), and the tokenizer that made them. Atomic."""
    tokens = {"kind": "coordtok_tokens", "labels": labels.long(), "class_names": list(class_names),
              "n_frames": n_frames.long(), "tokenizer_ckpt": tokenizer_ckpt,
              "tokenizer_config": dict(tokenizer_config), "mean": {}, "std": {}, "videos": list(videos),
              "video_index": video_index, "start": start}
    for name, plane in zip(PLANES, planes):
        plane = plane.float()
        tokens[name] = plane
        tokens["mean"][name] = plane.mean(dim=(0, 2, 3))                    # (C,)
        # (C,): the population std, as the authors compute it
        tokens["std"][name] = plane.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)
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
    parser = argparse.ArgumentParser(description="Write the built-in synthetic video set, or prepare a copy of a "
                                                 "data set resized once for fast reading.")
    task = parser.add_mutually_exclusive_group(required=True)
    task.add_argument("--synthetic", metavar="DIR", help="folder to write the synthetic set's mp4s to")
    task.add_argument("--prepare", nargs=2, metavar=("SRC", "DST"),
                      help="write every video of SRC at --img_size to DST, same folders (then train with --data DST)")
    parser.add_argument("--codec", default="rawvideo", choices=PREPARED_FORMATS,
                        help="--prepare: rawvideo reads fastest; huffyuv takes 2.5x less disk, reads ~8x slower")
    parser.add_argument("--num_classes", type=int, default=4)
    parser.add_argument("--videos_per_class", type=int, default=48)
    parser.add_argument("--num_frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--img_size", type=int, default=128, help="--prepare: the training clips' size")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="--prepare: processes")
    args = parser.parse_args()
    if args.prepare:
        source, target = args.prepare
        begin = time.perf_counter()
        counts = prepare_videos(source, target, args.img_size, args.workers, args.codec)
        print(f"prepared {source} at {args.img_size}x{args.img_size} in {target}/ in "
              f"{time.perf_counter() - begin:.0f} s: {counts['written']} written, {counts['exists']} already "
              f"there, {counts['unreadable']} unreadable (skipped, named above)")
        return
    make_synthetic(args.synthetic, args.num_classes, args.videos_per_class, args.num_frames, args.size, args.seed)
    print(f"wrote {args.num_classes * args.videos_per_class} videos to {args.synthetic}/")


if __name__ == "__main__":
    main()
