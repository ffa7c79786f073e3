"""SiT and flow matching: the samplers against a closed-form velocity, a small model learning a two-mode
mixture, guidance, zero init, EMA, resume, bad inputs, and dit.py -> sample.py end to end."""

import dataclasses
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

import data as D
import dit
import sample as S
import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a SiT that trains in seconds, and a tokenizer that makes 8 frames of 16x16 from three (4, 8, 8) planes
MICRO_SIT = dit.SiTConfig(width=32, depth=1, heads=2)
MICRO_TOKENIZER = dict(num_frames=8, img_size=16, enc_patch_t=4, enc_patch_s=8, enc_width=32, enc_heads=2,
                       enc_layers=1, query_layers=1, triplane_rs=8, triplane_rt=8, triplane_c=4, query_patch_s=4,
                       query_patch_t=4, dec_width=32, dec_heads=2, dec_layers=1, dec_patch_t=1, dec_patch_s=4,
                       decode_chunk=8)


def run(script, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def pooled_stats(planes):
    """Mean and std of each (plane, channel), pooled over samples and positions."""
    return [(z.transpose(0, 1).flatten(1).mean(1), z.transpose(0, 1).flatten(1).std(1)) for z in planes]


@pytest.mark.parametrize("sampler,steps,shift", [("euler", 100, 1.0), ("heun", 20, 1.0), ("sde", 200, 1.0),
                                                 ("heun", 20, 3.0), ("sde", 200, 3.0)])
def test_every_sampler_maps_noise_to_a_gaussian_with_its_exact_velocity(sampler, steps, shift):
    # data N(mu, sigma^2) per channel: on x_t = (1 - t) noise + t x1 the exact velocity E[x1 - noise | x_t]
    # is mu + (t sigma^2 - (1 - t)) / (t^2 sigma^2 + (1 - t)^2) * (x - t mu)
    shapes = [(2, 4, 4), (2, 6, 4), (2, 6, 4)]
    mu = [torch.tensor([1.5, -2.0]), torch.tensor([0.0, 0.7]), torch.tensor([-0.5, 3.0])]
    sigma = [torch.tensor([0.5, 1.0]), torch.tensor([2.0, 0.3]), torch.tensor([1.2, 0.8])]

    def velocity(x, t):
        t = t[:, None, None, None]
        return tuple(m[:, None, None] + (t * s[:, None, None] ** 2 - (1 - t))
                     / (t ** 2 * s[:, None, None] ** 2 + (1 - t) ** 2) * (xi - t * m[:, None, None])
                     for xi, m, s in zip(x, mu, sigma))

    gen = torch.Generator().manual_seed(0)
    noise = tuple(torch.randn(4000, *s, generator=gen) for s in shapes)
    out = dit.integrate(velocity, noise, sampler, steps, torch.Generator().manual_seed(1), time_shift=shift)
    for (mean, std), m, s in zip(pooled_stats(out), mu, sigma):
        # 64000+ values per channel: sampling error ~0.01 sigma; the tolerances bound the step error
        torch.testing.assert_close(mean, m, rtol=0, atol=0.03 * float(s.max()))
        torch.testing.assert_close(std / s, torch.ones(2), rtol=0, atol=0.03)


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
            group["lr"] = T.lr_at(step, 3e-3, 50, steps, "cosine", 1e-4)
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
    shapes = [(4, 4, 4), (4, 6, 4), (4, 6, 4)]
    model = dit.SiT(dataclasses.replace(MICRO_SIT, class_dropout=0.1), shapes, num_classes=3)
    for p in model.parameters():  # a trained-looking model: nothing zero, the label matters
        torch.nn.init.normal_(p, std=0.2)
    x = tuple(torch.randn(5, *s) for s in shapes)
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


def test_ema_after_one_update_is_the_weighted_average():
    shapes = [(4, 4, 4), (4, 6, 4), (4, 6, 4)]
    old, new = dit.SiT(MICRO_SIT, shapes, 1), dit.SiT(MICRO_SIT, shapes, 1)
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


def test_odd_plane_sizes_and_bad_flags_are_clear_errors():
    with pytest.raises(ValueError, match="z_xt is 5x8, not divisible by --patch_size 2"):
        dit.SiT(MICRO_SIT, [(4, 8, 8), (4, 5, 8), (4, 5, 8)], 1)
    with pytest.raises(ValueError, match="--sampler"):
        dit.integrate(lambda x, t: x, (torch.zeros(1, 1, 2, 2),), "rk4")
    shapes = [(4, 4, 4), (4, 6, 4), (4, 6, 4)]
    model = dit.SiT(dataclasses.replace(MICRO_SIT, class_dropout=0.1), shapes, num_classes=2)
    with pytest.raises(ValueError, match="--class_label 'cats'.*0=discs"):
        S.parse_labels("cats", ["discs", "stars"], 4, model)
    labels, names = S.parse_labels("stars", ["discs", "stars"], 3, model)
    assert labels.tolist() == [1, 1, 1] and names == ["stars"] * 3
    assert S.parse_labels("0", ["discs", "stars"], 2, model)[0].tolist() == [0, 0]
    assert S.parse_labels("", ["discs", "stars"], 3, model)[0].tolist() == [0, 1, 0]
    assert S.parse_labels("none", ["discs", "stars"], 2, model)[0].tolist() == [2, 2]
    no_null = dit.SiT(MICRO_SIT, shapes, num_classes=2)                      # no label dropout: no null class
    with pytest.raises(ValueError, match="--class_label 'none'"):
        S.parse_labels("none", ["discs", "stars"], 2, no_null)


def test_dit_cli_rejects_a_missing_or_foreign_tokens_file(tmp_path):
    with pytest.raises(SystemExit, match="tokenizer.py --encode"):
        dit.main(["--tokens", str(tmp_path / "missing.pt"), "--out_dir", str(tmp_path)])
    torch.save({"kind": "coordtok_tokenizer", "model": {}}, tmp_path / "tokenizer.pt")
    with pytest.raises(SystemExit, match="not a tokens file"):
        dit.main(["--tokens", str(tmp_path / "tokenizer.pt"), "--out_dir", str(tmp_path)])
    assert not (tmp_path / "dit.pt").exists()


def test_png_grid_reads_back_with_an_independent_decoder(tmp_path):
    videos = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 4, 3), dtype=np.uint8)
    grid = S.frame_grid(videos, num_columns=3, zoom=2)                                # frames 0, 2, 4
    assert grid.shape == (2 * 6 * 2, 3 * 4 * 2, 3)
    assert np.array_equal(grid[12:24:2, 8:16:2], videos[1, 2])
    D.write_png(str(tmp_path / "grid.png"), grid)
    with av.open(str(tmp_path / "grid.png")) as container:
        decoded = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(decoded, grid)


def make_tokens_file(path, num_clips=6, num_classes=2):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(num_clips) % num_classes
    planes = tuple(torch.randn(num_clips, 4, h, 8, generator=gen) + labels[:, None, None, None]
                   for h in (8, 6, 6))
    D.save_tokens(str(path), planes, labels, [f"class{i}" for i in range(num_classes)],
                  torch.full((num_clips,), 8), tokenizer_ckpt="unused.pt", tokenizer_config=MICRO_TOKENIZER)


def test_resume_restores_model_ema_optimizer_and_step(tmp_path):
    make_tokens_file(tmp_path / "tokens.pt")
    flags = ["--width=32", "--depth=1", "--heads=2", f"--tokens={tmp_path / 'tokens.pt'}", "--batch_size=4",
             "--warmup_iters=2", "--ckpt_interval=3", "--log_interval=1", "--ema_decay=0.5", "--device=cpu"]
    dit.main(flags + ["--max_iters=6", f"--out_dir={tmp_path / 'full'}"])
    dit.main(flags + ["--max_iters=3", f"--out_dir={tmp_path / 'part'}"])
    dit.main(flags + ["--max_iters=6", f"--out_dir={tmp_path / 'part'}", "--resume"])
    a = torch.load(tmp_path / "full" / "dit.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "dit.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    assert any(not torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])      # the EMA lags the model
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=1e-6)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=0, atol=1e-9)
    assert a["num_classes"] == 2 and a["class_names"] == ["class0", "class1"]
    assert a["plane_shapes"] == [[4, 8, 8], [4, 6, 8], [4, 6, 8]] and set(a["mean"]) == set(D.PLANES)


def test_tokenizer_dit_sample_pipeline_writes_identical_videos_for_one_seed(tmp_path):
    videos = str(tmp_path / "videos")
    D.make_synthetic(videos, num_classes=2, videos_per_class=2, num_frames=10, size=24, seed=1)
    tok_flags = [f"--{k}={v}" for k, v in MICRO_TOKENIZER.items()]
    out = run("tokenizer.py", *tok_flags, f"--data={videos}", f"--out_dir={tmp_path}", "--max_iters=2",
              "--batch_size=2", "--num_samples=16", "--num_workers=0", "--eval_clips=1", "--warmup_iters=1")
    assert out.returncode == 0, out.stderr[-3000:]
    tokens = str(tmp_path / "tokens.pt")
    out = run("tokenizer.py", f"--out_dir={tmp_path}", f"--encode={tokens}", "--num_workers=0")
    assert out.returncode == 0, out.stderr[-3000:]
    out = run("dit.py", f"--tokens={tokens}", f"--out_dir={tmp_path}", "--width=32", "--depth=1", "--heads=2",
              "--max_iters=3", "--batch_size=2", "--warmup_iters=1")
    assert out.returncode == 0, out.stderr[-3000:]
    written = []
    for name in ("a", "b"):
        out = run("sample.py", f"--ckpt={tmp_path / 'dit.pt'}", f"--out_dir={tmp_path / name}", "--num_samples=3",
                  "--batch_size=2", "--steps=4", "--seed=7", "--class_label=", "--cfg_scale=2")
        assert out.returncode == 0, out.stderr[-3000:]
        written.append(sorted(f for f in os.listdir(tmp_path / name) if f.endswith(".mp4")))
    assert written[0] == written[1] and len(written[0]) == 3
    for f in written[0] + ["grid.png"]:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    for f in written[0]:  # the tokenizer's clip: 8 frames of 16x16
        with av.open(str(tmp_path / "a" / f)) as container:
            frames = [fr.to_ndarray(format="rgb24") for fr in container.decode(video=0)]
        assert len(frames) == 8 and frames[0].shape == (16, 16, 3)
    # another seed, other videos
    out = run("sample.py", f"--ckpt={tmp_path / 'dit.pt'}", f"--out_dir={tmp_path / 'c'}", "--num_samples=3",
              "--batch_size=2", "--steps=4", "--seed=8", "--cfg_scale=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "a" / written[0][0]).read_bytes() != (tmp_path / "c" / written[0][0]).read_bytes()
