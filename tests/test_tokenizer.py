"""CoordTok: triplane lookup, layout, padding, overfitting, LPIPS layout, presets and the CLI."""

import os
import subprocess
import sys

import pytest
import torch

import data as D
import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a model small enough to train in seconds on 2 cores: 8 frames of 16x16
MICRO = dict(num_frames=8, img_size=16, enc_patch_t=4, enc_patch_s=8, enc_width=32, enc_heads=2,
             enc_layers=1, query_layers=1, triplane_rs=8, triplane_rt=8, triplane_c=4,
             query_patch_s=4, query_patch_t=4, dec_width=32, dec_heads=2, dec_layers=1,
             dec_patch_t=1, dec_patch_s=4, decode_chunk=8)
MICRO_FLAGS = [f"--{k}={v}" for k, v in MICRO.items()] + [
    "--batch_size=2", "--num_samples=32", "--num_workers=0", "--eval_clips=2", "--log_interval=1",
    "--warmup_iters=2"]


def run_cli(*args, nproc=None, timeout=300):
    cmd = [sys.executable, os.path.join(ROOT, "tokenizer.py"), *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def micro_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    D.make_synthetic(str(root), num_classes=2, videos_per_class=3, num_frames=10, size=24, seed=1)
    return str(root)


def test_triplane_lookup_matches_hand_computed_bilinear():
    # planes whose value at (row, col) is 100*row + col: bilinear interpolation of such a plane
    # is exact, so the expected feature is 100*row + col at the fractional position
    rs, rt = 3, 5
    rows = lambda n: torch.arange(n, dtype=torch.float32)[:, None]
    cols = lambda n: torch.arange(n, dtype=torch.float32)[None, :]
    z_xy = (100 * rows(rs) + cols(rs))[None, None]                     # (1, 1, Rs, Rs)
    z_xt = (100 * rows(rt) + cols(rs))[None, None]                     # (1, 1, Rt, Rs)
    z_yt = (1000 + 100 * rows(rt) + cols(rs))[None, None]
    grid = (9, 5, 3)                                                   # gt, gh, gw patches
    coords = torch.tensor([[[0, 0, 0], [8, 4, 2], [3, 1, 1], [6, 2, 0]]])
    feats = T.lookup_triplane((z_xy, z_xt, z_yt), coords, grid)         # (1, 4, 3)
    for n, (t, y, x) in enumerate(coords[0].tolist()):
        # corner-aligned: index i of a grid of g maps to plane position i / (g - 1) * (R - 1)
        ty, yy, xx = t / 8 * (rt - 1), y / 4 * (rs - 1), x / 2 * (rs - 1)
        expected = [100 * yy + xx, 100 * ty + xx, 1000 + 100 * ty + yy]
        assert feats[0, n].tolist() == pytest.approx(expected, abs=1e-4)
    # a hand-checked value: (t=3, y=1, x=1) -> xy plane at row 0.5, col 1.0 -> 51
    assert feats[0, 2, 0].item() == pytest.approx(51.0, abs=1e-4)


class GatherModel(T.CoordTok):
    """decode() returns the true pixels of a known clip at the queried coordinates."""

    def decode(self, triplane, coords):
        return D.gather_patches(self.clip, coords, self.patch_size)


def test_decode_video_puts_every_patch_in_place():
    cfg = T.CoordTokConfig(**{**MICRO, "dec_patch_t": 2, "decode_chunk": 3})  # chunks of uneven size
    model = GatherModel(cfg)
    model.clip = torch.rand(2, 8, 16, 16, 3)
    triplane = model.encode(model.clip * 2 - 1)
    assert torch.equal(model.decode_video(triplane), model.clip)


def test_padded_frames_change_neither_encoding_nor_loss():
    torch.manual_seed(0)
    model = T.CoordTok(T.CoordTokConfig(**MICRO))
    video = torch.rand(2, 8, 16, 16, 3) * 2 - 1
    n_frames = torch.tensor([5, 8])
    other = video.clone()
    other[0, 5:] = torch.rand(3, 16, 16, 3)                            # different padding content
    z_a, z_b = model.encode(video, n_frames), model.encode(other, n_frames)
    for a, b in zip(z_a, z_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    coords, targets = D.sample_patches(video, n_frames, 40, model.patch_size, torch.Generator().manual_seed(0))
    assert (coords[0, :, 0] < 5).all()                                 # targets only from real frames
    loss_a, _ = model(video, coords, targets, n_frames)
    loss_b, _ = model(other, coords, D.gather_patches(other, coords, model.patch_size), n_frames)
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-7)


def test_tiny_model_overfits_one_real_mp4_clip(tmp_path):
    # a clip through a real mp4 file, then 300 steps of random-patch training on it alone
    path = str(tmp_path / "clip.mp4")
    D.make_synthetic(str(tmp_path / "set"), num_classes=1, videos_per_class=1, num_frames=8, size=16, seed=3)
    src = D.find_videos(str(tmp_path / "set"))[0][0]
    clip, n = D.read_clip(src, 16, 8, start=0)
    D.write_video(path, clip)
    clip, n = D.read_clip(path, 16, 8, start=0)
    assert n == 8
    video = torch.from_numpy(clip)[None].float() / 127.5 - 1           # (1, 8, 16, 16, 3)
    torch.manual_seed(0)
    model = T.CoordTok(T.CoordTokConfig(**{**MICRO, "dec_width": 64, "dec_layers": 2}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    n_frames = torch.tensor([8])
    for step in range(300):
        coords, targets = D.sample_patches(video, n_frames, 64, model.patch_size, gen)
        loss, _ = model(video, coords, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        recon = model.decode_video(model.encode(video))
    psnr = T.psnr_per_frame(recon, video).mean().item()
    assert psnr > 28, f"full-clip PSNR after overfitting {psnr:.1f} dB"


def test_psnr_per_frame_closed_form():
    target = torch.zeros(1, 2, 4, 4, 3)
    pred = target.clone()
    pred[0, 0] += 0.2                      # [-1, 1] error 0.2 -> [0, 1] error 0.1 -> PSNR 20 dB
    pred[0, 1] += 0.02                     # -> 40 dB
    assert T.psnr_per_frame(pred, target)[0].tolist() == pytest.approx([20.0, 40.0], abs=1e-4)


def published_vgg16_features():
    """Random tensors with the key names and shapes of torchvision's vgg16 features."""
    shapes, c_in, idx = {}, 3, 0
    for c in T.VGG16_CHANNELS + ("M",):
        if c == "M":
            idx += 1
            continue
        shapes[f"features.{idx}.weight"], shapes[f"features.{idx}.bias"] = (c, c_in, 3, 3), (c,)
        c_in, idx = c, idx + 2
    assert list(shapes)[-1] == "features.28.bias" and len(shapes) == 26
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in shapes.items()}


def published_lpips_lin():
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}


def test_lpips_loads_published_layout_and_is_zero_for_identical(tmp_path):
    vgg = published_vgg16_features()
    vgg["classifier.6.bias"] = torch.zeros(1000)  # other keys of the published file are ignored
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(published_lpips_lin(), tmp_path / "vgg.pth")
    lpips = T.LPIPS.from_pretrained(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    torch.testing.assert_close(lpips.features[28].weight, vgg["features.28.weight"])
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert lpips(x, x).abs().max().item() < 1e-6
    d = lpips(x, y)
    assert d.shape == (3,) and (d > 0).all()
    torch.testing.assert_close(d, lpips(y, x))
    assert not any(p.requires_grad for p in lpips.parameters())


def test_lpips_missing_weights_say_how_to_supply_them(tmp_path, micro_videos):
    with pytest.raises(T.WeightsUnavailable, match=r"vgg16-397923af.pth.*--lpips_vgg PATH"):
        T.LPIPS.from_pretrained(str(tmp_path / "missing.pth"), str(tmp_path / "missing2.pth"))
    # stage 2 stops before training and also offers to train without LPIPS
    out = run_cli(*MICRO_FLAGS, f"--data={micro_videos}", "--stage=2", "--max_iters=1", f"--out_dir={tmp_path}",
                  f"--lpips_vgg={tmp_path / 'missing.pth'}", "--num_frames_stage2=2")
    assert out.returncode != 0 and "--lpips_weight 0" in out.stderr and "Traceback" not in out.stderr


def test_stage_two_fine_tunes_whole_frames_with_lpips(tmp_path, micro_videos):
    stage1 = run_cli(*MICRO_FLAGS, f"--data={micro_videos}", "--max_iters=2", f"--out_dir={tmp_path / 's1'}")
    assert stage1.returncode == 0, stage1.stderr
    torch.save(published_vgg16_features(), tmp_path / "vgg16.pth")
    torch.save(published_lpips_lin(), tmp_path / "vgg.pth")
    stage2 = run_cli(*MICRO_FLAGS, f"--data={micro_videos}", "--stage=2", "--max_iters=2", "--num_frames_stage2=2",
                     f"--init_from={tmp_path / 's1' / 'tokenizer.pt'}", f"--out_dir={tmp_path / 's2'}",
                     f"--lpips_vgg={tmp_path / 'vgg16.pth'}", f"--lpips_lin={tmp_path / 'vgg.pth'}")
    assert stage2.returncode == 0, stage2.stderr
    s1 = torch.load(tmp_path / "s1" / "tokenizer.pt", weights_only=False)
    s2 = torch.load(tmp_path / "s2" / "tokenizer.pt", weights_only=False)
    assert s2["step"] == 2 and s2["train_config"]["stage"] == 2 and s2["model_config"] == s1["model_config"]
    assert any(not torch.equal(s1["model"][k], s2["model"][k]) for k in s1["model"])  # it trained on from stage 1
    assert all(torch.isfinite(v).all() for v in s2["model"].values())


def test_impossible_configs_name_the_flag():
    with pytest.raises(ValueError, match="--img_size 30 is not divisible by --enc_patch_s"):
        T.CoordTok(T.CoordTokConfig(**{**MICRO, "img_size": 30}))
    tc = T.TrainConfig(num_samples=10_000)
    with pytest.raises(ValueError, match="--num_samples"):
        T.validate_config(T.CoordTokConfig(**MICRO), tc)


def test_parse_config_flags_and_presets():
    cfg, tc = T.parse_config((T.CoordTokConfig, T.TrainConfig), T.PRESETS,
                             ["--preset", "large", "--batch_size=32", "--dec_layers", "2", "--resume"])
    assert cfg.num_frames == 128 and cfg.dec_layers == 2 and tc.batch_size == 32 and tc.resume is True
    assert T.lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert T.lr_at(100, 1.0, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert T.lr_at(55, 1.0, 10, 100, "cosine", 0.0) == pytest.approx(0.5)


def test_non_finite_gradient_skips_the_step_and_stops_after_too_many():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    weight.grad = torch.ones(3)
    assert T.guarded_step(optimizer, weight.grad.norm(), 0, 1, 3, "advice") == 0      # finite: stepped, count reset
    assert torch.equal(weight.detach(), torch.full((3,), 0.5)) and weight.grad is None
    weight.grad = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.warns(UserWarning, match="step 7: non-finite .* skipped \\(1 in a row\\)"):
        assert T.guarded_step(optimizer, weight.grad.norm(), 7, 0, 3, "advice") == 1
    assert torch.equal(weight.detach(), torch.full((3,), 0.5)) and weight.grad is None  # untouched, grads cleared
    weight.grad = torch.full((3,), float("inf"))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="3 non-finite steps in a row; lower it"):
        T.guarded_step(optimizer, weight.grad.norm(), 8, 2, 3, "lower it")


def test_resume_gives_the_same_parameters_as_an_unbroken_run(tmp_path, micro_videos):
    common = MICRO_FLAGS + [f"--data={micro_videos}", "--lr_decay_iters=6", "--eval_interval=100",
                            "--ckpt_interval=3"]
    full = run_cli(*common, "--max_iters=6", f"--out_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr
    part = run_cli(*common, "--max_iters=3", f"--out_dir={tmp_path / 'part'}")
    assert part.returncode == 0, part.stderr
    resumed = run_cli(*common, "--max_iters=6", "--resume", f"--out_dir={tmp_path / 'part'}")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full" / "tokenizer.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "tokenizer.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    init = T.CoordTok(T.CoordTokConfig(**MICRO)).state_dict()
    assert any(not torch.equal(init[k], a["model"][k]) for k in init)   # it did train
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)


def test_two_process_ddp_keeps_ranks_identical(tmp_path, micro_videos):
    worker = os.path.join(ROOT, "tests", "ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
           *MICRO_FLAGS, f"--data={micro_videos}", "--max_iters=4", f"--out_dir={tmp_path}", "--eval_interval=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    # the sampler hands each rank its own share of every epoch: (index, clip seed) pairs never repeat
    # across ranks, and together the ranks read every training video (2 classes x 2 after the split)
    assert r0["seen"] and r1["seen"] and r0["seen"].isdisjoint(r1["seen"])
    assert {index for index, _ in r0["seen"] | r1["seen"]} == set(range(4))
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert torch.load(tmp_path / "tokenizer.pt", weights_only=False)["step"] == 4


def test_encode_writes_a_tokens_file(tmp_path, micro_videos):
    out = run_cli(*MICRO_FLAGS, f"--data={micro_videos}", "--max_iters=2", f"--out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert "held-out full-clip PSNR" in out.stdout + out.stderr
    tokens_path = str(tmp_path / "tokens.pt")
    enc = run_cli(f"--out_dir={tmp_path}", f"--encode={tokens_path}", "--num_workers=0", "--batch_size=4")
    assert enc.returncode == 0, enc.stderr
    tokens = D.load_tokens(tokens_path)
    n = len(D.find_videos(micro_videos))
    assert tokens["z_xy"].shape == (n, 4, 8, 8) and tokens["z_xt"].shape == (n, 4, 8, 8)
    assert tokens["labels"].tolist() == sorted(tokens["labels"].tolist()) and len(tokens["class_names"]) == 2
    assert tokens["tokenizer_config"]["num_frames"] == 8
    # the stored triplanes are the model's encoding of the clips
    model, _ = T.load_tokenizer(tokens["tokenizer_ckpt"])
    clip, _ = D.read_clip(D.find_videos(micro_videos)[0][0], 16, 8, start=0)
    with torch.no_grad():
        z = model.encode(torch.from_numpy(clip)[None].float() / 127.5 - 1)
    torch.testing.assert_close(z[0][0], tokens["z_xy"][0], rtol=1e-4, atol=1e-4)


def test_wrong_or_missing_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"kind": "coordtok_dit"}, tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="not a 'coordtok_tokenizer' checkpoint"):
        T.load_tokenizer(str(tmp_path / "dit.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        T.load_tokenizer(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError):
        T.load_tokenizer(str(tmp_path / "nope.pt"))
    out = run_cli(f"--out_dir={tmp_path / 'empty'}", "--resume")
    assert out.returncode != 0 and "does not exist" in out.stderr
