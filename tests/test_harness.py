"""harness.py: the optimizer step, flags and resumed configs, files written atomically and locked,
configs of other versions, weights fetched and checked, fingerprints."""

import dataclasses
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import urllib.error
import zipfile

import pytest
import torch

import data as D
import eval as E
import harness as H
import tokenizer as T
from conftest import MICRO, ROOT


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
    # a save in progress holds its partial file: a run starting beside it leaves it alone
    with H.atomic_path(str(tmp_path / "other.pt")) as partial:
        open(partial, "wb").write(b"half")
        H.remove_stale_partials(str(tmp_path))
        assert os.path.exists(partial)


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
    assert victim.read_text() == "precious" and not os.path.islink(path) and torch.load(path)["step"] == 3
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


def test_configs_of_another_version_unknown_fields_refused_missing_ones_default_and_named(tmp_path, capsys):
    saved = T.CoordTokConfig(**MICRO).__dict__.copy()
    with pytest.raises(ValueError, match=r"fields this code does not know \(\['warp_speed'\]\)"):
        H.config_from_dict(T.CoordTokConfig, {**saved, "warp_speed": 9}, "old.pt")
    del saved["img_width"], saved["pooled_queries"]  # fields added later: their defaults are what older files did
    config = H.config_from_dict(T.CoordTokConfig, saved, "old.pt")
    assert (config.img_width, config.pooled_queries) == (0, False)
    assert capsys.readouterr().err.splitlines() == ["old.pt predates --img_width: it loads with the default, 0",
                                                    "old.pt predates --pooled_queries: it loads with the default, False"]
    # the same through a checkpoint file
    model = T.CoordTok(T.CoordTokConfig(**MICRO))
    torch.save({"kind": "coordtok_tokenizer", "model": model.state_dict(),
                "model_config": {**MICRO, "pooled_queries": False, "warp_speed": 1}}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"fields this code does not know \(\['warp_speed'\]"):
        T.load_tokenizer(str(tmp_path / "t.pt"))


class Planted:
    """What a planted pickle does when it is unpickled: here, create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cached_weights_are_read_as_tensors_only_and_hash_checked(tmp_path, monkeypatch):
    from conftest import published_lpips_lin, published_vgg16
    from metrics import LPIPS, LPIPS_LIN_URL, VGG16_URL
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


def test_a_run_log_survives_a_torn_line_resumes_without_repeats_and_draws_its_curves(tmp_path, monkeypatch, capsys):
    logged = []
    fake_wandb = type(sys)("wandb")                       # imported only when a project is given
    fake_wandb.init = lambda **kwargs: type("Run", (), {"log": lambda self, r, step: logged.append((step, r))})()
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    log = H.RunLog(str(tmp_path), "tokenizer", 0, True, "my-project")
    for step in (10, 20, 30):
        log.write({"step": step, "loss": 1.0 / step, "psnr": float(step), "held_out_psnr": step + 0.5})
    log.write({"step": 40, "loss": float("nan")})
    log.file.write('{"step": 50, "lo')                     # a kill in the middle of a line
    log.file.flush()
    assert [s for s, _ in logged] == [10, 20, 30, 40]
    path = tmp_path / "tokenizer_log.jsonl"
    assert [r["step"] for r in H.read_log(str(path))] == [10, 20, 30, 40]
    assert json.loads(path.read_text().splitlines()[3]) == {"step": 40, "loss": None}  # strict JSON: no NaN
    resumed = H.RunLog(str(tmp_path), "tokenizer", 20, True)   # the checkpoint was at step 20
    resumed.write({"step": 30, "loss": 0.5})
    resumed.close()
    assert [r["step"] for r in H.read_log(str(path))] == [10, 20, 30]
    svg = (tmp_path / "tokenizer_curves.svg").read_text()
    assert svg.count("<polyline") == 3 and "psnr (red: held out)" in svg   # loss; psnr with held_out_psnr
    (tmp_path / "tokenizer_curves.svg").unlink()
    assert E.main(["--curves", str(tmp_path)]) == [str(tmp_path / "tokenizer_curves.svg")]
    assert (tmp_path / "tokenizer_curves.svg").read_text() == svg
    with pytest.raises(SystemExit, match="holds no \\*_log.jsonl"):
        E.main(["--curves", str(tmp_path / "nothing")])
    assert H.RunLog(str(tmp_path), "dit", 0, False).file is None and not (tmp_path / "dit_log.jsonl").exists()


def test_a_new_config_field_is_one_line_and_older_files_load_with_its_default(capsys):
    import dataclasses
    Extended = dataclasses.make_dataclass("CoordTokConfig", [("time_plane_c", int, 0)], bases=(T.CoordTokConfig,))
    T.validate_config(Extended(**MICRO))                  # an int field defaulting to 0 may be 0
    loaded = H.config_from_dict(Extended, dict(MICRO), "old.pt")
    assert loaded.time_plane_c == 0 and "old.pt predates --time_plane_c" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--block_eps must be a finite number, got nan"):
        T.validate_config(T.CoordTokConfig(block_eps=float("nan")))
    with pytest.raises(ValueError, match="--time_plane_c must be >= 0, got -1"):
        T.validate_config(Extended(time_plane_c=-1))
    T.validate_config(T.CoordTokConfig(enc_layers=0, query_layers=0, dec_layers=0))  # their fields say min 0


# -----------------------------------------------------------------------------
# files that are trusted: checksums, views, non-finite weights, models changed under their weights

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_micro.pt")


def save_tokenizer(path, model, **extra):
    H.atomic_save({"kind": "coordtok_tokenizer", "model": model.state_dict(),
                   "model_config": dataclasses.asdict(model.config), **extra}, str(path))


def flip_byte(path, tensor, index):
    """Flip the bits of one byte of `tensor`'s bytes where the file stores them."""
    raw = bytearray(open(path, "rb").read())
    at = raw.find(tensor.numpy().tobytes())
    assert at >= 0 and raw.find(tensor.numpy().tobytes(), at + 1) < 0
    raw[at + index] ^= 0x40
    open(path, "wb").write(raw)


def test_bit_rot_is_refused_in_what_is_read_and_files_without_checksums_still_load(tmp_path):
    torch.manual_seed(0)
    model, path = T.CoordTok(T.CoordTokConfig(**MICRO)), str(tmp_path / "tokenizer.pt")
    moments = torch.randn(1000)
    save_tokenizer(path, model, optimizer={"state": {0: {"exp_avg": moments}}})
    T.load_tokenizer(path)
    flip_byte(path, moments, 3)        # the optimizer state: not read by a lean read, read on resume
    T.load_tokenizer(path)
    with pytest.raises(ValueError, match="is damaged: optimizer.state.0.exp_avg differs from the checksum"):
        H.load_checkpoint(path, "coordtok_tokenizer")
    flip_byte(path, model.to_pixels.weight.detach(), 3)          # its exponent: a weight of ~1e37
    with pytest.raises(ValueError, match="tokenizer.pt is damaged: model.to_pixels.weight differs from the checksum"):
        T.load_tokenizer(path)
    # a file of before checksums: loads without a word
    torch.save({k: v for k, v in torch.load(path).items() if k != "checksums"}, path)
    assert T.load_tokenizer(path)[0].to_pixels.weight.abs().max() > 1e30
    # a tokens file: a flip in a plane's mantissa, which every field check passes
    planes = (torch.randn(4, 2, 4, 4), torch.randn(4, 2, 6, 4), torch.randn(4, 2, 6, 4))
    clips = {**dict(zip(D.PLANES, planes)), "label": torch.tensor([0, 1, 0, 1]),
             "n_frames": torch.full((4,), 8), "video_index": torch.arange(4), "start": torch.zeros(4)}
    tokens = str(tmp_path / "tokens.pt")
    D.save_tokens(tokens, clips, ["a", "b"], "ckpt.pt", {}, "f00d", [])
    flip_byte(tokens, planes[1], 0)
    with pytest.raises(ValueError, match="tokens.pt' is damaged: z_xt differs from the checksum"):
        D.load_tokens(tokens)


def test_non_finite_weights_are_refused_at_load_and_json_outputs_are_strict(tmp_path, micro_videos):
    import eval as E
    model, path = T.CoordTok(T.CoordTokConfig(**MICRO)), str(tmp_path / "nan.pt")
    with torch.no_grad():
        model.to_pixels.bias[0] = float("nan")
    save_tokenizer(path, model)
    with pytest.raises(SystemExit, match=r"error: the checkpoint weights \['to_pixels.bias'\] are not finite"):
        E.main(["--ckpt", path, "--data", micro_videos, f"--out_dir={tmp_path / 'eval'}"])
    with pytest.raises(SystemExit, match="not finite"):
        T.main(["--stage", "2", "--init_from", path, f"--out_dir={tmp_path / 'stage2'}"])
    assert not os.path.exists(tmp_path / "stage2" / "tokenizer.pt")
    # a metric that is not a number is written as null, which strict parsers read
    E.write_json(str(tmp_path / "out.json"), {"psnr": float("nan"), "fvd": [1.5, float("inf")], "n": 3})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    text = open(tmp_path / "out.json").read()
    assert json.loads(text, parse_constant=refuse) == {"psnr": None, "fvd": [1.5, None], "n": 3}


def test_a_crafted_checkpoint_asking_for_much_memory_is_refused_before_anything_is_built(tmp_path):
    # 65536 frames: position tables of 64 million floats, stored as stride-0 views of one zero
    config = T.CoordTokConfig(**{**MICRO, "num_frames": 65536})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T.CoordTok(config).state_dict().items()}
    state = {k: torch.zeros(()).expand(s) if k.endswith("_pos") else torch.zeros(s) for k, s in shapes.items()}
    torch.save({"kind": "coordtok_tokenizer", "model": state, "model_config": dataclasses.asdict(config)},
               tmp_path / "crafted.pt")
    assert os.path.getsize(tmp_path / "crafted.pt") < 2 ** 20
    with pytest.raises(ValueError, match=r"crafted.pt: model.enc_pos \(1, 65536, 32\) is a strided view"):
        T.load_tokenizer(str(tmp_path / "crafted.pt"))
    # a tensor whose shape asks for more than its storage holds is refused as the file is read
    torch.save({"w": torch.arange(7.0)}, tmp_path / "small.pt")
    with zipfile.ZipFile(tmp_path / "small.pt") as source, zipfile.ZipFile(tmp_path / "oversized.pt", "w") as out:
        for name in source.namelist():
            content = source.read(name)
            out.writestr(name, content.replace(b"K\x07\x85", b"K\xc8\x85") if name.endswith(".pkl") else content)
    with pytest.raises(ValueError, match="oversized.pt is corrupt or not a torch file"):
        H.read_torch_file(str(tmp_path / "oversized.pt"))


def dec_pos_as_buffer(persistent):
    """A changed CoordTok: the decoder's learned position table made a fixed buffer."""
    class Changed(T.CoordTok):
        def __init__(self, config):
            super().__init__(config)
            table = self.dec_pos.detach()
            del self.dec_pos
            self.register_buffer("dec_pos", table, persistent=persistent)
    return Changed


def test_weights_that_would_land_in_a_buffer_or_none_at_all_are_named(tmp_path, monkeypatch):
    tok = torch.load(FIXTURE, weights_only=False)["tokenizer"]
    with pytest.raises(ValueError, match=r"official tokenizer weights .* unexpected \['dec_pos'\]; .*made a buffer"):
        dec_pos_as_buffer(persistent=True).from_official(tok["state_dict"], tok["official_kwargs"])
    # our own files were written from the model's state_dict, buffers included: they fill them
    monkeypatch.setattr(T, "CoordTok", dec_pos_as_buffer(persistent=True))
    save_tokenizer(tmp_path / "buffer.pt", T.CoordTok(T.CoordTokConfig(**MICRO)))
    assert T.load_tokenizer(str(tmp_path / "buffer.pt"))[0].dec_pos.device.type == "cpu"
    # a buffer no file holds would stay on the meta device, where the model was built
    monkeypatch.setattr(T, "CoordTok", dec_pos_as_buffer(persistent=False))
    save_tokenizer(tmp_path / "other.pt", T.CoordTok(T.CoordTokConfig(**MICRO)))
    with pytest.raises(ValueError, match=r"\['dec_pos'\] got no weights from the checkpoint file: left on the meta "
                                         r"device by harness.load_model_file .*make them persistent"):
        T.load_tokenizer(str(tmp_path / "other.pt"))


def test_a_web_page_in_the_download_cache_says_to_delete_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    os.makedirs(tmp_path / "hub" / "checkpoints")
    cached = tmp_path / "hub" / "checkpoints" / "CoordTok_UCF101_1M_50K.pth"
    cached.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    with pytest.raises(ValueError, match="CoordTok_UCF101_1M_50K.pth is corrupt .*delete the cached download and "
                                         "fetch it again"):
        T.load_tokenizer("coordtok_ucf101")
