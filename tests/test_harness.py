"""harness.py: the optimizer step, flags and resumed configs, files written atomically and locked,
configs of other versions, weights fetched and checked, fingerprints."""

import os
import pickle
import shutil
import socket
import subprocess
import sys
import urllib.error

import pytest
import torch

import harness as H
import tokenizer as T
from conftest import MICRO, ROOT


def test_optimizer_step_clips_only_when_asked_and_skips_non_finite_steps(tmp_path):
    weight = torch.nn.Parameter(torch.zeros(2))
    model = torch.nn.Module()
    model.weight = weight
    optimizer = torch.optim.SGD([weight], lr=1.0)
    ckpt = str(tmp_path / "ckpt.pt")
    for grad_clip, expected in ((0.0, [3.0, 4.0]), (1.0, [0.6, 0.8])):  # |g| = 5: 0 means no clipping
        weight.data.zero_()
        weight.grad = torch.tensor([-3.0, -4.0])
        assert H.optimizer_step(model, optimizer, grad_clip, 2, 3, ckpt) == 0  # stepped, count reset
        assert weight.tolist() == pytest.approx(expected)
    weight.grad = torch.tensor([float("nan"), 1.0])
    with pytest.warns(UserWarning, match=r"non-finite.*\(1 in a row\)"):
        assert H.optimizer_step(model, optimizer, 1.0, 0, 3, ckpt) == 1
    assert weight.tolist() == pytest.approx([0.6, 0.8]) and weight.grad is None  # skipped, gradient dropped
    weight.grad = torch.tensor([float("inf"), 1.0])
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="3 non-finite steps.*no checkpoint"):
        H.optimizer_step(model, optimizer, 1.0, 2, 3, ckpt)


def test_parse_config_flags_presets_and_the_explicit_ones():
    argv = ["--preset", "large", "--batch_size=32", "--dec_layers", "2", "--resume"]
    (cfg, tc), explicit = H.parse_config((T.CoordTokConfig, T.TrainConfig), T.PRESETS, argv)
    assert cfg.num_frames == 128 and cfg.dec_layers == 2 and tc.batch_size == 32 and tc.resume is True
    assert explicit == {"preset", "batch_size", "dec_layers", "resume"}
    saved = {"batch_size": 8, "learning_rate": 0.5, "data": "/videos", "resume": False}
    restored, overrides = H.resumed_config(saved, tc, explicit, keep=("resume",))
    assert (restored.batch_size, restored.learning_rate, restored.data, restored.resume) == (32, 0.5, "/videos", True)
    assert overrides == ["  override: --batch_size 32 (the checkpoint had 8)"]
    with pytest.raises(ValueError, match=r"fields this code does not know \(\['warp_speed'\]\)"):
        H.resumed_config({**saved, "warp_speed": 9}, tc, explicit)
    schedule = T.TrainConfig(learning_rate=1.0, warmup_iters=10, max_iters=100, min_lr=0.1)
    assert H.lr_at(0, schedule) == pytest.approx(0.1)
    assert H.lr_at(100, schedule) == pytest.approx(0.1) and H.lr_at(500, schedule) == pytest.approx(0.1)
    assert H.lr_at(55, T.TrainConfig(learning_rate=1.0, warmup_iters=10, max_iters=100, min_lr=0.0)) == \
        pytest.approx(0.5)
    assert H.lr_at(55, T.TrainConfig(learning_rate=1.0, lr_schedule="constant", warmup_iters=0)) == 1.0


def test_atomic_save_keeps_the_last_good_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    H.atomic_save({"step": 1}, path)

    def killed_mid_write(obj, f):
        open(f, "wb").write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        H.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_two_writers_of_one_path_never_share_a_temporary_file_and_links_are_not_followed(tmp_path):
    path = str(tmp_path / "tokens.pt")
    with H.atomic_path(path) as first, H.atomic_path(path) as second:
        assert first != second and os.path.dirname(first) == str(tmp_path)
        assert os.path.basename(first).startswith(".") and first.endswith(".pt")  # hidden, same format
        torch.save({"writer": 2}, second)
        torch.save({"writer": 1}, first)
    assert torch.load(path) == {"writer": 1} and os.listdir(tmp_path) == ["tokens.pt"]  # one writer, whole
    # links planted where a temporary file could go are never written through
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in ("tokens.pt.tmp", ".tokens.partial.pt"):
        os.symlink(victim, tmp_path / name)
    H.atomic_save({"step": 3}, path)
    assert victim.read_text() == "precious" and not os.path.islink(path) and torch.load(path) == {"step": 3}
    assert (os.stat(path).st_mode & 0o777) == 0o666 & ~current_umask()  # the permissions open() would give


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_full_disk_is_said_with_which_file_is_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "tokenizer.pt")
    H.atomic_save({"step": 1}, path)

    def disk_full(obj, f):
        open(f, "wb").write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 28364864 vs 28364756")

    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 0))
    with pytest.raises(OSError, match=r"the disk is full \(0 bytes free\).*tokenizer.pt; the earlier file is intact"):
        H.atomic_save({"step": 2}, path)
    assert os.listdir(tmp_path) == ["tokenizer.pt"]
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1


def test_run_lock_is_held_by_a_live_process_only_whatever_its_file_holds(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "tokenizer.pt")
    lock = str(tmp_path / ".tokenizer.pt.lock")
    note = f"process {os.getpid()} on {socket.gethostname()}"
    for content in (b"", b"not a pid", b"99999999999999999999999 " + socket.gethostname().encode(), b"\xff\xfe\x00",
                    f"{os.getpid()} {socket.gethostname()}".encode()):  # leftovers, and a live pid's note
        with open(lock, "wb") as f:
            f.write(content)
        with H.run_lock(ckpt):
            assert open(lock).read() == note
    # a lock a live process holds refuses, naming it; when that process dies, however, the lock is free
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import harness, time\n"
                               f"with harness.run_lock({ckpt!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=f"another run \\(process {holder.pid} on .*\\) is writing"):
        with H.run_lock(ckpt):
            pass
    holder.kill()
    holder.wait()
    with H.run_lock(ckpt):
        pass
    os.remove(lock)
    os.mkdir(lock)
    with pytest.raises(ValueError, match="is a folder or a link, where a lock file belongs; remove it"):
        with H.run_lock(ckpt):
            pass
    os.rmdir(lock)
    # a disk that is full when the note is written: the lock holds all the same, and no file is left half-made
    real_open = open

    def full_disk_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if path == lock:
            f.write = lambda text: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return f

    monkeypatch.setattr("builtins.open", full_disk_open)
    with H.run_lock(ckpt):
        monkeypatch.undo()
        with pytest.raises(ValueError, match="another run"):
            with H.run_lock(ckpt):
                pass
    assert sorted(os.listdir(tmp_path)) == [".tokenizer.pt.lock"]


def test_configs_of_another_version_are_refused_by_name(tmp_path):
    saved = T.CoordTokConfig(**MICRO).__dict__.copy()
    with pytest.raises(ValueError, match=r"unknown fields \['warp_speed'\], missing \[\]"):
        H.config_from_dict(T.CoordTokConfig, {**saved, "warp_speed": 9}, "old.pt")
    del saved["pooled_queries"]  # no default would say what this checkpoint did: an error, not a guess
    with pytest.raises(ValueError, match=r"missing \['pooled_queries'\]"):
        H.config_from_dict(T.CoordTokConfig, saved, "old.pt")
    saved["pooled_queries"] = True
    del saved["img_width"]       # a field added later, whose default is what older files meant
    assert H.config_from_dict(T.CoordTokConfig, saved, "old.pt").img_width == 0
    # the same through a checkpoint file
    model = T.CoordTok(T.CoordTokConfig(**MICRO))
    torch.save({"kind": "coordtok_tokenizer", "model": model.state_dict(),
                "model_config": {**MICRO, "pooled_queries": False, "warp_speed": 1}}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"another version \(unknown fields \['warp_speed'\]"):
        T.load_tokenizer(str(tmp_path / "t.pt"))


class Planted:
    """What a planted pickle does when it is unpickled: here, create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cached_weights_are_read_as_tensors_only_and_hash_checked(tmp_path, monkeypatch):
    from conftest import published_lpips_lin, published_vgg16
    from eval import LPIPS, LPIPS_LIN_URL, VGG16_URL
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    os.makedirs(hub / "checkpoints")
    ran = tmp_path / "code_ran"
    # a planted torchvision file: its content does not match the hash in its name
    torch.save(published_vgg16(), hub / "checkpoints" / "vgg16-397923af.pth")
    with pytest.raises(H.WeightsUnavailable, match="does not match the hash in its name"):
        H.fetch(VGG16_URL)
    # a planted file without a hash in its name runs nothing: tensors only
    with open(hub / "checkpoints" / "vgg.pth", "wb") as f:
        pickle.dump(Planted(str(ran)), f)
    lin = H.fetch(LPIPS_LIN_URL)
    vgg = tmp_path / "vgg16.pth"
    torch.save(published_vgg16(), vgg)
    with pytest.raises(H.WeightsUnavailable, match="is not a weights file"):
        LPIPS.from_pretrained(str(vgg), lin)
    assert not ran.exists()
    torch.save(published_lpips_lin(), hub / "checkpoints" / "vgg.pth")
    assert LPIPS.from_pretrained(str(vgg), "") is not None


def test_the_authors_files_by_name_fetch_once_and_fail_offline_with_the_url_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cache = str(tmp_path / "hub" / "checkpoints" / "CoordTok_UCF101_1M_50K.pth")
    with pytest.raises(ValueError, match=r"could not fetch https://huggingface.co/huiwon/CoordTok/resolve/main/"
                                         r"CoordTok_UCF101_1M_50K.pth .*download it to " + cache):
        T.load_tokenizer("coordtok_ucf101")
    with pytest.raises(SystemExit, match="CoordTok_SiT_L_2_UCF101_600K.pt"):
        import sample
        sample.main(["--ckpt", "coordtok_sit_l2_ucf101", f"--out_dir={tmp_path / 's'}"])
    # online: fetched once into the cache, then read from it (a stand-in of the authors' layout)
    fixture = torch.load(os.path.join(os.path.dirname(__file__), "fixtures", "official_micro.pt"), weights_only=False)
    monkeypatch.setattr(H, "OFFICIAL_PAPER_KWARGS", {**H.OFFICIAL_PAPER_KWARGS,
                                                     **fixture["tokenizer"]["official_kwargs"]})
    fetched = []

    def download(url, dst, *args, **kwargs):
        fetched.append(url)
        torch.save({"model": fixture["tokenizer"]["state_dict"]}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):
        model, ckpt = T.load_tokenizer("coordtok_ucf101")
        assert ckpt["kind"] == "official" and ckpt["source"] == cache
    assert fetched == [H.RELEASED["coordtok_ucf101"]]


def test_the_fingerprint_names_the_weights():
    torch.manual_seed(0)
    a, b = T.CoordTok(T.CoordTokConfig(**MICRO)), T.CoordTok(T.CoordTokConfig(**MICRO))
    b.load_state_dict(a.state_dict())
    assert H.weights_fingerprint(a) == H.weights_fingerprint(b)
    with torch.no_grad():
        b.to_pixels.bias[0] += 1e-3
    assert H.weights_fingerprint(a) != H.weights_fingerprint(b)
