"""bench.py at micro sizes: every measurement runs and returns the fields it promises, the training
step decodes what it says, memory is read in a fresh process, failures are reported, and the CLI
prints its tables. No timing assertions: the machine these run on is shared and noisy."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bench as B
import data as D
import dit
from tokenizer import CoordTok, CoordTokConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 8 frames of 16x16: 8 x 4 x 4 = 128 decoder patches per clip
MICRO = dict(num_frames=8, img_size=16, enc_patch_t=4, enc_patch_s=8, enc_width=32, enc_heads=2,
             enc_layers=1, query_layers=1, triplane_rs=8, triplane_rt=8, triplane_c=4,
             query_patch_s=4, query_patch_t=4, dec_width=32, dec_heads=2, dec_layers=1,
             dec_patch_t=1, dec_patch_s=4, decode_chunk=4)
MICRO_CFG = CoordTokConfig(**MICRO)
MICRO_SIT = dataclasses.replace(dit.PRESETS["cpu"], width=32, depth=1, heads=2, patch_size=2)
FAST = dict(warmup=1, repeats=2, time_budget=5.0)
TIMING_KEYS = {"time_s", "times_s", "first_call_s"}


def positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_timing(result, repeats=2):
    assert TIMING_KEYS <= result.keys()
    assert positive_finite(result["time_s"]) and positive_finite(result["first_call_s"])
    assert 1 <= len(result["times_s"]) <= repeats and all(positive_finite(t) for t in result["times_s"])
    assert min(result["times_s"]) <= result["time_s"] <= max(result["times_s"])  # the median
    assert isinstance(result["memory_bytes"], int) and result["memory_bytes"] >= 0
    assert result["process_peak_bytes"] > 0


@pytest.mark.parametrize("mode, decoded, attention", [("sampled", 16, "default"), ("full", 8 * 4 * 4, "default"),
                                                      ("sampled", 16, "math")])
def test_train_step_returns_its_fields(mode, decoded, attention):
    r = B.measure_train_step(MICRO_CFG, mode, num_samples=16, batch_size=2, device="cpu", attention=attention,
                             **FAST)
    check_timing(r)
    assert r["measurement"] == "train_step" and r["mode"] == mode and r["frames"] == 8
    assert r["attention"] == attention
    assert r["decoded_patches"] == decoded and r["clip_patches"] == 128
    # forward + backward = 3 forwards of the matmul FLOPs, for each clip of the batch
    assert r["flops_per_call"] == 3 * CoordTok(MICRO_CFG).flops_per_clip(decoded) * 2
    assert positive_finite(r["tflops_per_s"]) and r["mfu"] is None  # MFU only against a CUDA peak
    n_params = sum(p.numel() for p in CoordTok(MICRO_CFG).parameters())
    assert r["parameter_bytes"] == 4 * n_params
    assert r["optimizer_state_bytes"] >= 2 * 4 * n_params  # AdamW's two moments (and step counters)


def test_train_step_decodes_the_patches_it_claims_with_matching_targets():
    seen = []
    for mode in ("sampled", "full"):
        step, model, _ = B.build_train_step(MICRO_CFG, mode, 16, 2, torch.device("cpu"))
        model.register_forward_pre_hook(lambda m, args: seen.append((mode, *args)))
        params = [p.detach().clone() for p in model.parameters()]
        step()
        assert any(not torch.equal(a, p) for a, p in zip(params, model.parameters())), "AdamW did not step"
    for mode, video, coords, targets in seen:
        assert targets.shape == (2, coords.shape[1], 1 * 4 * 4 * 3)
        # every target is the pixels of the patch at its coordinate, in the same order
        assert torch.equal(targets, D.gather_patches(video, coords, (1, 4, 4)))
        if mode == "full":
            assert torch.equal(coords, D.full_grid((8, 4, 4)).expand(2, -1, -1))
        else:
            assert coords.shape[1] == 16
            flat = (coords[..., 0] * 4 + coords[..., 1]) * 4 + coords[..., 2]
            assert all(len(set(row.tolist())) == 16 for row in flat)  # distinct patches per clip


def test_encode_and_decode_video_throughput_fields():
    for measure in (B.measure_encode, B.measure_decode_video):
        r = measure(MICRO_CFG, batch_size=2, device="cpu", **FAST)
        check_timing(r)
        assert r["clips_per_s"] == pytest.approx(2 / r["time_s"])
        assert r["frames_per_s"] == pytest.approx(8 * r["clips_per_s"])
        assert r["patches_per_s"] == pytest.approx(128 * r["clips_per_s"])


def test_compiled_paths_run():
    # aot_eager traces with dynamo and AOTAutograd like inductor does, without its minutes of codegen
    train = B.measure_train_step(MICRO_CFG, "sampled", 16, 2, "cpu", compile=True, compile_backend="aot_eager", **FAST)
    decode = B.measure_decode_video(MICRO_CFG, 2, "cpu", compile=True, compile_backend="aot_eager", **FAST)
    for r in (train, decode):
        check_timing(r)
        assert r["compiled"] is True


def test_dit_step_on_triplane_and_grid():
    tri = B.measure_dit_step(MICRO_SIT, B.triplane_planes(MICRO_CFG), batch_size=2, device="cpu", **FAST)
    grid = B.measure_dit_step(MICRO_SIT, B.grid_planes(MICRO_CFG), batch_size=2, device="cpu", **FAST)
    for r in (tri, grid):
        check_timing(r)
    assert tri["plane_shapes"] == [[4, 8, 8]] * 3 and tri["tokens"] == 192 and tri["dit_tokens"] == 48
    # (C, T/4, H/8, W/8) = (4, 2, 2, 2) as one plane (4, 2*2, 2)
    assert grid["plane_shapes"] == [[4, 4, 2]] and grid["tokens"] == 8 and grid["dit_tokens"] == 2


def test_paper_clip_token_counts():
    # DESIGN.md: 1280 tokens for 128x128x128, 320 DiT tokens at patch 2; a 4x8x8 grid: 8192 and 2048
    tri, grid = B.triplane_planes(B.PAPER), B.grid_planes(B.PAPER)
    assert tri == [(8, 16, 16), (8, 32, 16), (8, 32, 16)] and B.plane_tokens(tri) == 1280
    assert grid == [(8, 32 * 16, 16)] and B.plane_tokens(grid) == 8192
    assert B.dit_tokens(tri, 2) == 320 and B.dit_tokens(grid, 2) == 2048 and B.dit_tokens(grid, 1) == 8192


def test_time_calls_median_and_budget(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(B.time, "perf_counter", lambda: clock["now"])

    def call():  # each call "takes" 2 s, then 1 s, 3 s, 1 s ... on the fake clock
        clock["now"] += [2.0, 1.0, 3.0, 1.0, 5.0][call.n % 5]
        call.n += 1
    call.n = 0
    r = B.time_calls(call, torch.device("cpu"), warmup=1, repeats=10, time_budget=7.0)
    # the warm-up took 2 s, so 7 s of budget leave int(7 / 2) = 3 timed calls: 1, 3, 1 s
    assert r["first_call_s"] == 2.0 and r["times_s"] == [1.0, 3.0, 1.0] and r["time_s"] == 1.0
    r = B.time_calls(call, torch.device("cpu"), warmup=1, repeats=4, time_budget=0.1)
    assert len(r["times_s"]) == 1  # slower than the budget: still one timed call


def test_memory_meter_sees_a_new_allocation():
    meter = B.MemoryMeter(torch.device("cpu"))
    block = torch.ones(32 * 2 ** 20)  # 128 MiB, written so that it is resident
    r = meter.result()
    assert r["memory_bytes"] >= 120 * 2 ** 20 and r["process_peak_bytes"] > r["memory_bytes"]
    # state that outlives the calls is taken off
    assert meter.result(state_bytes=2 ** 24)["memory_bytes"] == pytest.approx(r["memory_bytes"] - 2 ** 24, abs=2 ** 20)
    del block


def test_run_isolated_measures_in_a_fresh_process():
    r = B.run_isolated("measure_train_step", threads=1, model_config=MICRO_CFG, mode="full", num_samples=16,
                       batch_size=2, device="cpu", **FAST)
    check_timing(r)
    assert r["memory_bytes"] > 0 and r["process_peak_bytes"] > r["memory_bytes"] and r["threads"] == 1


def test_failures_are_reported_not_raised():
    # a clip of 2.4 GB under a 1.5 GiB cap: the worker's allocation fails and says so
    r = B.run_isolated("measure_encode", max_memory_gib=1.5, model_config=MICRO_CFG, batch_size=100_000,
                       device="cpu", **FAST)
    assert r["error"].startswith("out of memory") and "--max_memory_gib" in r["error"]
    with pytest.raises(ValueError, match="num_samples"):
        B.measure_train_step(MICRO_CFG, "sampled", num_samples=129, batch_size=1, **FAST)
    assert B.describe_error(ValueError("mode must be 'sampled'"), 6.0).startswith("ValueError")


def test_profile_ranks_ops_and_groups_them():
    r = B.profile_train_step(MICRO_CFG, num_samples=16, batch_size=2, steps=1, row_limit=5)
    shares = [row["percent"] for row in r["rows"]]
    assert len(r["rows"]) == 5 and shares == sorted(shares, reverse=True) and 0 < shares[0] <= 100
    assert sum(r["group_percent"].values()) == pytest.approx(100, abs=0.01)
    assert B.op_group("aten::addmm").startswith("matrix")
    assert B.op_group("aten::grid_sampler_2d_backward").startswith("patch sampling")
    assert B.op_group("aten::copy_").startswith("data movement")
    assert B.op_group("aten::gelu").startswith("everything else")


def test_cli_prints_the_tables_and_writes_json(tmp_path):
    flags = [f"--{k}={v}" for k, v in MICRO.items() if k != "num_frames"]
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), *flags, "--frames=8,16", "--batch_size=2",
           "--num_samples=16", "--repeats=1", "--threads=1", "--parts=scaling,throughput,dit",
           "--paper_clip=false", "--dit_batch_size=2", f"--json={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "### 1." in text and "### 3." in text and "### 4." in text and "### 2." not in text
    table_1 = [line for line in text.splitlines() if line.startswith(("| 8 |", "| 16 |"))]
    assert len(table_1) == 2 and all(line.count("|") == 11 for line in table_1)
    assert "From 8 to 16 frames: memory of the sampled step" in text
    results = json.loads(out.read_text())
    assert [row["frames"] for row in results["scaling"]] == [8, 16]
    for row in results["scaling"]:
        assert row["sampled"]["decoded_patches"] == 16 and row["full"]["decoded_patches"] == row["frames"] * 16
        assert all("error" not in row[mode] for mode in ("sampled", "full"))
    assert [r["workload"] for r in results["throughput"]] == ["encode", "decode_video"]
    assert len(results["dit"]) == 1 and {"triplane", "grid"} <= results["dit"][0].keys()


def test_cli_rejects_bad_flags_naming_them():
    with pytest.raises(SystemExit) as e:
        B.main(["--frames=10"])  # the tiny preset's encoder patch is 4 frames
    assert "--frames 10" in str(e.value) and "enc_patch_t" in str(e.value)
    with pytest.raises(SystemExit) as e:
        B.main(["--parts=scaling,speed"])
    assert "--parts" in str(e.value) and "throughput" in str(e.value)


def test_scaling_table_says_when_the_full_decode_cannot_run():
    def step(memory_mib, seconds):
        return {"time_s": seconds, "memory_bytes": memory_mib * 2 ** 20, "decoded_patches": 256,
                "clip_patches": 1024, "tflops_per_s": 0.1, "mfu": None, "parameter_bytes": 2 ** 24,
                "optimizer_state_bytes": 2 ** 25}
    oom = {"error": "out of memory (the 6 GiB cap of --max_memory_gib)"}
    rows = [{"frames": 16, "sampled": step(100, 0.2), "full": step(300, 1.0)},
            {"frames": 32, "sampled": step(110, 0.2), "full": step(550, 3.0)},
            {"frames": 64, "sampled": step(130, 0.3), "full": oom}]
    text = "\n".join(B.scaling_table(rows, torch.device("cpu")))
    assert "| 64 | 1024 | 256 | 300.0 ms | 130 MiB | 0.1 | out of memory | out of memory | - | - |" in text
    # linear in the clip: 550 + (550 - 300) / 16 * 32 = 1050 MiB = 1.03 GiB
    assert "cannot run at 64 frames, needs ~1.03 GiB (extrapolated)" in text
    assert "of the full-decode step not measured" in text and "- full decode, 64 frames: out of memory" in text
    assert "memory of the sampled step 1.30x" in text
