"""SiT and flow matching: the samplers against a closed-form velocity and SiT's own SDE steps, a small model
learning a two-mode mixture, guidance, adaLN-Zero, EMA, the training loop's guards, resume, DDP, and
tokenizer.py -> dit.py -> sample.py end to end."""

import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

import data as D
import dit
import eval as E
import harness as H
import sample as S
import tokenizer as T
from conftest import ENV, MICRO, MICRO_SIT_FLAGS, MICRO_TRAIN_FLAGS, ROOT, run_script

MICRO_SIT = dit.SiTConfig(width=32, depth=1, heads=2)
SHAPES = [(4, 4, 4), (4, 6, 4), (4, 6, 4)]                         # a triplane (C, Rs, Rs), (C, Rt, Rs) x2


def pooled_stats(planes):
    """Mean and std of each (plane, channel), pooled over samples and positions."""
    return [(z.transpose(0, 1).flatten(1).mean(1), z.transpose(0, 1).flatten(1).std(1)) for z in planes]


def gaussian_velocity(mu, sigma):
    """The exact velocity E[x1 - noise | x_t] when the data is N(mu, sigma^2) per channel, on the linear
    path x_t = (1 - t) noise + t x1: mu + (t sigma^2 - (1 - t)) / (t^2 sigma^2 + (1 - t)^2) (x - t mu)."""
    def velocity(x, t):
        t = t[:, None, None, None]
        return tuple(m[:, None, None] + (t * s[:, None, None] ** 2 - (1 - t))
                     / (t ** 2 * s[:, None, None] ** 2 + (1 - t) ** 2) * (xi - t * m[:, None, None])
                     for xi, m, s in zip(x, mu, sigma))
    return velocity


@pytest.mark.parametrize("sampler,steps,shift", [("euler", 100, 1.0), ("heun", 20, 1.0), ("sde", 250, 1.0),
                                                 ("heun", 20, 3.0), ("sde", 250, 3.0)])
def test_every_sampler_maps_noise_to_a_gaussian_with_its_exact_velocity(sampler, steps, shift):
    shapes = [(2, 4, 4), (2, 6, 4), (2, 6, 4)]
    mu = [torch.tensor([1.5, -2.0]), torch.tensor([0.0, 0.7]), torch.tensor([-0.5, 3.0])]
    sigma = [torch.tensor([0.5, 1.0]), torch.tensor([2.0, 0.3]), torch.tensor([1.2, 0.8])]
    gen = torch.Generator().manual_seed(0)
    noise = tuple(torch.randn(4000, *s, generator=gen) for s in shapes)
    out = dit.integrate(gaussian_velocity(mu, sigma), noise, sampler, steps, torch.Generator().manual_seed(1),
                        time_shift=shift)
    for (mean, std), m, s in zip(pooled_stats(out), mu, sigma):
        # 64000+ values per channel: sampling error ~0.01 sigma; the tolerances bound the step error
        torch.testing.assert_close(mean, m, rtol=0, atol=0.03 * float(s.max()))
        torch.testing.assert_close(std / s, torch.ones(2), rtol=0, atol=0.03)


def test_the_sde_sampler_takes_sits_steps():
    # SiT's sample_sde defaults: Euler-Maruyama on linspace(0, 0.96, steps), drift v + w score with
    # w = 1 - t and score = (t v - x) / (1 - t), noise sqrt(2 w dt) N(0, 1); then a noise-free "Mean" step
    # of the drift over the last 0.04. Written out here for 3 steps: 2 stochastic steps and the mean step.
    calls = []

    def velocity(x, t):
        calls.append(t[0].item())
        return tuple(0.5 * xi + t[:, None, None, None] for xi in x)      # any velocity will do

    x0 = (torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(5)),)
    out = dit.integrate(velocity, x0, "sde", steps=3, generator=torch.Generator().manual_seed(9))
    assert calls == pytest.approx([0.0, 0.48, 0.96])
    gen = torch.Generator().manual_seed(9)
    x = x0[0]
    for t, dt in ((0.0, 0.48), (0.48, 0.48)):
        v = 0.5 * x + t
        x = x + dt * (v + (t * v - x)) + math.sqrt(2 * (1 - t) * dt) * torch.randn(x.shape, generator=gen)
    v = 0.5 * x + 0.96
    x = x + 0.04 * (v + (0.96 * v - x))
    torch.testing.assert_close(out[0], x)


def test_small_sit_learns_a_two_mode_mixture():
    # class 0: every value N(-1, 0.3^2); class 1: N(+1, 0.5^2); trained with label dropout, so the
    # null class must give both modes, half each
    torch.manual_seed(0)
    shapes = [(2, 4, 4), (2, 4, 4), (2, 4, 4)]
    mode_mean, mode_std = torch.tensor([-1.0, 1.0]), torch.tensor([0.3, 0.5])
    gen = torch.Generator().manual_seed(0)

    def draw(n):
        y = torch.randint(0, 2, (n,), generator=gen)
        m, s = mode_mean[y][:, None, None, None], mode_std[y][:, None, None, None]
        return tuple(m + s * torch.randn(n, *shape, generator=gen) for shape in shapes), y

    model = dit.SiT(dit.SiTConfig(width=64, depth=2, heads=2, class_dropout=0.2), shapes, num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = 500
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = H.lr_at(step, dit.DiTTrainConfig(learning_rate=3e-3, warmup_iters=50, max_iters=steps))
        x1, y = draw(128)
        loss = dit.flow_matching_loss(model, x1, y, model.null_class, 0.2, gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    def modes(label, sampler, steps):
        out = dit.sample_planes(model, torch.full((400,), label), 1.0, sampler, steps, torch.Generator().manual_seed(1))
        flat = torch.cat([z.flatten(1) for z in out], dim=1)                          # (400, 96)
        return flat, (flat.mean(1) > 0).long()                                         # mode of each sample

    # stated tolerance: per-mode mean within 0.1, std within 20% (a 500-step model, still slightly narrow)
    for sampler, steps in (("euler", 20), ("sde", 50)):
        for label in (0, 1):
            flat, mode = modes(label, sampler, steps)
            assert (mode == label).all(), f"{sampler}: class {label} gave samples of the other mode"
            std = (flat - flat.mean(1, keepdim=True)).pow(2).mean().sqrt()
            assert abs(flat.mean() - mode_mean[label]) < 0.1, (sampler, label, flat.mean())
            assert abs(std / mode_std[label] - 1) < 0.2, (sampler, label, std)
        flat, mode = modes(model.null_class, sampler, steps)
        assert 0.35 < mode.float().mean() < 0.65, f"{sampler}: unconditional mode split {mode.float().mean():.2f}"
        for k in (0, 1):
            assert abs(flat[mode == k].mean() - mode_mean[k]) < 0.1


def test_guidance_scale_one_is_the_conditional_velocity_and_applies_to_every_channel():
    torch.manual_seed(0)
    model = dit.SiT(dataclasses.replace(MICRO_SIT, class_dropout=0.1), SHAPES, num_classes=3)
    for p in model.parameters():  # a trained-looking model: nothing zero, the label matters
        torch.nn.init.normal_(p, std=0.2)
    x = tuple(torch.randn(5, *s) for s in SHAPES)
    t, y = torch.rand(5), torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        cond = model(x, t, y)
        null = model(x, t, torch.full_like(y, 3))                                     # null class = num_classes
        for v, c in zip(dit.guided_velocity(model, x, t, y, 1.0, model.null_class), cond):
            torch.testing.assert_close(v, c, rtol=1e-5, atol=1e-5)
        guided = dit.guided_velocity(model, x, t, y, 4.0, model.null_class)
    for v, c, u in zip(guided, cond, null):
        assert not torch.allclose(c, u, atol=1e-3)                                    # the label changes the output
        torch.testing.assert_close(v, u + 4.0 * (c - u), rtol=1e-4, atol=1e-4)        # on all channels of all planes


def test_zero_initialised_sit_is_adaln_zero_and_predicts_zero_velocity():
    shapes = [(4, 8, 8), (4, 6, 8), (4, 6, 8)]
    model = dit.SiT(dataclasses.replace(MICRO_SIT, depth=3, class_dropout=0.1), shapes, num_classes=5)
    # adaLN-Zero: every block's modulation (shift, scale, gate) and every head start at exactly zero
    zero = [b.modulation for b in model.blocks] + [m for h in model.heads for m in (h.modulation, h.proj)]
    assert len(zero) == 3 + 2 * 3
    assert all(torch.count_nonzero(m.weight) == 0 and torch.count_nonzero(m.bias) == 0 for m in zero)
    assert all(torch.count_nonzero(b.attn.qkv.weight) > 0 for b in model.blocks)  # the rest is not zero
    x = tuple(torch.randn(3, *s) for s in shapes)
    out = model(x, torch.rand(3), torch.tensor([0, 4, 5]))
    assert [tuple(v.shape) for v in out] == [(3, *s) for s in shapes]
    assert all(torch.equal(v, torch.zeros_like(v)) for v in out)
    assert model.null_class == 5 and model.class_embed.num_embeddings == 6
    # the authors' heads: a velocity half and an unused variance half (learn_sigma)
    assert [h.proj.out_features for h in model.heads] == [2 * 2 * 4 * 2] * 3
    unconditional = dit.SiT(MICRO_SIT, shapes, num_classes=1)   # the paper's: one learned class row
    assert unconditional.class_embed.num_embeddings == 1 and unconditional.null_class is None


def test_flow_matching_loss_uses_the_linear_path_and_drops_labels():
    shapes = [(2, 4, 4), (2, 2, 4)]
    x1 = tuple(torch.randn(6, *s) for s in shapes)
    seen = {}

    def identity_model(x_t, t, y):  # predicts v = x_t, and records what it was given
        seen["y"] = y
        return x_t

    loss = dit.flow_matching_loss(identity_model, x1, torch.zeros(6, dtype=torch.long), null_class=7,
                                  class_dropout=1.0, generator=torch.Generator().manual_seed(3), time_shift=2.0)
    # the same draws by hand: u -> t = u / (u + 2 (1 - u)), then the noise of each plane
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(6, generator=gen)[:, None, None, None]
    t = u / (u + 2 * (1 - u))
    noise = [torch.randn(x.shape, generator=gen) for x in x1]
    err = [((1 - t) * n + t * x - (x - n)).pow(2) for x, n in zip(x1, noise)]
    expected = sum(e.mean() for e in err) / len(err)                # each plane weighs the same, as SiT's loss
    torch.testing.assert_close(loss, expected)
    assert seen["y"].tolist() == [7] * 6
    # two processes with half the batch each draw the same times and noise as one process with all of it
    halves = [dit.flow_matching_loss(identity_model, tuple(x[r * 3:(r + 1) * 3] for x in x1),
                                     torch.zeros(3, dtype=torch.long), 7, 1.0, torch.Generator().manual_seed(3), 2.0,
                                     share=(r, 2)) for r in (0, 1)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, expected)


def test_ema_after_one_update_is_the_weighted_average():
    old, new = dit.SiT(MICRO_SIT, SHAPES, 1), dit.SiT(MICRO_SIT, SHAPES, 1)
    for p in new.parameters():
        torch.nn.init.normal_(p)
    before = [p.clone() for p in old.parameters()]
    dit.ema_update(old, new, 0.9)
    for e, a, b in zip(old.parameters(), before, new.parameters()):
        torch.testing.assert_close(e, 0.9 * a + 0.1 * b)
    assert dit.ema_decay_at(0, 0.9999) == pytest.approx(0.1) and dit.ema_decay_at(10 ** 7, 0.9999) == 0.9999
    assert dit.ema_decay_at(0, 0.9999, warmup=False) == 0.9999


def test_presets_and_the_paper_token_count():
    cfg = dit.PRESETS["L/2"]
    assert (cfg.width, cfg.depth, cfg.heads, cfg.patch_size) == (1024, 24, 16, 2)
    assert [(c.width, c.depth, c.heads) for c in map(dit.PRESETS.get, ("S/2", "B/2", "XL/2"))] == \
        [(384, 12, 6), (768, 12, 12), (1152, 28, 16)]
    with torch.device("meta"):
        model = dit.SiT(cfg, [(8, 16, 16), (8, 32, 16), (8, 32, 16)], num_classes=1)
    assert sum(gh * gw for gh, gw in model.grids) == 64 + 128 + 128
    assert not cfg.conditional and cfg.class_dropout == 0 and cfg.learn_sigma  # the paper's UCF-101 generator


def test_bad_shapes_configs_and_labels_are_clear_errors():
    with pytest.raises(ValueError, match=r"z_xt \(5x8\) is not divisible by --patch_size 2"):
        dit.SiT(MICRO_SIT, [(4, 8, 8), (4, 5, 8), (4, 5, 8)], 1)
    for field, value, message in (("time_shift", 0.0, "--time_shift must be > 0"), ("heads", 0, "--heads must be >= 1"),
                                  ("width", 36, "--width 36 is not divisible by --heads 8"),
                                  ("class_dropout", 1.0, "--class_dropout must be in")):
        with pytest.raises(ValueError, match=message):
            dit.SiT(dataclasses.replace(MICRO_SIT, **{field: value}, **({"heads": 8} if field == "width" else {})),
                    SHAPES, 1)
    with pytest.raises(ValueError, match="--sampler"):
        dit.integrate(lambda x, t: x, (torch.zeros(1, 1, 2, 2),), "rk4")
    model = dit.SiT(dataclasses.replace(MICRO_SIT, class_dropout=0.1), SHAPES, num_classes=2)
    with pytest.raises(ValueError, match="--class_label 'cats'.*0=discs"):
        S.parse_labels("cats", ["discs", "stars"], 4, model)
    labels, names = S.parse_labels("stars", ["discs", "stars"], 3, model)
    assert labels.tolist() == [1, 1, 1] and names == ["stars"] * 3
    assert S.parse_labels("0", ["discs", "stars"], 2, model)[0].tolist() == [0, 0]
    assert S.parse_labels("", ["discs", "stars"], 3, model)[0].tolist() == [0, 1, 0]
    assert S.parse_labels("none", ["discs", "stars"], 2, model)[0].tolist() == [2, 2]
    no_null = dit.SiT(MICRO_SIT, SHAPES, num_classes=2)                      # no label dropout: no null class
    with pytest.raises(ValueError, match="--class_label 'none'"):
        S.parse_labels("none", ["discs", "stars"], 2, no_null)
    assert list(S.parse_frames("64:72", 128)) == list(range(64, 72)) and list(S.parse_frames("", 4)) == [0, 1, 2, 3]
    for spec in ("8:4", "120:130", "a:b"):
        with pytest.raises(ValueError, match="--frames"):
            S.parse_frames(spec, 128)


def make_tokens_file(path, num_clips=6, num_classes=2, poison=False):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(num_clips) % num_classes
    planes = tuple(torch.randn(num_clips, 4, h, 8, generator=gen) + labels[:, None, None, None]
                   for h in (8, 6, 6))
    if poison:
        planes[1][2, 0, 0, 0] = float("nan")
    clips = {**dict(zip(D.PLANES, planes)), "label": labels, "n_frames": torch.full((num_clips,), 8),
             "video_index": torch.arange(num_clips), "start": torch.zeros(num_clips)}
    D.save_tokens(str(path), clips, [f"class{i}" for i in range(num_classes)], "made-by-test.pt", MICRO,
                  "made-by-test", [])


def test_dit_cli_rejects_missing_foreign_or_broken_tokens_files(tmp_path):
    with pytest.raises(SystemExit, match="tokenizer.py --encode"):
        dit.main(["--tokens", str(tmp_path / "missing.pt"), "--out_dir", str(tmp_path)])
    torch.save({"kind": "coordtok_tokenizer", "model": {}}, tmp_path / "tokenizer.pt")
    with pytest.raises(SystemExit, match="not a tokens file") as error:
        dit.main(["--tokens", str(tmp_path / "tokenizer.pt"), "--out_dir", str(tmp_path)])
    assert f"--encode {tmp_path / 'tokenizer.pt'}" not in str(error.value)  # no advice to write over it
    make_tokens_file(tmp_path / "nan.pt", poison=True)
    with pytest.raises(SystemExit, match="damaged \\(z_xt is not finite; .*write it again"):
        dit.main(["--tokens", str(tmp_path / "nan.pt"), "--out_dir", str(tmp_path)])
    for flag, message in (("--max_iters=0", "--max_iters must be >= 1"), ("--ckpt_interval=0", "--ckpt_interval"),
                          ("--time_shift=-1", "--time_shift must be > 0")):
        make_tokens_file(tmp_path / "tokens.pt")
        with pytest.raises(SystemExit, match=message):
            dit.main(["--tokens", str(tmp_path / "tokens.pt"), "--out_dir", str(tmp_path), flag])
    assert not (tmp_path / "dit.pt").exists()


def test_a_non_finite_step_is_skipped_and_the_run_moves_on(tmp_path, monkeypatch):
    # a loss that is NaN on one particular batch: retrying that batch would fail until the run stops
    make_tokens_file(tmp_path / "tokens.pt")
    loss_fn, poisoned = dit.flow_matching_loss, []

    def nan_on_the_first_batch(model, x1, *args, **kwargs):
        poisoned.append(poisoned[0] if poisoned else x1[0].clone())
        loss = loss_fn(model, x1, *args, **kwargs)
        return loss * float("nan") if torch.equal(x1[0], poisoned[0]) else loss

    monkeypatch.setattr(dit, "flow_matching_loss", nan_on_the_first_batch)
    with pytest.warns(UserWarning, match="non-finite loss or gradient, step skipped"):
        dit.main([*MICRO_SIT_FLAGS, f"--tokens={tmp_path / 'tokens.pt'}", f"--out_dir={tmp_path}", "--batch_size=6",
                  "--max_iters=4", "--max_bad_steps=2", "--device=cpu"])
    assert torch.load(tmp_path / "dit.pt", weights_only=False)["step"] == 4


def test_resume_restores_the_run_and_equals_an_unbroken_one(tmp_path):
    # a cosine schedule past its warmup, so that a resume on the wrong step or schedule would differ; the
    # resumed run is given no flag but the new length: everything else comes from the checkpoint
    make_tokens_file(tmp_path / "tokens.pt")
    flags = [*MICRO_SIT_FLAGS, f"--tokens={tmp_path / 'tokens.pt'}", "--batch_size=4", "--warmup_iters=1",
             "--ckpt_interval=3", "--log_interval=1", "--ema_decay=0.5", "--device=cpu", "--learning_rate=3e-3",
             "--min_lr=1e-5", "--lr_schedule=cosine", "--lr_decay_iters=6"]
    dit.main(flags + ["--max_iters=6", f"--out_dir={tmp_path / 'full'}"])
    dit.main(flags + ["--max_iters=3", f"--out_dir={tmp_path / 'part'}"])
    resumed = run_script("dit.py", "--resume", f"--out_dir={tmp_path / 'part'}", "--max_iters=6")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "override: --max_iters 6 (the checkpoint had 3)" in resumed.stdout
    a = torch.load(tmp_path / "full" / "dit.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "dit.pt", weights_only=False)
    assert a["step"] == b["step"] == 6 and b["train_config"]["learning_rate"] == 3e-3
    assert any(not torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])      # the EMA lags the model
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=1e-6)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=0, atol=1e-9)
    assert a["num_classes"] == 2 and a["class_names"] == ["class0", "class1"]
    assert a["plane_shapes"] == [[4, 8, 8], [4, 6, 8], [4, 6, 8]] and set(a["mean"]) == set(D.PLANES)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    make_tokens_file(tmp_path / "tokens.pt", num_clips=8)
    flags = [*MICRO_SIT_FLAGS, f"--tokens={tmp_path / 'tokens.pt'}", "--grad_accum=2", "--max_iters=3",
             "--warmup_iters=1", "--device=cpu", "--class_dropout=0.5"]
    ddp = run_script("tests/ddp_worker.py", "dit", *flags, "--batch_size=2", f"--out_dir={tmp_path / 'ddp'}", nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    dit.main(flags + ["--batch_size=4", f"--out_dir={tmp_path / 'one'}"])
    r0, r1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt", weights_only=False)["params"] for r in (0, 1))
    one = torch.load(tmp_path / "one" / "dit.pt", weights_only=False)["model"]
    init = dit.SiT(dataclasses.replace(dit.PRESETS["cpu"], width=32, depth=1, heads=2, class_dropout=0.5),
                   [(4, 8, 8), (4, 6, 8), (4, 6, 8)], 2).state_dict()
    assert any(not torch.allclose(one[k], init[k]) for k in one)                     # it trained
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k                                            # the ranks agree exactly
        # and equal one process, to well below the lr = 1e-3 a step that other clips or noise would move a weight
        torch.testing.assert_close(r0[k], one[k], rtol=0, atol=1e-4)


def read_clips(folder, size, frames):
    """The clips sample.py wrote to folder, read back: {file name: uint8 (T, H, W, 3)}."""
    return {name: D.read_clip(os.path.join(folder, name), size, frames, start=0)[0]
            for name in sorted(os.listdir(folder)) if name.endswith((".mkv", ".mp4"))}


def test_tokenizer_dit_sample_pipeline_samples_what_the_checkpoint_says(tmp_path, micro_videos):
    T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", f"--out_dir={tmp_path}", "--max_iters=2"])
    tokens = str(tmp_path / "tokens.pt")
    T.main([f"--out_dir={tmp_path}", f"--encode={tokens}", "--num_workers=0"])
    # an EMA that lags the model by far, so that sampling from the wrong weights shows
    dit.main([f"--tokens={tokens}", f"--out_dir={tmp_path}", *MICRO_SIT_FLAGS, "--max_iters=3", "--batch_size=2",
              "--warmup_iters=1", "--ema_warmup=false", "--ema_decay=0.99", "--learning_rate=0.03"])
    common = [f"--ckpt={tmp_path / 'dit.pt'}", "--num_samples=3", "--steps=4", "--seed=7", "--cfg_scale=2",
              "--format=lossless"]
    for name, batch in (("a", 2), ("b", 3)):
        S.main([*common, f"--out_dir={tmp_path / name}", f"--batch_size={batch}"])
    a, b = read_clips(tmp_path / "a", 16, 8), read_clips(tmp_path / "b", 16, 8)
    assert list(a) == ["000_still.mkv", "001_zoom.mkv", "002_still.mkv"] == list(b)
    for name in a:  # sample k is the same clip whatever the batch it was drawn in (up to float rounding)
        assert np.abs(a[name].astype(int) - b[name].astype(int)).max() <= 1, name
    # the same clips by hand: the EMA weights, sample k's own generator, the tokens' statistics, the tokenizer
    ckpt = torch.load(tmp_path / "dit.pt", weights_only=False)
    tokenizer, _ = T.load_tokenizer(ckpt["tokenizer_ckpt"])

    def by_hand(weights="ema", denormalize=True):
        model = dit.SiT(dit.SiTConfig(**ckpt["model_config"]), ckpt["plane_shapes"], ckpt["num_classes"]).eval()
        model.load_state_dict(ckpt[weights])
        generators = [torch.Generator().manual_seed(7 * 1_000_003 + k) for k in range(3)]
        planes = dit.sample_planes(model, torch.tensor([0, 1, 0]), 2.0, "sde", 4, generators)
        if denormalize:
            planes = dit.denormalize(planes, ckpt["mean"], ckpt["std"])
        return D.to_uint8(tokenizer.decode_video(planes)).numpy()

    expected = by_hand()
    for k, name in enumerate(a):
        assert np.abs(a[name].astype(int) - expected[k].astype(int)).max() <= 1, name
    for wrong in (by_hand(weights="model"), by_hand(denormalize=False)):                   # the test can tell
        assert np.abs(wrong.astype(int) - expected.astype(int)).mean() > 3
    # random access: frames 2..4 of each clip only; and the default mp4 output with its frame grid
    S.main([*common[:-1], f"--out_dir={tmp_path / 'c'}", "--frames=2:5"])
    with av.open(str(tmp_path / "c" / "000_still.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 3 and frames[0].shape == (16, 16, 3) and (tmp_path / "c" / "grid.png").exists()


# -----------------------------------------------------------------------------
# frames of any shape, sampling under torchrun, and what sample.py trusts


def test_the_whole_pipeline_at_32x48(tmp_path, micro_videos, capsys):
    # a non-square model: z_xy 8x12, z_xt 8x12 (time x width), z_yt 8x8 (time x height)
    shape = ["--img_size=32", "--img_width=48", "--enc_patch_s=8", "--dec_patch_s=4"]
    T.main([*MICRO_TRAIN_FLAGS, *shape, f"--data={micro_videos}", f"--out_dir={tmp_path}", "--max_iters=2"])
    model, _ = T.load_tokenizer(str(tmp_path / "tokenizer.pt"))
    assert model.triplane_shapes == ((4, 8, 12), (4, 8, 12), (4, 8, 8)) and model.grid_size == (8, 8, 12)
    tokens = str(tmp_path / "tokens.pt")
    T.main([f"--out_dir={tmp_path}", f"--encode={tokens}", "--num_workers=0"])
    assert [tuple(D.load_tokens(tokens)[k].shape[1:]) for k in D.PLANES] == list(model.triplane_shapes)
    dit.main([f"--tokens={tokens}", f"--out_dir={tmp_path}", *MICRO_SIT_FLAGS, "--max_iters=2", "--batch_size=2"])
    S.main(["--num_samples=2", "--steps=3", f"--out_dir={tmp_path / 's'}", f"--ckpt={tmp_path / 'dit.pt'}"])
    assert read_clips(tmp_path / "s", (32, 48), 8)["000_still.mp4"].shape == (8, 32, 48, 3)
    with av.open(str(tmp_path / "s" / "000_still.mp4")) as container:
        assert (container.streams.video[0].height, container.streams.video[0].width) == (32, 48)
    capsys.readouterr()
    result = E.main([f"--ckpt={tmp_path / 'tokenizer.pt'}", "--num_workers=0", f"--out_dir={tmp_path}",
                     "--i3d=none", "--lpips_vgg=none", "--lpips_lin=none"])
    assert result["resolution"] == [32, 48] and result["tokens"]["tokens"] == 8 * 12 + 8 * 12 + 8 * 8
    assert "32x48" in capsys.readouterr().out and math.isfinite(result["psnr"])


@pytest.fixture(scope="module")
def sit_run(tmp_path_factory, micro_videos):
    """A trained micro tokenizer, its tokens and a micro SiT, in one folder."""
    folder = tmp_path_factory.mktemp("sit_run")
    T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=2", f"--out_dir={folder}"])
    T.main([f"--encode={folder / 'tokens.pt'}", "--num_workers=0", f"--out_dir={folder}"])
    dit.main([f"--tokens={folder / 'tokens.pt'}", *MICRO_SIT_FLAGS, "--max_iters=2", "--batch_size=2",
              f"--out_dir={folder}"])
    return folder


def test_two_processes_sample_the_files_one_process_writes(tmp_path, sit_run):
    common = [f"--ckpt={sit_run / 'dit.pt'}", "--num_samples=5", "--steps=3", "--format=lossless",
              "--batch_size=2", "--grid_clips=3"]
    S.main([*common, f"--out_dir={tmp_path / 'one'}"])
    out = run_script("sample.py", *common, f"--out_dir={tmp_path / 'two'}", nproc=2)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = read_clips(tmp_path / "one", 16, 8), read_clips(tmp_path / "two", 16, 8)
    assert list(one) == list(two) and len(one) == 5
    for name in one:
        assert np.abs(one[name].astype(int) - two[name].astype(int)).max() <= 1, name
    import skimage.io  # the grid holds the first --grid_clips clips only, a row each
    assert skimage.io.imread(str(tmp_path / "two" / "grid.png")).shape[0] == 3 * 16 * 6


def test_sample_refuses_another_tokenizer_and_keeps_names_inside_its_folder(tmp_path, sit_run):
    shutil.copytree(sit_run, tmp_path, dirs_exist_ok=True)  # dit.pt names the tokenizer of sit_run
    # the same config, other weights: refused unless forced
    other = torch.load(tmp_path / "tokenizer.pt", weights_only=False)
    other["model"] = {k: v + 0.01 for k, v in other["model"].items()}
    H.atomic_save(other, str(tmp_path / "other.pt"))  # with its own checksums
    common = [f"--ckpt={tmp_path / 'dit.pt'}", "--num_samples=2", "--steps=2"]
    with pytest.raises(SystemExit, match="comes from another tokenizer than .*other.pt.*--force"):
        S.main(common + [f"--tokenizer={tmp_path / 'other.pt'}", f"--out_dir={tmp_path / 'a'}"])
    S.main(common + [f"--tokenizer={tmp_path / 'other.pt'}", "--force", f"--out_dir={tmp_path / 'a'}"])
    # class names from a file decide no path outside --out_dir
    ckpt = torch.load(tmp_path / "dit.pt", weights_only=False)
    ckpt["class_names"] = ["x/../../../escaped", ".hidden"]
    torch.save(ckpt, tmp_path / "dit.pt")
    S.main(common + [f"--out_dir={tmp_path / 'b'}"])
    assert sorted(os.listdir(tmp_path / "b")) == ["000_x_.._.._.._escaped.mp4", "001_hidden.mp4", "grid.png"]
    assert not (tmp_path.parent / "escaped").exists()


def test_sample_flags_and_seeds_are_checked_before_any_work(tmp_path, sit_run, capsys):
    missing = [f"--ckpt={tmp_path / 'missing.pt'}", f"--out_dir={tmp_path / 'out'}"]  # read only after the checks
    for flag, message in (("--num_samples=1000000000", r"--num_samples must be in \[1, 1,000,001\)"),
                          ("--grid_frames=0", "--grid_frames must be >= 1"), ("--fps=0", "--fps must be >= 1"),
                          ("--fps=-8", "--fps must be >= 1"), ("--diffusion=-1", "--diffusion must be >= 0"),
                          ("--sampler=rk4", "--sampler 'rk4' is not one of"), ("--format=gif", "--format 'gif'")):
        with pytest.raises(SystemExit, match=message):
            S.main([*missing, flag])
    nothing = {S.main: missing, dit.main: [f"--tokens={tmp_path / 'missing.pt'}", f"--out_dir={tmp_path / 'out'}"],
               T.main: [f"--data={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'out'}"]}
    for main, flags in nothing.items():  # seeds are drawn from as seed * 1_000_003 + step
        for seed in (10 ** 29, -1):
            with pytest.raises(SystemExit, match=rf"--seed must be in \[0, 4,294,967,296\), got {seed}"):
                main([*flags, f"--seed={seed}"])
    assert not os.path.exists(tmp_path / "out")
    # --grid_clips 0: no grid, and none claimed
    S.main([f"--ckpt={sit_run / 'dit.pt'}", "--num_samples=1", "--steps=2", "--grid_clips=0",
            f"--out_dir={tmp_path / 'out'}", f"--seed={2 ** 32 - 1}"])
    assert os.listdir(tmp_path / "out") == ["000_still.mp4"] and "grid.png" not in capsys.readouterr().out


def test_a_sit_checkpoint_is_read_lean(tmp_path):
    # a checkpoint whose EMA is small and whose optimizer state is large: only the EMA is read (and
    # checked against its checksums)
    code = """
import sys, torch
sys.path.insert(0, {root!r})
import bench, dit
before = bench.resident_peak_bytes()  # the peak so far: torch and the modules, imported
model, _ = dit.load_dit({path!r})
assert sum(p.numel() for p in model.parameters()) > 0
print(bench.resident_peak_bytes() - before)
"""
    model = dit.SiT(MICRO_SIT, SHAPES, 1)
    H.atomic_save({"kind": "coordtok_dit", "model": model.state_dict(), "ema": model.state_dict(),
                   "optimizer": {"state": {"huge": torch.ones(2 ** 27)}}, "model_config": dataclasses.asdict(MICRO_SIT),
                   "plane_shapes": SHAPES, "num_classes": 1}, str(tmp_path / "dit.pt"))
    out = subprocess.run([sys.executable, "-c", code.format(root=ROOT, path=str(tmp_path / "dit.pt"))],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) < 200 * 2 ** 20                    # far below the 512 MiB the file holds


def test_ctrl_c_finishes_the_step_saves_and_keeps_the_record(tmp_path, monkeypatch, capsys):
    make_tokens_file(tmp_path / "tokens.pt")
    loss_fn, calls = dit.flow_matching_loss, []

    def interrupted_at_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(dit, "flow_matching_loss", interrupted_at_the_second_step)
    with pytest.raises(SystemExit) as stopped:
        dit.main([*MICRO_SIT_FLAGS, f"--tokens={tmp_path / 'tokens.pt'}", f"--out_dir={tmp_path}", "--batch_size=6",
                  "--max_iters=50", "--log_interval=1", "--device=cpu"])
    assert stopped.value.code == 130
    assert f"SIGINT at step 2: saved {tmp_path / 'dit.pt'}" in capsys.readouterr().out
    assert torch.load(tmp_path / "dit.pt", weights_only=False)["step"] == 2
    assert [r["step"] for r in H.read_log(str(tmp_path / "dit_log.jsonl"))] == [1, 2]
