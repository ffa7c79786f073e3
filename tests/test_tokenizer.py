"""CoordTok: triplane lookup, decoding, padding, overfitting, the training loop's guards, resume, DDP, the
tokens file, and the errors a user meets at the command line."""

import fcntl
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import data as D
import harness as H
import metrics as M
import tokenizer as T
from conftest import ENV, MICRO, MICRO_TRAIN_FLAGS, ROOT, run_script


def run_cli(*args, **kwargs):
    return run_script("tokenizer.py", *args, **kwargs)


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


def test_triplane_lookup_is_fp32_under_bf16_autocast():
    # the paper's time axis: 128 temporal patches onto Rt = 32 texels; bf16 coordinates would land up to
    # 0.06 texel off, so the lookup must ignore autocast and read bf16 planes in fp32
    gen = torch.Generator().manual_seed(0)
    planes = tuple(torch.randn(2, 8, r, 16, generator=gen).bfloat16() for r in (16, 32, 32))
    coords = torch.stack([torch.randint(0, g, (2, 500), generator=gen) for g in (128, 16, 16)], dim=-1)
    exact = T.lookup_triplane(tuple(z.float() for z in planes), coords, (128, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = T.lookup_triplane(planes, coords, (128, 16, 16))
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=0, atol=1e-6)


class GatherModel(T.CoordTok):
    """decode() returns the true pixels of a known clip at the queried coordinates."""

    def decode(self, triplane, coords):
        return T.gather_patches(self.clip, coords, self.patch_size)


def test_decode_video_and_decode_frames_put_every_patch_in_place():
    cfg = T.CoordTokConfig(**{**MICRO, "dec_patch_t": 2, "decode_chunk": 3})  # chunks of uneven size
    model = GatherModel(cfg)
    model.clip = torch.rand(2, 8, 16, 16, 3)
    triplane = model.encode(model.clip * 2 - 1)
    assert torch.equal(model.decode_video(triplane), model.clip)
    frames = [5, 0, 7, 6, 2]                                           # any order, frames of shared patches
    assert torch.equal(model.decode_frames(triplane, frames), model.clip[:, frames])


def test_decode_frames_decodes_only_the_patches_of_the_frames_asked_for():
    torch.manual_seed(0)
    model = T.CoordTok(T.CoordTokConfig(**{**MICRO, "decode_chunk": 1})).eval()  # one frame per decoder call
    triplane = model.encode(torch.rand(1, 8, 16, 16, 3) * 2 - 1)
    calls = []
    decode = model.decode
    model.decode = lambda z, coords: calls.append(coords) or decode(z, coords)
    frames = model.decode_frames(triplane, [6, 3])
    assert sorted(c[0, 0, 0].item() for c in calls) == [3, 6] and all(c.shape[1] == 16 for c in calls)
    calls.clear()
    torch.testing.assert_close(frames, model.decode_video(triplane)[:, [6, 3]])
    assert len(calls) == 8


def test_padding_is_invisible_to_the_encoder():
    # what only padded tokens carry (their positions in the ViT and for the queries, the padded frames)
    # must not reach the code of a short clip; the unpadded clip is not affected by the mask either
    torch.manual_seed(0)
    model = T.CoordTok(T.CoordTokConfig(**MICRO)).eval()                # 2 temporal encoder patches of 4 frames
    video = torch.rand(2, 8, 16, 16, 3) * 2 - 1
    n_frames = torch.tensor([3, 8])                                     # clip 0: only its first patch is real
    with torch.no_grad():
        before = model.encode(video, n_frames)
        padded = model.real_video_tokens(n_frames)[0].logical_not()     # (Nv,) tokens of clip 0 made of padding
        assert padded.sum() == 4
        model.enc_pos[0, padded] += torch.randn(int(padded.sum()), 32)
        model.cross_pos[0, padded] += torch.randn(int(padded.sum()), 32)
        other = video.clone()
        other[0, 3:] = torch.rand(5, 16, 16, 3)
        after = model.encode(other, n_frames)
    for a, b in zip(before, after):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)       # the short clip: unchanged
        assert not torch.allclose(a[1], b[1])                           # the full clip sees its changed positions
    coords, _ = T.sample_patches(video, n_frames, 40, model.patch_size, torch.Generator().manual_seed(0))
    assert (coords[0, :, 0] < 3).all()                                  # targets only from real frames


def test_tiny_model_overfits_one_real_mp4_clip(tmp_path):
    # a clip through a real mp4 file, then 300 steps of random-patch training on it alone
    path = str(tmp_path / "clip.mp4")
    D.make_synthetic(str(tmp_path / "set"), num_classes=1, videos_per_class=1, num_frames=8, size=16, seed=3)
    src = D.find_videos(str(tmp_path / "set"))[0][0]
    clip, n = D.read_clip(src, 16, 8, start=0)
    D.write_video(path, clip)
    clip, n = D.read_clip(path, 16, 8, start=0)
    assert n == 8
    video = D.from_uint8(torch.from_numpy(clip)[None])                  # (1, 8, 16, 16, 3)
    torch.manual_seed(0)
    model = T.CoordTok(T.CoordTokConfig(**{**MICRO, "dec_width": 64, "dec_layers": 2}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    n_frames = torch.tensor([8])
    for step in range(300):
        coords, targets = T.sample_patches(video, n_frames, 64, model.patch_size, gen)
        loss = T.reconstruction_loss(model(video, coords), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        recon = model.decode_video(model.encode(video))
    psnr = M.psnr_per_frame(recon, video).mean().item()
    assert psnr > 28, f"full-clip PSNR after overfitting {psnr:.1f} dB"


def test_psnr_per_frame_closed_form():
    target = torch.zeros(1, 2, 4, 4, 3)
    pred = target.clone()
    pred[0, 0] += 0.2                      # [-1, 1] error 0.2 -> [0, 1] error 0.1 -> PSNR 20 dB
    pred[0, 1] += 0.02                     # -> 40 dB
    assert M.psnr_per_frame(pred, target)[0].tolist() == pytest.approx([20.0, 40.0], abs=1e-4)


def test_weight_decay_falls_on_linear_and_conv_weights_only():
    model = T.CoordTok(T.CoordTokConfig(**MICRO))
    optimizer = torch.optim.AdamW(H.decay_groups(model, 0.1))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decayed} == {n for n, p in model.named_parameters()
                                           if n.endswith(".weight") and p.dim() >= 2 and "norm" not in n}
    for name in ("enc_pos", "cross_pos", "dec_pos", "cls_token", "plane_xy", "ln_dec.weight", "to_pixels.bias"):
        assert id(dict(model.named_parameters())[name]) not in decayed, name
    for name in ("patch_embed.weight", "query_embed_xt.weight", "dec_blocks.0.attn.qkv.weight", "to_pixels.weight"):
        assert id(dict(model.named_parameters())[name]) in decayed, name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_config_holes_are_clear_errors_naming_the_flag(tmp_path, micro_videos, capsys):
    cases = [(["--enc_heads=0"], "--enc_heads must be >= 1"), (["--dec_patch_s=0"], "--dec_patch_s must be >= 1"),
             (["--img_size=30"], "--img_size 30 is not divisible by --enc_patch_s"),
             (["--num_samples=10000"], "--num_samples"), (["--max_iters=0"], "--max_iters must be >= 1"),
             (["--max_iters=-3"], "--max_iters must be >= 1"), (["--log_interval=0"], "--log_interval must be >= 1"),
             (["--ckpt_interval=0"], "--ckpt_interval"), (["--eval_interval=0"], "--eval_interval"),
             (["--device=tpu"], "--device 'tpu' is not one of"), (["--stage=3"], "--stage 3 is not one of 1, 2"),
             (["--lr_schedule=linear"], "--lr_schedule 'linear' is not one of constant, cosine"),
             (["--compile=maybe"], "--compile 'maybe' is not one of"), (["--val_fraction=1"], r"--val_fraction must be in \[0, 1\)"),
             (["--stage=2"], "--stage 2 fine-tunes a trained tokenizer: pass --init_from")]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=message):
            T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", f"--out_dir={tmp_path / 'out'}", *flags])
    assert not (tmp_path / "out" / "tokenizer.pt").exists()                # and nothing claimed to be saved
    with pytest.raises(SystemExit):                                         # no abbreviations of flags
        T.main(["--max_it=5"])
    assert "unrecognized arguments: --max_it=5" in capsys.readouterr().err


def test_lpips_weights_missing_or_of_another_layout_are_clear_errors(tmp_path, micro_videos, lpips_files):
    from metrics import LPIPS
    with pytest.raises(H.WeightsUnavailable, match=r"missing.pth does not exist.*vgg16-397923af.pth.*--lpips_vgg"):
        LPIPS.from_pretrained(str(tmp_path / "missing.pth"), str(tmp_path / "missing2.pth"))
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(H.WeightsUnavailable, match=r"--lpips_vgg.*features.0.weight missing or reshaped"):
        LPIPS.from_pretrained(str(tmp_path / "wrong.pth"), lpips_files["lin"])
    # stage 2 stops before training and also offers to train without LPIPS
    T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=1", f"--out_dir={tmp_path / 's1'}"])
    with pytest.raises(SystemExit, match="--lpips_weight 0"):
        T.main([f"--data={micro_videos}", "--stage=2", "--max_iters=1", f"--out_dir={tmp_path / 's2'}",
                f"--init_from={tmp_path / 's1' / 'tokenizer.pt'}", f"--lpips_vgg={tmp_path / 'wrong.pth'}",
                "--num_frames_stage2=2"])


def test_stage_two_fine_tunes_whole_frames_with_lpips_and_resumes_as_stage_two(tmp_path, micro_videos, lpips_files):
    T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=2", f"--out_dir={tmp_path / 's1'}"])
    T.main(["--stage=2", "--max_iters=2", "--num_frames_stage2=2", "--batch_size=2", "--num_workers=0",
            f"--init_from={tmp_path / 's1' / 'tokenizer.pt'}", f"--out_dir={tmp_path / 's2'}",
            f"--lpips_vgg={lpips_files['vgg']}", f"--lpips_lin={lpips_files['lin']}"])
    s1 = torch.load(tmp_path / "s1" / "tokenizer.pt", weights_only=False)
    s2 = torch.load(tmp_path / "s2" / "tokenizer.pt", weights_only=False)
    assert s2["step"] == 2 and s2["train_config"]["stage"] == 2 and s2["model_config"] == s1["model_config"]
    assert s2["train_config"]["data"] == s1["train_config"]["data"]  # stage 1's data and split, not the synthetic set
    assert any(not torch.equal(s1["model"][k], s2["model"][k]) for k in s1["model"])  # it trained on from stage 1
    assert all(torch.isfinite(v).all() for v in s2["model"].values())
    # resumed with no flag but the new length: still stage 2, with its LPIPS files and data
    T.main(["--resume", f"--out_dir={tmp_path / 's2'}", "--max_iters=3"])
    s2 = torch.load(tmp_path / "s2" / "tokenizer.pt", weights_only=False)
    assert s2["step"] == 3 and s2["train_config"]["stage"] == 2
    assert s2["train_config"]["lpips_vgg"] == lpips_files["vgg"] and s2["train_config"]["num_frames_stage2"] == 2


def test_max_time_stops_and_saves(tmp_path, micro_videos, capsys):
    T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=1000", "--max_time=1e-6",
            f"--out_dir={tmp_path}"])
    assert "(step 1, stopped by --max_time 1e-06)" in capsys.readouterr().out
    assert torch.load(tmp_path / "tokenizer.pt", weights_only=False)["step"] == 1


def test_the_loop_clips_as_asked_and_a_diverging_run_keeps_its_last_good_checkpoint(tmp_path, micro_videos,
                                                                                   monkeypatch):
    max_norms, clip = [], torch.nn.utils.clip_grad_norm_

    def recorded_clip(parameters, max_norm):
        max_norms.append(max_norm)
        return clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded_clip)
    ckpt = tmp_path / "tokenizer.pt"
    T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=2", f"--out_dir={tmp_path}", "--grad_clip=0"])
    assert max_norms == [math.inf] * 3             # 0: no clipping; the third checks the weights it then saves
    good = ckpt.read_bytes()
    # lr 1e30: the first step's weights blow up, the next steps are not finite and skipped; no save during the
    # streak (--ckpt_interval 1), and the error names the file that still holds step 2
    for max_iters in (40, 5):
        with pytest.warns(UserWarning, match="non-finite"), pytest.raises(
                SystemExit, match=rf"3 non-finite steps in a row \(last good file: {ckpt}\)"):
            T.main(["--resume", f"--out_dir={tmp_path}", f"--max_iters={max_iters}", "--learning_rate=1e30",
                    "--ckpt_interval=1", "--max_bad_steps=3", "--grad_clip=0.5"])
        assert ckpt.read_bytes() == good
    assert max_norms[3:] == [0.5] * 8


def test_ctrl_c_finishes_the_step_saves_and_says_so_and_stale_partial_files_go(tmp_path, micro_videos,
                                                                               monkeypatch, capsys):
    stale, live = tmp_path / ".tokenizer.dead1.partial.pt", tmp_path / ".tokenizer.live2.partial.pt"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    loss, calls = T.reconstruction_loss, []

    def interrupted_at_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(*args, **kwargs)

    monkeypatch.setattr(T, "reconstruction_loss", interrupted_at_the_second_step)
    with open(live) as held:
        fcntl.flock(held, fcntl.LOCK_EX)                       # a save in progress in another process
        with pytest.raises(SystemExit) as stopped:
            T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=50", f"--out_dir={tmp_path}"])
    assert stopped.value.code == 130 and len(calls) == 3         # the third checks the weights it saves
    out = capsys.readouterr().out
    assert f"SIGINT at step 2: saved {tmp_path / 'tokenizer.pt'}; continue it with --resume" in out
    assert torch.load(tmp_path / "tokenizer.pt", weights_only=False)["step"] == 2
    assert "removed 1 partial files of killed saves" in out and not stale.exists() and live.exists()


def test_sigterm_stops_two_processes_at_one_step_saves_once_and_resumes_to_the_unbroken_run(tmp_path, micro_videos):
    flags = [*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--lr_schedule=constant", "--eval_interval=1000",
             "--ckpt_interval=1000"]
    log = tmp_path / "ddp" / "tokenizer_log.jsonl"
    sent = []

    def preempt(ranks):  # SIGTERM to one process, once the run is under way: every rank stops at one step
        if not sent and log.exists() and len(log.read_text().splitlines()) >= 2:
            sent.append(ranks[1].send_signal(signal.SIGTERM))

    out = run_cli(*flags, "--max_iters=200", "--batch_size=2", f"--out_dir={tmp_path / 'ddp'}", nproc=2,
                  poke=preempt)
    assert out.returncode == 143 and sent, out.stderr[-3000:]
    step = torch.load(tmp_path / "ddp" / "tokenizer.pt", weights_only=False)["step"]
    assert out.stdout.count("SIGTERM at step") == 1 and f"SIGTERM at step {step}: saved" in out.stdout
    T.main(["--resume", f"--out_dir={tmp_path / 'ddp'}", "--batch_size=4", f"--max_iters={step + 2}"])
    T.main([*flags, "--batch_size=4", f"--max_iters={step + 2}", f"--out_dir={tmp_path / 'one'}"])
    resumed, unbroken = (torch.load(tmp_path / d / "tokenizer.pt", weights_only=False) for d in ("ddp", "one"))
    assert resumed["step"] == unbroken["step"] == step + 2
    for k in unbroken["model"]:
        torch.testing.assert_close(resumed["model"][k], unbroken["model"][k], rtol=0, atol=1e-4)
    steps = [r["step"] for r in H.read_log(str(log))]
    assert steps == sorted(set(steps)) and steps[-1] == step + 2                # appended, no step twice


def test_a_second_launch_is_refused_under_the_lock_before_any_work(tmp_path):
    ckpt = str(tmp_path / "tokenizer.pt")
    with H.run_lock(ckpt), pytest.raises(SystemExit, match="another run .* is writing"):
        T.main([f"--data={tmp_path / 'not_scanned_yet'}", f"--out_dir={tmp_path}"])


def test_resume_restores_the_run_and_equals_an_unbroken_one(tmp_path, micro_videos, capsys):
    # a cosine schedule past its warmup, so that a resumed run on the wrong step or schedule would differ;
    # the resumed run is given no flag but the new length: everything else comes from the checkpoint
    common = [*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--lr_schedule=cosine", "--learning_rate=3e-3",
              "--min_lr=1e-5", "--lr_decay_iters=6", "--num_samples=24", "--batch_size=3", "--ckpt_interval=3"]
    T.main([*common, "--max_iters=6", f"--out_dir={tmp_path / 'full'}"])
    T.main([*common, "--max_iters=3", f"--out_dir={tmp_path / 'part'}"])
    capsys.readouterr()
    T.main(["--resume", f"--out_dir={tmp_path / 'part'}", "--max_iters=6"])
    assert "override: --max_iters 6 (the checkpoint had 3)" in capsys.readouterr().out
    a = torch.load(tmp_path / "full" / "tokenizer.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "tokenizer.pt", weights_only=False)
    assert a["step"] == b["step"] == 6 and b["train_config"]["data"] == os.path.abspath(micro_videos)
    init = T.CoordTok(T.CoordTokConfig(**MICRO)).state_dict()
    assert any(not torch.equal(init[k], a["model"][k]) for k in init)   # it did train
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    # the record of each run: a line per log interval (held-out figures among them), appended on resume with
    # no step twice, and the same as the unbroken run's; its curves beside it
    full, part = (H.read_log(str(tmp_path / d / "tokenizer_log.jsonl")) for d in ("full", "part"))
    assert [r["step"] for r in part] == [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in part] == pytest.approx([r["loss"] for r in full], rel=1e-4)
    assert {"loss", "psnr", "lr", "seconds_per_step", "clips_per_s", "held_out_psnr", "held_out_ssim"} <= set(part[-1])
    assert (tmp_path / "part" / "tokenizer_curves.svg").read_text().count("<polyline") == 7
    # a model flag cannot change under a trained model
    with pytest.raises(SystemExit, match="--dec_layers differ"):
        T.main(["--resume", f"--out_dir={tmp_path / 'part'}", "--max_iters=7", "--dec_layers=3"])


def test_a_users_checkpoints_are_never_destroyed(tmp_path, micro_videos, capsys):
    out_dir = tmp_path / "run"
    T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=1", f"--out_dir={out_dir}"])
    trained = (out_dir / "tokenizer.pt").read_bytes()
    assert (out_dir / "tokenizer.png").exists()                            # the picture beside the checkpoint
    # a fresh run into the same folder is refused, saying how to continue or start over
    with pytest.raises(SystemExit, match="--resume.*another --out_dir"):
        T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=1", f"--out_dir={out_dir}"])
    # a second run writing the same checkpoint is refused while the first is alive (the lock names it)
    with H.run_lock(str(out_dir / "tokenizer.pt")):
        concurrent = run_cli("--resume", f"--out_dir={out_dir}", "--max_iters=2")
    assert concurrent.returncode != 0 and f"process {os.getpid()} on {socket.gethostname()}" in concurrent.stderr
    assert (out_dir / "tokenizer.pt").read_bytes() == trained
    # the lock of a run that has ended, however it ended, holds nothing back
    capsys.readouterr()
    T.main(["--resume", f"--out_dir={out_dir}", "--max_iters=2", "--preset=large"])
    assert T.load_tokenizer(str(out_dir / "tokenizer.pt"))[1]["step"] == 2
    assert "--preset is ignored: the model is the one --resume's" in capsys.readouterr().err
    # --encode never writes over anything but a tokens file, and its advice names no such path
    before = (out_dir / "tokenizer.pt").read_bytes()
    with pytest.raises(SystemExit, match="not a tokens file; pass a new path") as refused:
        T.main([f"--out_dir={out_dir}", f"--encode={out_dir / 'tokenizer.pt'}", "--num_workers=0"])
    assert f"tokenizer.py --encode {out_dir}" not in str(refused.value)
    assert (out_dir / "tokenizer.pt").read_bytes() == before
    # an output folder that cannot be one fails at the start, before any training
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    with pytest.raises(SystemExit, match="is not writable"):
        T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=1", f"--out_dir={tmp_path / 'a_file'}"])
    assert "it/s" not in capsys.readouterr().err


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, micro_videos):
    flags = [*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=3", "--grad_accum=2", "--eval_interval=100"]
    out = run_script("tests/ddp_worker.py", "tokenizer", *flags, "--batch_size=2", f"--out_dir={tmp_path / 'ddp'}",
                     nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    T.main([*flags, "--batch_size=4", f"--out_dir={tmp_path / 'one'}"])
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # each rank reads its own clips ((index, clip seed) pairs never repeat across ranks), together all of
    # the training videos
    n_train = len(D.VideoDataset(micro_videos, 16, 8, "train", val_fraction=0.4))
    assert r0["seen"] and r1["seen"] and r0["seen"].isdisjoint(r1["seen"])
    assert {index for index, _ in r0["seen"] | r1["seen"]} == set(range(n_train))
    single = torch.load(tmp_path / "one" / "tokenizer.pt", weights_only=False)["model"]
    init = T.CoordTok(T.CoordTokConfig(**MICRO)).state_dict()
    assert any(not torch.allclose(init[k], single[k]) for k in init)       # it trained
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k           # the ranks agree exactly
        # and equal one process: Adam moves a weight by up to lr = 1e-3 a step, so other clips or patches show at
        # that scale; the order of the gradient sums alone gives ~1e-5 (Adam divides tiny gradients by tiny norms)
        torch.testing.assert_close(r0["params"][k], single[k], rtol=0, atol=1e-4)
    assert torch.load(tmp_path / "ddp" / "tokenizer.pt", weights_only=False)["step"] == 3


def test_encode_covers_every_window_of_every_video_on_any_number_of_processes(tmp_path, micro_videos, capsys):
    T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=2", f"--out_dir={tmp_path}"])
    assert "step 2: held_out_psnr" in "".join(capsys.readouterr())
    one, two = str(tmp_path / "tokens.pt"), str(tmp_path / "tokens_ddp.pt")
    T.main([f"--out_dir={tmp_path}", f"--encode={one}", "--num_workers=0", "--batch_size=4"])
    tokens = D.load_tokens(one)
    # 10-frame videos, 8-frame clips: by default back to back, the last one ending at the video's end
    videos = D.find_videos(micro_videos)
    assert D.window_starts(10, 8, 8) == [0, 2] and D.window_starts(5, 8, 8) == [0]
    assert D.window_starts(20, 8, 5) == [0, 5, 10, 12]
    assert tokens["start"].tolist() == [0, 2] * len(videos) and tokens["video_index"].tolist() == \
        [v for v in range(len(videos)) for _ in range(2)]
    assert tokens["videos"] == [os.path.relpath(p, micro_videos) for p, _ in videos]
    assert tokens["z_xy"].shape == (2 * len(videos), 4, 8, 8) and tokens["z_xt"].shape == (2 * len(videos), 4, 8, 8)
    assert tokens["labels"].tolist() == [0] * 6 + [1] * 6 and len(tokens["class_names"]) == 2
    # the stored triplanes are the model's encoding of those clips
    model, _ = T.load_tokenizer(tokens["tokenizer_ckpt"])
    clip, _ = D.read_clip(videos[1][0], 16, 8, start=2)
    with torch.no_grad():
        z = model.encode(D.from_uint8(torch.from_numpy(clip)[None]))
    torch.testing.assert_close(z[1][0], tokens["z_xt"][3], rtol=1e-4, atol=1e-4)
    # two processes write the same file, with a stride of one frame; and a tokens file may be written again
    flags = [f"--out_dir={tmp_path}", "--encode_stride=1", "--num_workers=0", "--batch_size=2"]
    T.main([*flags, f"--encode={one}"])
    enc = run_cli(*flags, f"--encode={two}", nproc=2)
    assert enc.returncode == 0, enc.stderr[-2000:]
    a, b = D.load_tokens(one), D.load_tokens(two)
    assert a["start"].tolist() == [0, 1, 2] * len(videos)
    for k in ("labels", "n_frames", "video_index", "start"):
        assert torch.equal(a[k], b[k]), k
    for k in D.PLANES:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_wrong_or_missing_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"kind": "coordtok_dit"}, tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="not a 'coordtok_tokenizer' checkpoint"):
        T.load_tokenizer(str(tmp_path / "dit.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        T.load_tokenizer(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError):
        T.load_tokenizer(str(tmp_path / "nope.pt"))
    with pytest.raises(SystemExit, match="found no checkpoint"):
        T.main([f"--out_dir={tmp_path / 'empty'}", "--resume"])


def test_small_holes_are_closed_before_any_work(tmp_path, micro_videos, capsys):
    out_dir = tmp_path / "run"
    T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=3", f"--out_dir={out_dir}"])
    trained = (out_dir / "tokenizer.pt").read_bytes()
    # a resumed run already past --max_iters trains nothing, saves nothing, and says so
    capsys.readouterr()
    T.main(["--resume", f"--out_dir={out_dir}", "--max_iters=2"])
    done = capsys.readouterr().out
    assert "is at step 3: nothing to train" in done and "saved" not in done
    assert (out_dir / "tokenizer.pt").read_bytes() == trained
    # a fresh run into a trained folder is refused first, before the data is even looked at, and so is it
    # on every rank under torchrun, without a traceback of the process group
    fresh = [*MICRO_TRAIN_FLAGS, f"--data={tmp_path / 'no_such_folder'}", f"--out_dir={out_dir}"]
    with pytest.raises(SystemExit, match="already holds a trained checkpoint"):
        T.main(fresh)
    again = run_cli(*fresh, nproc=2)
    assert again.returncode != 0 and "already holds a trained checkpoint" in again.stderr
    assert "tokenizer.py\", line" not in again.stderr and "gloo" not in again.stderr.lower()  # no trace
    # a negative stride is refused
    with pytest.raises(SystemExit, match="--encode_stride must be >= 0"):
        T.main([f"--out_dir={out_dir}", f"--encode={tmp_path / 'tokens.pt'}", "--encode_stride=-5"])


def test_resume_says_when_the_held_out_videos_are_not_the_folder_s_now(tmp_path):
    videos = tmp_path / "videos"
    D.make_synthetic(str(videos), num_classes=2, videos_per_class=3, num_frames=10, size=24, seed=1)
    T.main([*MICRO_TRAIN_FLAGS, f"--data={videos}", "--max_iters=1", f"--out_dir={tmp_path / 'out'}"])
    held_out = torch.load(tmp_path / "out" / "tokenizer.pt", weights_only=False)["held_out"]
    assert held_out == ["still/still_002.mp4", "zoom/zoom_000.mp4"]
    D.make_synthetic(str(tmp_path / "more"), num_classes=2, videos_per_class=12, num_frames=10, size=24, seed=2)
    for path, _ in D.find_videos(str(tmp_path / "more")):                 # 24 more videos, other names
        os.rename(path, path.replace(str(tmp_path / "more"), str(videos)).replace(".mp4", "_new.mp4"))
    with pytest.warns(UserWarning, match="are not the folder's now: 0 gone .*new"):
        T.main(["--resume", f"--out_dir={tmp_path / 'out'}", "--max_iters=2"])
    assert set(held_out) <= set(torch.load(tmp_path / "out" / "tokenizer.pt", weights_only=False)["held_out"])


def test_the_loss_is_l2_on_the_patches_and_stage_two_adds_lpips():
    pred, target = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    assert T.reconstruction_loss(pred, target).item() == pytest.approx(((pred - target) ** 2).mean().item())
    lpips = lambda a, b: (a - b).abs().mean(dim=(1, 2, 3))                    # a stand-in distance per image
    to_frames = lambda p: p.reshape(-1, 3, 4, 5)
    expected = ((pred - target) ** 2).mean() + 0.5 * lpips(to_frames(pred), to_frames(target)).mean()
    assert T.reconstruction_loss(pred, target, lpips, 0.5, to_frames).item() == pytest.approx(expected.item())


def test_the_logged_psnr_is_the_psnr_whatever_the_loss(tmp_path, micro_videos, monkeypatch, capsys):
    # the first step's numbers come from the initial weights: only the loss function differs between the runs
    logged = {}
    for name, scale in (("l2", 1.0), ("doubled", 2.0)):
        loss = T.reconstruction_loss
        monkeypatch.setattr(T, "reconstruction_loss", lambda *a, s=scale, **k: s * loss(*a, **k))
        T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=1", "--eval_interval=100",
                f"--out_dir={tmp_path / name}"])
        err = capsys.readouterr().err
        logged[name] = {k: float(err.rsplit(f"{k}=", 1)[1].split(",")[0].rstrip("]")) for k in ("loss", "psnr")}
        monkeypatch.undo()
    assert logged["doubled"]["loss"] == pytest.approx(2 * logged["l2"]["loss"], rel=1e-3)
    assert logged["doubled"]["psnr"] == logged["l2"]["psnr"]
    assert 3 < logged["l2"]["psnr"] < 30                                       # a PSNR in dB of an untrained model


def test_sigterm_to_the_whole_process_group_leaves_the_loader_processes_to_the_loop(tmp_path, micro_videos):
    # a cluster signals every process of the job, loader workers included: they must not die before the save
    code = ("import sys, data, tokenizer; data.IN_MEMORY_BYTES = 0; "  # read in loader processes, as a large set is
            "tokenizer.main(sys.argv[1:])")
    log = tmp_path / "tokenizer_log.jsonl"
    run = subprocess.Popen([sys.executable, "-c", code, *MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=500",
                            "--num_workers=1", f"--out_dir={tmp_path}"], cwd=ROOT, env=ENV, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 143, err[-2000:]
    step = torch.load(tmp_path / "tokenizer.pt", weights_only=False)["step"]
    assert f"SIGTERM at step {step}: saved" in out and "DataLoader worker" not in err
