"""What the tests share: the micro configurations, a runner for the command lines, a small video set, and
stand-ins of the published LPIPS weight files (the layouts written out here, not taken from the code)."""

import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import data as D

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# no test downloads: a proxy that refuses every connection makes a command's download fail at once
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **NO_NETWORK}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """In this process too: a download is an error the test sees (tests may patch their own in)."""
    def refuse(url, *args, **kwargs):
        raise RuntimeError(f"a test tried to download {url}")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)

# a tokenizer that trains in seconds on 2 cores: 8 frames of 16x16, (4, 8, 8) planes -> 192 tokens
MICRO = dict(num_frames=8, img_size=16, enc_patch_t=4, enc_patch_s=8, enc_width=32, enc_heads=2,
             enc_layers=1, query_layers=1, triplane_rs=8, triplane_rt=8, triplane_c=4,
             query_patch_s=4, query_patch_t=4, dec_width=32, dec_heads=2, dec_layers=1,
             dec_patch_t=1, dec_patch_s=4, decode_chunk=8)
MICRO_TOKENS = 8 * 8 + 2 * 8 * 8
MICRO_FLAGS = [f"--{k}={v}" for k, v in MICRO.items()]
# val_fraction 0.4 holds out one video of each class of micro_videos (still_002, zoom_000)
MICRO_TRAIN_FLAGS = MICRO_FLAGS + ["--batch_size=2", "--num_samples=32", "--num_workers=0", "--eval_clips=2",
                                   "--log_interval=1", "--warmup_iters=1", "--val_fraction=0.4", "--learning_rate=1e-3"]
# a SiT that trains in seconds
MICRO_SIT_FLAGS = ["--width=32", "--depth=1", "--heads=2"]


def run_script(script, *args, nproc=None, timeout=300, poke=None):
    """python script args, one thread each: the CompletedProcess. With nproc, that many ranks started as
    torchrun starts its workers (RANK, WORLD_SIZE, MASTER_ADDR, ... in their environment), without
    torchrun's own seconds of start-up; like torchrun, the first rank to fail stops the others. Their
    outputs are joined, and the return code is the first failing rank's. poke(ranks) is called while they
    run (to send them a signal, say)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *args]
    if not nproc:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in range(nproc)]
    ranks = [subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT, env={
        **ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r, (out, err) in enumerate(logs)]
    code, deadline = 0, time.monotonic() + timeout
    while any(p.poll() is None for p in ranks):
        if poke:
            poke(ranks)
        code = code or next((p.returncode for p in ranks if p.returncode), 0)
        if code or time.monotonic() > deadline:
            for p in ranks:
                p.kill()
        time.sleep(0.05)
    if not code and time.monotonic() > deadline:
        raise subprocess.TimeoutExpired(cmd, timeout)
    code = code or next((p.returncode for p in ranks if p.returncode), 0)
    text = [[f.seek(0) or f.read() for f in pair] for pair in logs]
    return subprocess.CompletedProcess(cmd, code, "".join(out for out, _ in text), "".join(err for _, err in text))


@pytest.fixture(scope="session")
def micro_videos(tmp_path_factory):
    """Six synthetic mp4s of 10 frames at 24x24 in two class folders."""
    root = tmp_path_factory.mktemp("videos")
    D.make_synthetic(str(root), num_classes=2, videos_per_class=3, num_frames=10, size=24, seed=1)
    return str(root)


# torchvision's vgg16 `features`: (index, out channels, in channels) of each 3x3 convolution (padding 1), each
# followed by a ReLU at the next index; "M" is a 2x2 max-pool. Its classifier must be ignored by LPIPS.
VGG16_FEATURES = [(0, 64, 3), (2, 64, 64), "M", (5, 128, 64), (7, 128, 128), "M",
                  (10, 256, 128), (12, 256, 256), (14, 256, 256), "M",
                  (17, 512, 256), (19, 512, 512), (21, 512, 512), "M",
                  (24, 512, 512), (26, 512, 512), (28, 512, 512)]
VGG16_CLASSIFIER = {"classifier.0": (4096, 25088), "classifier.3": (4096, 4096), "classifier.6": (1000, 4096)}
# LPIPS v0.1 (VGG): the features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision indices) and
# their channels; the input scaling for images in [-1, 1]; `linK.model.1.weight` of shape (1, C, 1, 1).
LPIPS_TAPS = {3: 64, 8: 128, 15: 256, 22: 512, 29: 512}
LPIPS_SHIFT, LPIPS_SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)


def published_vgg16(seed=0):
    """Random tensors under the key names and shapes of torchvision's vgg16 state dict. The classifier's are
    stride-0 views of one zero (the published shapes in next to no memory)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for layer in VGG16_FEATURES:
        if layer != "M":
            index, c_out, c_in = layer
            state[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen) * (2 / (9 * c_in)) ** 0.5
            state[f"features.{index}.bias"] = torch.randn(c_out, generator=gen) * 0.1
    for name, shape in VGG16_CLASSIFIER.items():
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.zeros(1).expand(shape), torch.zeros(1).expand(shape[0])
    return state


def published_lpips_lin(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for k, c in enumerate(LPIPS_TAPS.values())}


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory):
    """The two stand-in weight files: {"vgg": path, "lin": path}."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(published_vgg16(), folder / "vgg16.pth")
    torch.save(published_lpips_lin(), folder / "vgg.pth")
    return {"vgg": str(folder / "vgg16.pth"), "lin": str(folder / "vgg.pth")}
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread each: two test processes share two cores
    torch.set_num_threads(1)
