"""bench.py: the measure helper reads time and a process's own peak memory; the CPU parts print their rows
and write their numbers; the GPU check runs end to end in its dry-run form; the loader's estimate and the DiT
rows hold their closed-form numbers; bad flags say what to change. No timing assertions: the machine is shared."""

import functools
import json
import math
import os

import pytest
import torch

import bench as B
import dit
import eval as evaluation
import tokenizer as T
from conftest import MICRO_TRAIN_FLAGS
from tokenizer import PRESETS

CPU = torch.device("cpu")


def test_measure_reads_time_and_the_peak_memory_of_a_process_of_its_own():
    # 256 MiB written (so resident) and freed again in each call: only a peak can see them; the 512 MiB this
    # process holds meanwhile are not the measured process's
    parent = torch.ones(2 ** 27)
    r = B.run_alone(CPU, B.measure, functools.partial(torch.ones, 2 ** 26), CPU, 2)
    del parent
    assert 256 * 2 ** 20 <= r["peak_bytes"] < 320 * 2 ** 20
    assert 0 < r["seconds"] < 10 and 0 < r["first_seconds"] < 10 and r["held_bytes"] > 0
    # in a process run_alone did not start, the CPU's peak would not be this call's alone: no number, not a wrong one
    assert B.measure(functools.partial(torch.ones, 16), CPU, 1)["peak_bytes"] is None
    # a measurement whose process dies leaves a row that says so, not a crashed run
    died = B.run_alone(CPU, os._exit, 1)
    assert died == {"error": "its process died (out of memory?)"}
    assert B.cells(died, died) == [died["error"], "-", "-", "-"]


def test_the_cpu_parts_print_their_rows_and_write_their_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    B.main(["--frames", "8", "4", "--batch_size=1", "--parts", "throughput", "scaling", f"--json={out}"])
    lines = capsys.readouterr().out.splitlines()
    scaling = [line.split(" | ") for line in lines if line.startswith(("| 4 |", "| 8 |"))]
    assert [cells[1] for cells in scaling] == ["256", "512"]  # tiny's 32x32 frames in 4x4 patches: 64 a frame
    assert lines.index(next(line for line in lines if "clip grows" in line)) < lines.index(
        next(line for line in lines if "Encode and decode" in line))  # the parts run in their fixed order
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["preset"] == "tiny"
    # the sampled step decodes 1/32 of the longest clip's patches at every length; the full step all of them
    assert [(r["frames"], r["sampled"]["decoded"], r["full"]["decoded"]) for r in results["scaling"]] == [
        (4, 16, 256), (8, 16, 512)]
    longest = results["scaling"][-1]
    assert longest["full"]["peak_bytes"] > longest["sampled"]["peak_bytes"] > 0
    calls = results["throughput"]
    assert list(calls) == ["encode", "decode_video", "decode_frames: 1 of 8"]
    assert calls["decode_video"]["frames_per_s"] == pytest.approx(8 * calls["decode_video"]["clips_per_s"])
    one_frame = calls["decode_frames: 1 of 8"]
    assert one_frame["frames_per_s"] == pytest.approx(one_frame["clips_per_s"])


def test_the_gpu_check_runs_end_to_end_in_its_dry_run(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    B.main(["--preset=large", "--device=cuda", "--dry_run", f"--json={out}"])
    printed = capsys.readouterr().out
    assert "### GPU check" in printed and "### Loader" in printed
    results = json.loads(out.read_text())
    gpu, loader = results["gpu"], results["loader"]
    assert results["device"] == "cpu" and results["dry_run"]
    tiny_patches = math.prod(B.shape_model(PRESETS["tiny"]).grid_size)
    assert gpu["num_samples"] == tiny_patches // 32  # 1/32 of the tiny clip's patches
    assert gpu["largest_batch"] == 4  # the dry run's bound: no CPU runs out of memory at these sizes
    assert gpu["compiled_graphs"] == 1  # batches 2 and 4 share one compiled graph
    assert all(gpu[key]["seconds"] > 0 for key in ("step", "decode", "sample"))
    assert gpu["clips_per_s"] == pytest.approx(4 / gpu["step"]["seconds"])
    assert gpu["mfu"] is None  # a fraction of an H100's peak only means something on a GPU
    # the loader is set against what the check measured
    assert loader["needed_clips_per_s"] == gpu["clips_per_s"] and len(loader["read_paths"]) == 3
    for speed in loader["read_paths"].values():
        assert speed["processes_per_gpu"] == math.ceil(gpu["clips_per_s"] / speed["clips_per_s"])


def test_the_loader_s_estimated_need_of_a_large_step():
    # 40% of an H100's 989 TFLOP/s over forward and backward (3x the forward's matmuls) of 1024 decoded patches
    model = B.shape_model(PRESETS["large"])
    assert B.estimated_clips_per_s(PRESETS["large"]) == pytest.approx(0.4 * 989e12 / (3 * model.flops_per_clip(1024)))


def test_the_dit_rows_set_the_triplane_against_eval_s_grid(monkeypatch):
    paper = B.latents(PRESETS["large"])
    assert paper["triplane"] == {"shape": [(8, 16, 16), (8, 32, 16), (8, 32, 16)], "tokens": 1280}
    assert paper["grid"] == {"shape": [tuple(evaluation.grid_latent_shape(128, 128))], "tokens": 8192}
    # the same transformer on each: 320 and 2048 tokens in 2x2 (for the grid 1x2x2) patches
    sit = dit.SiTConfig(width=32, depth=1, heads=2)
    steps = {latent: B.dit_step(sit, latent, spec["shape"], 1, CPU) for latent, spec in paper.items()}
    assert steps["triplane"]["dit_tokens"] == 320 and steps["grid"]["dit_tokens"] == 2048
    grid, model = torch.randn(1, 4, 32 * 16, 16), B.GridDiT(sit, (4, 32, 16, 16))  # (B, C, T'*H', W')
    assert model((grid,), torch.rand(1), torch.zeros(1, dtype=torch.long))[0].shape == grid.shape
    assert len(model.embeds) == len(model.heads) == 1 and model.pos_t.numel() == 0  # no unused planes' modules
    # the grid is eval's, not a copy of it
    monkeypatch.setattr(evaluation, "grid_latent_shape", lambda frames, size: (4, 3, 2, 2))
    assert B.latents(PRESETS["large"])["grid"] == {"shape": [(4, 3, 2, 2)], "tokens": 12}


def test_bad_flags_say_what_to_change(capsys):
    with pytest.raises(SystemExit) as bad_part:  # argparse prints the message and the choices, exits with 2
        B.main(["--parts", "scaling", "speed"])
    assert bad_part.value.code == 2
    assert "invalid choice: 'speed'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"(?s)--frames 10 .*not divisible by --enc_patch_t 4"):
        B.main(["--frames", "10"])  # the tiny preset's encoder patches are 4 frames long
    with pytest.raises(SystemExit, match=r"too far apart"):
        B.main(["--frames", "4", "256"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match=r"CUDA is not available.*--dry_run"):
            B.main(["--device=cuda", "--preset=large"])


def test_transfer_scores_a_checkpoint_on_its_held_out_clips_and_on_filmed_photographs(tmp_path, micro_videos, capsys):
    T.main([*MICRO_TRAIN_FLAGS, f"--data={micro_videos}", "--max_iters=1", f"--out_dir={tmp_path}"])
    out = tmp_path / "bench.json"
    B.main(["--parts", "transfer", f"--ckpt={tmp_path / 'tokenizer.pt'}", f"--json={out}"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())["transfer"]
    assert list(result) == ["held-out synthetic clips", *(f"photograph: {p}" for p in B.PHOTOS)]
    assert result["held-out synthetic clips"]["clips"] == 2 and result["photograph: coffee"]["clips"] == 1
    for figures in result.values():
        assert 0 < figures["psnr"] < 60 and 0 < figures["yardsticks"]["temporal_mean"] < 60
    assert "| photograph: rocket | 1 |" in printed and "Photographs:" in printed
    B.main(["--parts", "transfer", f"--ckpt={tmp_path / 'none.pt'}"])          # no checkpoint: said, not a crash
    assert "transfer: unavailable" in capsys.readouterr().out
