"""data.py: reading and writing real video files, bad input, the split, the sampler, the patch helpers
and the tokens file."""

import hashlib
import itertools
import math
import os
import subprocess
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

import data as D
import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smooth_clip(num_frames=12, height=48, width=48, seed=0):
    """A clip with smooth colour gradients moving over time: survives lossy codecs and resizing."""
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    t = np.arange(num_frames)[:, None, None, None] / num_frames
    phase = rng.uniform(0, 6, 3)
    clip = 0.5 + 0.4 * np.sin(2 * np.pi * (xs[..., None] * 0.8 + ys[..., None] * 0.5 + t) + phase)
    return (clip * 255).astype(np.uint8)                                  # (T, H, W, 3)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / max(mse, 1e-10))


def encode(path, frames, codec, pix_fmt, fps=8, pts=None, options=None):
    """Write frames with any codec/pixel format; pts (in 1/fps-free units of 1/1000 s) makes a
    variable-frame-rate file."""
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if options:
            stream.options = options
        if pts is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_lossless_video_reads_back_bit_exact(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)  # noise: no codec hides it
    path = str(tmp_path / "clip.mkv")
    D.write_video(path, frames, lossless=True)
    clip, n = D.read_clip(path, 24, 6, start=0)
    assert n == 6 and np.array_equal(clip, frames)


@pytest.mark.parametrize("codec,extension", [("rawvideo", ".mov"), ("huffyuv", ".avi")])
def test_prepared_formats_read_back_bit_exact_without_resampling(tmp_path, codec, extension):
    # noise: any resampling or colour round trip would change it
    frames = np.random.default_rng(1).integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    path = str(tmp_path / ("clip" + extension))
    D.write_video(path, iter(frames), fps=25, codec=codec)   # frames one by one, as --prepare writes them
    clip, n = D.read_clip(path, 20, 5, start=0)
    assert n == 5 and np.array_equal(clip, frames)


def test_mp4_round_trip_matches(tmp_path):
    # 64x64: at smaller sizes the 2x2 colour subsampling of yuv420p alone costs ~5 dB on this clip
    clip = smooth_clip(num_frames=10, height=64, width=64)
    path = str(tmp_path / "clip.mp4")
    D.write_video(path, clip)
    back, n_frames = D.read_clip(path, 64, 10, start=0)
    assert back.dtype == np.uint8 and back.shape == (10, 64, 64, 3) and n_frames == 10
    assert psnr(back, clip) > 35
    # a fixed start picks the frames from there on
    later, n_later = D.read_clip(path, 64, 4, start=3)
    assert n_later == 4 and psnr(later, clip[3:7]) > 35


def test_short_videos_are_padded_and_counted(tmp_path):
    clip = smooth_clip(num_frames=5, height=64, width=64)
    path = str(tmp_path / "short.mp4")
    D.write_video(path, clip)
    back, n_frames = D.read_clip(path, 64, 8, start=0)
    assert n_frames == 5 and back.shape == (8, 64, 64, 3)
    assert psnr(back[:5], clip) > 35 and not back[5:].any()
    # a random start on a video shorter than the clip starts at its first frame
    back_random, n_random = D.read_clip(path, 64, 8, rng=np.random.default_rng(0))
    assert n_random == 5 and np.array_equal(back_random, back)


def test_random_start_is_reproducible_with_a_seeded_rng(tmp_path):
    clip = smooth_clip(num_frames=24, height=32, width=32)
    path = str(tmp_path / "long.mp4")
    D.write_video(path, clip)
    starts = set()
    for seed in range(6):
        a, _ = D.read_clip(path, 32, 4, rng=np.random.default_rng(seed))
        b, _ = D.read_clip(path, 32, 4, rng=np.random.default_rng(seed))
        assert np.array_equal(a, b)
        # which start was drawn: the source window it matches best
        starts.add(max(range(21), key=lambda s: psnr(a, clip[s:s + 4])))
    assert len(starts) > 1


@pytest.mark.parametrize("name,codec,pix_fmt,size", [
    ("gray.mp4", "libx264", "gray", (48, 48)),
    ("ten_bit.mp4", "libx264", "yuv420p10le", (48, 48)),
    ("wide.avi", "mpeg4", "yuv420p", (30, 80)),          # odd aspect ratio
    ("odd.mkv", "ffv1", "yuv444p", (37, 53)),            # odd sizes, lossless
    ("vp9.webm", "libvpx-vp9", "yuv420p", (48, 64)),
    ("mjpeg.mov", "mjpeg", "yuvj420p", (64, 48)),
])
def test_every_format_comes_out_as_the_same_rgb_clip(tmp_path, name, codec, pix_fmt, size):
    height, width = size
    source = smooth_clip(num_frames=8, height=height, width=width)
    path = str(tmp_path / name)
    encode(path, source, codec, pix_fmt)
    clip, n_frames = D.read_clip(path, 16, 8, start=0)
    assert clip.dtype == np.uint8 and clip.shape == (8, 16, 16, 3) and n_frames == 8
    # the reference: the same frames through the lossless path, resized and cropped the same way
    reference_path = str(tmp_path / ("ref_" + name + ".mkv"))
    encode(reference_path, source, "ffv1", "bgr0")
    reference, _ = D.read_clip(reference_path, 16, 8, start=0)
    if pix_fmt == "gray":  # luma only: grey RGB with the reference's brightness (BT.601 weights)
        luma = reference.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        assert (clip[..., 0] == clip[..., 1]).all() and (clip[..., 1] == clip[..., 2]).all()
        assert np.abs(clip[..., 0] - luma).mean() < 8  # lossy luma: within 3% of the range on average
    else:
        assert psnr(clip, reference) > 26


def test_variable_frame_rate_file_reads_every_frame(tmp_path):
    source = smooth_clip(num_frames=10, height=32, width=32)
    path = str(tmp_path / "vfr.mkv")
    pts = [0, 40, 70, 200, 210, 300, 420, 430, 520, 700]  # ms, irregular
    encode(path, source, "ffv1", "yuv444p", pts=pts)
    clip, n_frames = D.read_clip(path, 32, 10, start=0)
    assert n_frames == 10 and psnr(clip, source) > 30


def write_set(root, names):
    for i, name in enumerate(names):
        D.write_video(os.path.join(root, name), smooth_clip(num_frames=6, height=32, width=32, seed=i))


def test_bad_files_are_skipped_with_a_warning_naming_each(tmp_path):
    root = tmp_path / "set"
    write_set(str(root), ["a/good0.mp4", "a/good1.mp4", "b/good2.mp4"])
    (root / "a" / "corrupt.mp4").write_bytes(os.urandom(5000))
    (root / "b" / "empty.avi").write_bytes(b"")
    good = (root / "a" / "good0.mp4").read_bytes()
    (root / "b" / "truncated.mp4").write_bytes(good[:len(good) // 3])
    (root / "b" / "notes.mkv").write_text("this is a text file with a video extension")
    (root / "b" / "readme.txt").write_text("not a video extension: ignored silently")
    with pytest.warns(UserWarning) as record:
        dataset = D.VideoDataset(str(root), 16, 4, split="all")
    messages = " ".join(str(w.message) for w in record)
    for bad in ("corrupt.mp4", "empty.avi", "truncated.mp4", "notes.mkv"):
        assert bad in messages
    assert "readme.txt" not in messages
    assert sorted(os.path.basename(p) for p, _ in dataset.files) == ["good0.mp4", "good1.mp4", "good2.mp4"]
    assert dataset.class_names == ["a", "b"]
    item = dataset[2]
    assert item["video"].shape == (4, 16, 16, 3) and item["label"].item() == 1 and item["n_frames"].item() == 4


def test_a_folder_without_readable_video_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*\.mp4, \.avi, \.mkv, \.webm, \.mov"):
        D.VideoDataset(str(tmp_path / "empty"), 16, 4)
    (tmp_path / "junk" / "c").mkdir(parents=True)
    (tmp_path / "junk" / "c" / "x.mp4").write_bytes(b"\x00" * 100)
    with pytest.warns(UserWarning, match="x.mp4"), pytest.raises(FileNotFoundError, match="no readable video"):
        D.VideoDataset(str(tmp_path / "junk"), 16, 4, split="all")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.VideoDataset(str(tmp_path / "missing"), 16, 4)


def test_held_out_files_never_appear_in_training_and_stay_held_out_when_videos_are_added(tmp_path):
    root = str(tmp_path / "set")
    write_set(root, [f"{c}/{c}{i}.mp4" for c in "ab" for i in range(12)])
    train = D.VideoDataset(root, 16, 4, split="train", val_fraction=0.25)
    val = D.VideoDataset(root, 16, 4, split="val", val_fraction=0.25)
    train_files, val_files = {p for p, _ in train.files}, {p for p, _ in val.files}
    assert not train_files & val_files and len(train_files | val_files) == 24
    assert 2 <= len(val_files) <= 12 and {label for _, label in val.files} == {0, 1}
    # 20 more videos: not one video changes side (a side depends on the video's own name)
    write_set(root, [f"{c}/{c}{i}.mp4" for c in "ab" for i in range(12, 22)])
    more = {p for p, _ in D.VideoDataset(root, 16, 4, split="val", val_fraction=0.25).files}
    assert more & (train_files | val_files) == val_files and len(more) > len(val_files)
    big = D.held_out_paths([(f"c/{i}.mp4", "c") for i in range(4000)], ".", 0.25)
    assert 0.22 < len(big) / 4000 < 0.28                                  # about val_fraction of them


def test_clips_of_one_ucf_group_stay_on_one_side_of_the_split(tmp_path):
    root = str(tmp_path / "set")
    names = [f"{c}/v_{c}_g{g:02d}_c{k:02d}.avi" for c in ("Run", "Jump") for g in range(1, 7) for k in range(1, 4)]
    names += [f"other/clip{i}.mp4" for i in range(6)]                   # no group in the name: by file
    write_set(root, names)
    train = {os.path.basename(p) for p, _ in D.VideoDataset(root, 16, 4, split="train", val_fraction=0.34).files}
    val = {os.path.basename(p) for p, _ in D.VideoDataset(root, 16, 4, split="val", val_fraction=0.34).files}
    assert not train & val and len(train | val) == len(names)
    group = lambda name: name.rsplit("_c", 1)[0]
    for c in ("Run", "Jump"):
        val_groups = {group(n) for n in val if n.startswith(f"v_{c}_")}
        train_groups = {group(n) for n in train if n.startswith(f"v_{c}_")}
        assert not val_groups & train_groups                             # whole groups on one side
        assert sum(n.startswith(f"v_{c}_") for n in val) == 3 * len(val_groups)
    assert {len(val_groups) for c in ("Run", "Jump")} and any(n.startswith("clip") for n in train)


def write_list(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_split_file_names_train_or_test_videos_whatever_the_extension(tmp_path):
    root = str(tmp_path / "set")
    # the lists name .avi files (UCF-101's), the folder holds .mp4 copies: matched by folder and stem
    write_set(root, [f"{c}/v_{c}_g01_c0{k}.mp4" for c in ("Run", "Jump") for k in range(1, 4)])
    trainlist = write_list(tmp_path / "trainlist01.txt", ["Run/v_Run_g01_c01.avi 1", "Run/v_Run_g01_c02.avi 1",
                                                          "Jump/v_Jump_g01_c03.avi 2"])
    testlist = write_list(tmp_path / "testlist01.txt", ["Run/v_Run_g01_c03.avi", "Jump/v_Jump_g01_c01.avi", ""])
    names = lambda dataset: sorted(os.path.basename(p) for p, _ in dataset.files)
    listed_for_training = ["v_Jump_g01_c03.mp4", "v_Run_g01_c01.mp4", "v_Run_g01_c02.mp4"]
    assert names(D.VideoDataset(root, 16, 4, split="train", split_file=trainlist)) == listed_for_training
    assert names(D.VideoDataset(root, 16, 4, split="val", split_file=trainlist)) == [
        "v_Jump_g01_c01.mp4", "v_Jump_g01_c02.mp4", "v_Run_g01_c03.mp4"]
    # a test list names the held-out videos; the rest train
    assert names(D.VideoDataset(root, 16, 4, split="val", split_file=testlist)) == [
        "v_Jump_g01_c01.mp4", "v_Run_g01_c03.mp4"]
    assert len(D.VideoDataset(root, 16, 4, split="train", split_file=testlist)) == 4
    # entries without a video: one warning with the count and an example
    partial = write_list(tmp_path / "trainlist02.txt", ["Run/v_Run_g01_c01.avi 1", "Swim/v_Swim_g01_c01.avi 3",
                                                        "Swim/v_Swim_g01_c02.avi 3"])
    with pytest.warns(UserWarning, match=r"2 entries .*v_Swim_g01_c01\.avi"):
        assert names(D.VideoDataset(root, 16, 4, split="train", split_file=partial)) == ["v_Run_g01_c01.mp4"]
    with pytest.raises(FileNotFoundError, match="trainlist09.txt"):
        D.VideoDataset(root, 16, 4, split_file=str(tmp_path / "trainlist09.txt"))


def test_a_split_whose_files_all_fail_says_so(tmp_path):
    root = tmp_path / "set"
    write_set(str(root), ["a/good0.mp4", "a/good1.mp4"])
    (root / "a" / "broken.mp4").write_bytes(os.urandom(3000))
    testlist = write_list(tmp_path / "testlist.txt", ["a/broken.mp4"])
    with pytest.warns(UserWarning, match="broken.mp4"), pytest.raises(FileNotFoundError) as error:
        D.VideoDataset(str(root), 16, 4, split="val", split_file=testlist)
    message = str(error.value)
    assert "'val' split" in message and "all 1 videos chosen for it failed" in message and "broken.mp4" in message
    assert "other 2 videos" in message
    assert len(D.VideoDataset(str(root), 16, 4, split="train", split_file=testlist)) == 2


def test_sampler_resumes_exactly_and_splits_ranks_like_one_process():
    first = D.ClipSampler(10, shuffle=True, seed=3, rank=0, world_size=1, batch_size=4)
    stream = [next(s) for s in [iter(first)] for _ in range(35)]
    resumed = D.ClipSampler(10, shuffle=True, seed=3, rank=0, world_size=1, batch_size=4, start=17)
    assert [next(s) for s in [iter(resumed)] for _ in range(18)] == stream[17:]
    assert sorted(i for i, _ in stream[:10]) == list(range(10))       # an epoch is a permutation
    assert [i for i, _ in stream[:10]] != [i for i, _ in stream[10:20]]  # reshuffled per epoch
    # two ranks with batches of 2: rank r takes rows 2r, 2r+1 of each global batch of 4, so the ranks'
    # batches, side by side, are the batches of one process with batch 4 (across epoch ends too)
    ranks = [iter(D.ClipSampler(10, shuffle=True, seed=3, rank=r, world_size=2, batch_size=2)) for r in range(2)]
    shares = [[next(it) for _ in range(16)] for it in ranks]
    merged = [pair for b in range(8) for r in range(2) for pair in shares[r][2 * b:2 * b + 2]]
    assert merged == stream[:32]
    assert {i for i, _ in shares[0][:2] + shares[1][:2]}.isdisjoint({i for i, _ in shares[0][2:4]})


def test_loader_yields_batches_and_resumes(tmp_path):
    root = str(tmp_path / "set")
    write_set(root, [f"a/v{i}.mp4" for i in range(3)])
    dataset = D.VideoDataset(root, 16, 4, split="all", random_start=True)
    batches = D.make_loader(dataset, 2, shuffle=True, num_workers=0, seed=1)
    unbroken = [next(batches)["video"] for _ in range(4)]
    resumed = D.make_loader(dataset, 2, shuffle=True, num_workers=0, seed=1, start_step=2)
    for expected in unbroken[2:]:
        assert torch.equal(next(resumed)["video"], expected)
    one_pass = list(D.make_loader(dataset, 2, shuffle=False, num_workers=1, infinite=False))
    assert [len(b["label"]) for b in one_pass] == [2, 1]


def test_patchify_gather_and_full_grid_agree():
    video = torch.randn(2, 6, 8, 12, 3)
    patch = (2, 4, 3)
    patches = T.patchify(video, patch)                                    # (2, 3, 2, 4, 72)
    assert patches.shape == (2, 3, 2, 4, 72)
    assert torch.equal(T.unpatchify(patches, patch), video)
    # patch (t=1, y=1, x=2) is frames 2-3, rows 4-7, columns 6-8, laid out (pt ph pw c)
    assert torch.equal(patches[0, 1, 1, 2], video[0, 2:4, 4:8, 6:9].reshape(-1))
    grid = T.full_grid((3, 2, 4))
    assert grid.shape == (24, 3) and grid[:5].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]]
    assert grid[-1].tolist() == [2, 1, 3]
    gathered = T.gather_patches(video, grid.expand(2, -1, -1), patch)
    assert torch.equal(gathered, patches.reshape(2, 24, 72))


def test_sample_patches_are_distinct_real_and_match_their_pixels():
    video = torch.randn(3, 8, 8, 8, 3)
    n_frames = torch.tensor([8, 5, 1])
    patch = (2, 4, 4)
    coords, targets = T.sample_patches(video, n_frames, 8, patch, torch.Generator().manual_seed(0))
    assert coords.shape == (3, 8, 3) and targets.shape == (3, 8, 96)
    for b in range(2):
        assert len({tuple(c) for c in coords[b].tolist()}) == 8             # without replacement
    assert coords[1, :, 0].max() < 2                                       # only fully real temporal patches
    # one real frame: its temporal patch is the only one; its 4 patches are taken twice, never padding
    assert coords[2, :, 0].max() == 0 and len({tuple(c) for c in coords[2].tolist()}) == 4
    t, y, x = coords[1, 3].tolist()
    assert torch.equal(targets[1, 3], video[1, 2 * t:2 * t + 2, 4 * y:4 * y + 4, 4 * x:4 * x + 4].reshape(-1))
    again, _ = T.sample_patches(video, n_frames, 8, patch, torch.Generator().manual_seed(0))
    assert torch.equal(again, coords)


def test_sample_frames_gives_whole_distinct_real_frames():
    video = torch.randn(2, 8, 8, 8, 3)
    coords, targets = T.sample_frames(video, torch.tensor([8, 4]), 2, (1, 4, 4), torch.Generator().manual_seed(1))
    assert coords.shape == (2, 8, 3) and targets.shape == (2, 8, 48)
    for b in range(2):
        frames = coords[b].view(2, 4, 3)
        assert frames[0, 0, 0] != frames[1, 0, 0]
        for k in range(2):   # every patch of the frame, frame-major
            assert frames[k, :, 1:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
            assert (frames[k, :, 0] == frames[k, 0, 0]).all()
    assert coords[1, :, 0].max() < 4
    assert torch.equal(targets, T.gather_patches(video, coords, (1, 4, 4)))


def test_sample_frames_repeats_the_real_frames_of_a_short_clip():
    video = torch.randn(2, 8, 4, 4, 3)
    coords, targets = T.sample_frames(video, torch.tensor([8, 2]), 4, (1, 2, 2), torch.Generator().manual_seed(0))
    frames = coords.view(2, 4, 4, 3)[:, :, 0, 0]                          # (B, K) the frame of each
    assert len(set(frames[0].tolist())) == 4
    assert sorted(frames[1].tolist()) == [0, 0, 1, 1]                     # both real frames twice, no padding
    assert torch.equal(targets, T.gather_patches(video, coords, (1, 2, 2)))


def test_synthetic_set_moves_and_is_not_flat(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--synthetic", str(tmp_path / "syn"),
                          "--num_classes", "4", "--videos_per_class", "2", "--num_frames", "12", "--size", "32"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    videos = D.find_videos(str(tmp_path / "syn"))
    assert len(videos) == 8 and {c for _, c in videos} == set(D.MOTIONS)
    for path, _ in videos:
        clip, n_frames = D.read_clip(path, 32, 12, start=0)
        clip = clip.astype(np.float64)
        assert n_frames == 12
        assert clip.std(axis=(1, 2)).mean() > 15                          # not a single colour
        assert np.abs(np.diff(clip, axis=0)).mean() > 2                   # not static


def test_tokens_file_round_trip_and_errors(tmp_path):
    planes = (torch.randn(5, 4, 8, 8) * 2 + 1, torch.randn(5, 4, 6, 8), torch.randn(5, 4, 6, 8))
    path = str(tmp_path / "tokens.pt")
    clips = {**dict(zip(D.PLANES, planes)), "label": torch.arange(5) % 2, "n_frames": torch.full((5,), 16),
             "video_index": torch.arange(5), "start": torch.zeros(5)}
    D.save_tokens(path, clips, ["a", "b"], "ckpt.pt", {"num_frames": 16}, "f00d", ["a/x.mp4"])
    tokens = D.load_tokens(path)
    assert tokens["kind"] == "coordtok_tokens" and tokens["class_names"] == ["a", "b"]
    assert torch.equal(tokens["z_xy"], planes[0]) and tokens["tokenizer_config"] == {"num_frames": 16}
    assert tokens["tokenizer_fingerprint"] == "f00d"
    torch.testing.assert_close(tokens["mean"]["z_xy"], planes[0].mean(dim=(0, 2, 3)))
    torch.testing.assert_close(tokens["std"]["z_yt"], planes[2].std(dim=(0, 2, 3), unbiased=False))
    assert os.listdir(tmp_path) == ["tokens.pt"]
    with pytest.raises(FileNotFoundError, match="--encode"):
        D.load_tokens(str(tmp_path / "missing.pt"))
    torch.save({"kind": "coordtok_tokenizer"}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="not a tokens file"):
        D.load_tokens(str(tmp_path / "ckpt.pt"))


def test_prepared_copy_holds_the_clips_read_from_its_source(tmp_path):
    source, target = tmp_path / "src", tmp_path / "dst"
    (source / "wide").mkdir(parents=True)
    encode(str(source / "wide" / "wide.avi"), smooth_clip(12, 30, 80), "mpeg4", "yuv420p")  # odd aspect ratio
    D.write_video(str(source / "tall" / "tall.mp4"), smooth_clip(12, 70, 36, seed=1))
    D.write_video(str(source / "tall" / "short.mp4"), smooth_clip(3, 40, 40, seed=2))    # shorter than a clip
    (source / "tall" / "broken.mp4").write_bytes(os.urandom(2000))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--prepare", str(source), str(target),
                          "--img_size", "16", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "broken.mp4" in out.stderr and "3 written, 0 already there, 1 unreadable" in out.stdout
    copies = {"wide/wide.mov": "wide/wide.avi", "tall/tall.mov": "tall/tall.mp4", "tall/short.mov": "tall/short.mp4"}
    assert sorted(os.path.relpath(p, target) for p, _ in D.find_videos(str(target))) == sorted(copies)
    for copy_name, source_name in copies.items():
        for start, num_frames in ((0, 8), (3, 8), (0, 12)):
            if start >= D.probe_video(str(source / source_name))["n_frames"]:
                continue  # no clip starts there
            copy, n_copy = D.read_clip(str(target / copy_name), 16, num_frames, start=start)
            clip, n_clip = D.read_clip(str(source / source_name), 16, num_frames, start=start)
            assert n_copy == n_clip and np.array_equal(copy, clip)
    assert D.probe_video(str(target / "tall" / "short.mov"))["n_frames"] == 3

    # a re-run writes only what is missing and leaves no temporary file
    os.remove(target / "wide" / "wide.mov")
    kept = os.path.getmtime(target / "tall" / "tall.mov")
    with pytest.warns(UserWarning, match="broken.mp4"):
        counts = D.prepare_videos(str(source), str(target), 16)
    assert counts == {"written": 1, "exists": 2, "unreadable": 1}
    assert os.path.getmtime(target / "tall" / "tall.mov") == kept
    assert sorted(os.listdir(target / "wide")) == ["wide.mov"]


def test_a_prepare_that_fails_mid_write_leaves_no_file(tmp_path, monkeypatch):
    D.write_video(str(tmp_path / "src" / "a" / "v.mp4"), smooth_clip(6, 32, 32))
    frames_from, seen_mid_write = D.frames_from, []

    def two_frames_then_a_full_disk(*args, **kwargs):
        yield from itertools.islice(frames_from(*args, **kwargs), 2)
        seen_mid_write.append(D.find_videos(str(tmp_path / "dst")))   # what a kill now would leave
        raise OSError("No space left on device")

    monkeypatch.setattr(D, "frames_from", two_frames_then_a_full_disk)
    with pytest.raises(OSError, match="No space left"):
        D.prepare_videos(str(tmp_path / "src"), str(tmp_path / "dst"), 16)
    assert seen_mid_write == [[]]                                        # the partial file is not a video yet
    assert os.listdir(tmp_path / "dst" / "a") == []                     # and an error removes it


def test_read_speed_of_a_ucf_like_video(tmp_path):
    path = D.make_ucf_like_video(str(tmp_path / "v_Run_g01_c01.avi"), num_frames=12)
    with av.open(path) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.width, stream.height, stream.average_rate) == ("mpeg4", 320, 240, 25)
    clip, _ = D.read_clip(path, 32, 12, start=0)
    assert np.abs(np.diff(clip.astype(np.float64), axis=0)).mean() > 1      # it moves
    speed = D.measure_read_speed(path, 32, 4, clips=3)
    at = speed.pop("seconds_per_clip")
    assert list(at) == ["start", "middle", "end"] and all(np.isfinite(v) and v > 0 for v in [*speed.values(), *at.values()])
    assert speed["frames_per_s"] == pytest.approx(4 * speed["clips_per_s"])  # clips of 4 real frames


def test_a_small_data_set_is_decoded_once_and_gives_the_same_clips(tmp_path, monkeypatch):
    root = str(tmp_path / "set")
    write_set(root, ["a/v0.mp4", "a/v1.mp4", "b/v2.mp4"])
    kept = D.VideoDataset(root, 16, 4, split="all", random_start=True)
    assert kept.decoded == {}                                          # decoded when first read, once
    kept[1], kept[1]
    assert list(kept.decoded) == [1] and len(kept.decoded[1]) == kept.info[1]["n_frames"]
    monkeypatch.setattr(D, "IN_MEMORY_BYTES", 0)                      # too big to keep: read from the files
    read = D.VideoDataset(root, 16, 4, split="all", random_start=True)
    assert read.decoded is None
    for index in [(0, 11), (1, 12), (2, 13), 2]:                       # random starts, seeded alike
        a, b = kept[index], read[index]
        assert torch.equal(a["video"], b["video"]) and a["n_frames"] == b["n_frames"]
    long = D.VideoDataset(root, 16, 100, split="all", random_start=False)  # longer than the videos: padded
    n = long.info[0]["n_frames"]
    assert long[0]["n_frames"] == n and not long[0]["video"][n:].any()


def test_random_flips_mirror_about_half_of_the_clips_and_nothing_else():
    video = torch.rand(400, 2, 3, 5, 3)
    flipped = T.random_flips(video, torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(f, v.flip(2)) for f, v in zip(flipped, video)])
    kept = torch.tensor([torch.equal(f, v) for f, v in zip(flipped, video)])
    assert (mirrored ^ kept).all() and 160 < mirrored.sum() < 240
    # two processes with half the batch each mirror the clips one process mirrors
    halves = [T.random_flips(video[r * 200:(r + 1) * 200], torch.Generator().manual_seed(0), (r, 2)) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), flipped)


# -----------------------------------------------------------------------------
# long videos, wrong headers, rotation, frame shapes, nested classes


def numbered_clip(num_frames, height=32, width=48):
    """Frames that tell their index: a grey level of 4 x index in the top-left block over a smooth clip."""
    clip = smooth_clip(num_frames, height, width)
    for i in range(num_frames):
        clip[i, :16, :16] = 4 * i % 256
    return clip


SEEKABLE_FORMATS = [  # the format matrix, with keyframes every 8 frames where the codec has them
    ("h264.mp4", "libx264", "yuv420p", {"g": "8", "bf": "2"}),
    ("ten_bit.mp4", "libx264", "yuv420p10le", {"g": "8"}),
    ("mpeg4.avi", "mpeg4", "yuv420p", {"g": "8"}),
    ("ffv1.mkv", "ffv1", "yuv444p", {"g": "8"}),
    ("vp9.webm", "libvpx-vp9", "yuv420p", {"g": "8"}),
    ("mjpeg.mov", "mjpeg", "yuvj420p", None),
    ("raw.mov", "rawvideo", "rgb24", None),
    ("huffyuv.avi", "huffyuv", "rgb24", None),
]


@pytest.mark.parametrize("name,codec,pix_fmt,options", SEEKABLE_FORMATS)
def test_a_seek_gives_exactly_the_frames_of_a_sequential_read(tmp_path, name, codec, pix_fmt, options):
    path = str(tmp_path / name)
    encode(path, numbered_clip(40), codec, pix_fmt, options=options)
    info = D.probe_video(path)
    assert info["n_frames"] == 40
    sequential = np.stack(list(D.frames_from(path, (16, 24))))               # from frame 0, no seek
    assert len(sequential) == 40
    for start in (1, 7, 8, 9, 15, 23, 31, 32, 36, 39):
        clip, n = D.read_clip(path, (16, 24), 8, start, info=info)
        assert n == min(8, 40 - start) and np.array_equal(clip[:n], sequential[start:start + n]), start
    windows = list(D.iter_windows(path, (16, 24), 16, 12, info))          # one pass over the video
    assert [s for s, _, _ in windows] == [0, 12, 24]
    for start, clip, n in windows:
        assert n == 16 and np.array_equal(clip, sequential[start:start + 16])


def test_reading_goes_on_past_a_damaged_packet_and_keeps_every_frame_in_place(tmp_path):
    noise = np.random.default_rng(0).integers(-20, 20, (40, 48, 48, 3))  # a frame shifted matches nowhere
    path = str(tmp_path / "src" / "a" / "bikes.mp4")
    D.write_video(path, np.clip(numbered_clip(40, 48, 48) + noise, 0, 255).astype(np.uint8))
    damaged = bytearray(open(path, "rb").read())
    middle = len(damaged) // 2
    damaged[middle:middle + 2048] = bytes(b ^ 0xFF for b in damaged[middle:middle + 2048])
    open(path, "wb").write(damaged)
    info = D.probe_video(path)
    with pytest.warns(UserWarning, match=r"bikes.mp4: \d+ frames \(\d+ to \d+\) do not decode"):
        assert len(list(D.frames_from(path, 16, 0, info))) == 40
        windows = list(D.iter_windows(path, 16, 8, 8, info))
        assert [(s, n) for s, _, n in windows] == [(s, 8) for s in range(0, 33, 8)]
        D.prepare_videos(str(tmp_path / "src"), str(tmp_path / "dst"), 16)
    copy = str(tmp_path / "dst" / "a" / "bikes.mov")
    assert D.probe_video(copy)["n_frames"] == 40
    for start in range(0, 40, 3):  # frame i of the copy is frame i of a seeking read (concealed
        clip, n = D.read_clip(path, 16, 8, start, info=info)  # damage may differ a little)
        copied, n_copied = D.read_clip(copy, 16, 8, start)
        assert n == n_copied == min(8, 40 - start) and np.mean(clip == copied) > 0.8, start


def test_every_window_is_read_in_one_pass(tmp_path, monkeypatch):
    path = str(tmp_path / "long.mp4")
    D.write_video(path, numbered_clip(100, 16, 16))
    converted, to_rgb = [], D.to_rgb
    monkeypatch.setattr(D, "to_rgb", lambda *a: converted.append(1) or to_rgb(*a))
    windows = list(D.iter_windows(path, 16, 8, 8))
    assert [s for s, _, _ in windows] == list(range(0, 93, 8)) + [92]
    assert len(converted) == 100                                             # each frame once


def test_frames_are_counted_not_taken_from_the_header(tmp_path):
    # a WebM written live has no duration in its header
    path = str(tmp_path / "live.webm")
    with av.open(path, "w", format="webm", options={"live": "1"}) as container:
        stream = container.add_stream("libvpx-vp9", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for image in numbered_clip(64, 24, 32):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    with av.open(path) as container:
        assert not container.streams.video[0].frames and container.duration is None
    assert D.probe_video(path)["n_frames"] == 64
    assert D.VideoDataset(str(tmp_path), 16, 64, "all")[0]["n_frames"] == 64
    # a variable-frame-rate file: 20 frames over 10 s, which a duration times a mean rate overstates
    vfr = str(tmp_path / "vfr" / "vfr.mkv")
    os.makedirs(os.path.dirname(vfr))
    encode(vfr, numbered_clip(20, 24, 32), "ffv1", "yuv444p", pts=[0, 40] + [500 * k for k in range(1, 19)])
    assert D.probe_video(vfr)["n_frames"] == 20
    assert [s for s, _, _ in D.iter_windows(vfr, 16, 8, 8)] == [0, 8, 12]
    # a header that says more frames than the stream holds: warned, and no window starts beyond it
    truncated = str(tmp_path / "cut.avi")
    D.write_video(truncated, numbered_clip(30, 24, 32), codec="mpeg4")
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[:len(data) * 2 // 3])
    with pytest.warns(UserWarning, match="the header says 30 frames, the stream holds"):
        info = D.probe_video(truncated)
    starts = [s for s, _, n in D.iter_windows(truncated, 16, 8, 8, info)]
    assert max(starts) < info["n_frames"] < 30


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_videos_are_read_upright(tmp_path, degrees):
    upright = numbered_clip(4, 40, 24)                                       # a portrait clip
    stored = np.ascontiguousarray(np.rot90(upright, -degrees // 90, axes=(1, 2)))  # as a phone stores it
    path = str(tmp_path / "phone.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = stored.shape[2], stored.shape[1], "yuv444p"
        stream.set_display_rotation(degrees)
        for image in stored:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    clip, _ = D.read_clip(path, (40, 24), 4, 0)
    assert psnr(clip, upright) > 35


def test_frames_of_any_shape_are_scaled_to_cover_and_centre_cropped(tmp_path):
    wide = np.zeros((2, 64, 128, 3), np.uint8)                               # 2:1, red left, blue right
    wide[:, :, :64, 0], wide[:, :, 64:, 2] = 200, 200
    wide[:, :, 60:68] = 255                                                   # a white stripe at the centre
    path = str(tmp_path / "wide.mkv")
    D.write_video(path, wide, lossless=True)
    same, _ = D.read_clip(path, (32, 64), 2, 0)                              # the model's aspect: all of it
    assert same[0, :, :28, 0].min() > 150 and same[0, :, 36:, 2].min() > 150 and same[0, :, 31:33].min() > 200
    square, _ = D.read_clip(path, (32, 32), 2, 0)                            # a square model: the centre
    assert square[0, :, 14:18].min() > 200 and square[0, :, :10, 0].min() > 150 and square[0, :, 22:, 2].min() > 150
    tall, _ = D.read_clip(path, (48, 16), 2, 0)                              # scaled to cover 48 rows
    assert tall.shape == (2, 48, 16, 3) and tall[0, :, 5:11].min() > 200


def test_the_class_is_the_folder_below_the_data_folder(tmp_path):
    write_set(str(tmp_path), ["a/clips/x.mp4", "b/clips/y.mp4", "b/z.mp4", "top.mp4"])
    assert [c for _, c in D.find_videos(str(tmp_path))] == ["a/clips", "b/clips", "b", tmp_path.name]


def test_unreadable_folders_are_skipped_with_a_warning(tmp_path, monkeypatch):
    write_set(str(tmp_path), ["a/x.mp4", "secret/y.mp4"])
    scandir = os.scandir

    def refuse(path):
        if os.path.basename(path) == "secret":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    with pytest.warns(UserWarning, match="skipping unreadable folder .*secret"):
        assert [c for _, c in D.find_videos(str(tmp_path))] == ["a"]


def test_linked_folders_are_followed_once_and_what_is_not_a_file_is_left_out(tmp_path):
    root, elsewhere = tmp_path / "set", tmp_path / "elsewhere"
    write_set(str(root), ["a/x.mp4"])
    write_set(str(elsewhere), ["b/y.mp4"])
    os.symlink(elsewhere / "b", root / "b")                                  # a linked class folder
    os.symlink(elsewhere / "b", root / "b_again")                            # the same folder twice
    os.symlink(root, root / "a" / "loop")                                    # a loop
    os.mkfifo(root / "a" / "pipe.mp4")                                      # reading it would wait forever
    videos = [(os.path.relpath(p, root), c) for p, c in D.find_videos(str(root))]
    assert videos == [("a/x.mp4", "a"), ("b/y.mp4", "b")]
    assert len(D.VideoDataset(str(root), 16, 4, split="all")) == 2


def test_the_split_of_a_flat_folder_does_not_depend_on_the_folder_s_name(tmp_path):
    write_set(str(tmp_path / "my_videos"), [f"v{i}.mp4" for i in range(12)])
    held_out = lambda root: sorted(os.path.basename(p) for p, _ in D.VideoDataset(
        str(tmp_path / root), 16, 4, split="val", val_fraction=0.5).files)
    before = held_out("my_videos")
    os.rename(tmp_path / "my_videos", tmp_path / "renamed")
    assert held_out("renamed") == before and 0 < len(before) < 12
    # files in class folders keep the hash of "class/stem", the split the synthetic set and UCF-101 had
    videos = [(f"/data/{c}/{c}_{i:03d}.mp4", c) for c in ("discs", "squares") for i in range(40)]
    fraction = lambda key: int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
    by_name = {p for p, c in videos if fraction(f"{c}/{os.path.basename(p)[:-4]}") < 0.1}
    assert D.held_out_paths(videos, "/data", 0.1) == by_name and by_name


def test_many_unreadable_files_are_a_few_warnings_and_a_count(tmp_path):
    for i in range(40):
        (tmp_path / f"empty{i:02d}.mp4").write_bytes(b"")
    with pytest.warns(UserWarning) as record, pytest.raises(FileNotFoundError, match="no readable video"):
        D.VideoDataset(str(tmp_path), 16, 4, split="all")
    messages = [str(w.message) for w in record]
    assert len(messages) == 6 and "empty00.mp4" in messages[0] and "35 more unreadable videos" in messages[-1]


def test_a_tokens_file_is_checked_field_by_field(tmp_path):
    planes = (torch.randn(4, 2, 4, 4), torch.randn(4, 2, 6, 4), torch.randn(4, 2, 6, 4))
    clips = {**dict(zip(D.PLANES, planes)), "label": torch.tensor([0, 1, 0, 1]),
             "n_frames": torch.full((4,), 8), "video_index": torch.arange(4), "start": torch.zeros(4)}
    path = str(tmp_path / "tokens.pt")
    D.save_tokens(path, clips, ["a", "b"], "ckpt.pt", {}, "f00d", [])
    good = torch.load(path, weights_only=False)
    damages = {"labels out of range": ({"labels": torch.tensor([0, 1, 2, 1])}, r"labels are not in \[0, 2\)"),
               "fewer labels": ({"labels": torch.tensor([0, 1])}, "z_xy holds 4 clips, not 2"),
               "clip counts differ": ({"start": torch.zeros(3)}, "start holds 3 clips, not 4"),
               "a NaN std": ({"std": {**good["std"], "z_xt": torch.tensor([1.0, float("nan")])}}, "std of z_xt"),
               "a zero std": ({"std": {**good["std"], "z_yt": torch.zeros(2)}}, "std of z_yt is not positive"),
               "no planes": ({"z_xy": None}, "missing or malformed")}
    for what, (change, message) in damages.items():
        torch.save({**good, **change}, path)
        with pytest.raises(ValueError, match=message):
            D.load_tokens(path)


def test_planes_image_shows_each_plane_s_principal_components_side_by_side():
    ramp = torch.zeros(4, 2, 5)
    ramp[3] = torch.arange(5.0)                            # the texels differ along the columns, in one channel
    tall = torch.randn(4, 6, 3)
    image = D.planes_image([ramp, tall], zoom=2)
    assert image.shape == (12, 2 * 5 + 4 + 2 * 3 + 4, 3) and image.dtype == np.uint8
    first = image[:4, :10, 0].astype(int)                  # the first component, zoomed: one value per column pair
    assert sorted({first[0, 0], first[0, -1]}) == [0, 255] and (np.diff(first[0]) * np.sign(first[0, -1] - 128) >= 0).all()
    assert (image[4:, :10] == 255).all()                   # under the shorter plane: white


def test_the_synthetic_set_has_the_spectrum_of_photographs_and_a_camera_per_class(tmp_path):
    def amplitude_slope(image):  # the log-log slope of the radially averaged amplitude spectrum
        spectrum = np.abs(np.fft.fftshift(np.fft.fft2(image - image.mean())))
        y, x = np.indices(image.shape) - np.array(image.shape)[:, None, None] // 2
        radius = np.hypot(y, x).astype(int)
        f = np.arange(2, image.shape[0] // 2)
        mean = np.bincount(radius.ravel(), spectrum.ravel())[f] / np.bincount(radius.ravel())[f]
        return np.polyfit(np.log(f), np.log(mean), 1)[0]

    rng = np.random.default_rng(0)
    assert amplitude_slope(D.pink_noise(rng, (), 128)) == pytest.approx(-1.0, abs=0.1)
    frames = [D.render_video(rng, m, 8, 128)[0].mean(-1) for m in D.MOTIONS for _ in range(2)]
    assert -1.8 < np.mean([amplitude_slope(f) for f in frames]) < -0.8      # photographs: about -1
    still, zoom, pan, handheld = (D.camera_path(rng, m, 64) for m in D.MOTIONS)
    assert not still[0].any() and (still[1] == 1).all()
    assert (zoom[1].diff().sign() == zoom[1].diff()[0].sign()).all() and abs(zoom[1][-1] / zoom[1][0] - 1) > 0.2
    assert torch.allclose(pan[0].diff(dim=0), pan[0][1] - pan[0][0], atol=1e-6) and pan[0].diff(dim=0).norm(dim=1)[0] > 0
    assert 0 < handheld[0].abs().max() < 0.1 and (pan[1] == 1).all()
    # the old set's classes in data/synthetic: an error that says to delete it, not a silent mix
    D.write_video(str(tmp_path / "discs" / "discs_000.mp4"), np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="another synthetic set.*delete it"):
        D.ensure_synthetic(str(tmp_path))


def test_a_photograph_is_filmed_by_the_same_camera(tmp_path):
    from skimage import data as photographs
    image = photographs.astronaut()                                          # (512, 512, 3)
    video = D.moving_photo(image, num_frames=16, size=32, seed=3)
    assert video.shape == (16, 32, 32, 3) and video.dtype == np.uint8
    assert np.abs(video[0].astype(int) - video[-1]).mean() > 5               # it moves
    # half way the camera is at the centre, unzoomed: the middle third of the photograph
    middle = torch.from_numpy(image[171:341, 171:341]).permute(2, 0, 1)[None].float()
    expected = torch.nn.functional.interpolate(middle, size=(32, 32), mode="area")[0].permute(1, 2, 0)
    mse = ((torch.from_numpy(video[8]).float() - expected) ** 2).mean()
    assert 10 * math.log10(255 ** 2 / mse) > 25
