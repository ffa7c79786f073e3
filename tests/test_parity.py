"""Parity with the authors' models (github.com/huiwon-jang/CoordTok).

tests/fixtures/official_micro.pt holds their CoordTok and SiT at a micro configuration with random weights,
their inputs and their outputs. `CoordTok.from_official` and `SiT.from_official` must reproduce those outputs.
To show that the conversion holds for other configurations too (temporal decoder patches, odd head counts,
non-square planes), this file also states the authors' forward passes in plain torch from their layout
(`reference_*`); the fixture checks those statements, which then check our models on other configurations.
"""

import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F

import dit
import harness as H
import tokenizer as T

pytestmark = pytest.mark.parity  # `python -m pytest -m "not parity"` runs the rest, for changed models

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "official_micro.pt")
TOLERANCE = 1e-4  # max abs error, fp32 on the CPU


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, map_location="cpu", weights_only=False)


# -----------------------------------------------------------------------------
# the authors' layouts and forward passes, stated independently of our modules


def tokenizer_layout(k):
    """Their CoordTok's state dict: name -> shape, for constructor arguments k."""
    (T_, H, W), D, Dd, C = k["video_shape"], k["enc_embed_dim"], k["dec_embed_dim"], k["latent_n_features"]
    rs, rt = k["latent_resolution_xy"], k["latent_resolution_t"]
    ps, pt = k["latent_patch_size_xy"], k["latent_patch_size_t"]
    n_video = (T_ // k["enc_patch_size_t"]) * (H // k["enc_patch_size_xy"]) * (W // k["enc_patch_size_xy"])
    dpt, dps = k["dec_patch_size_t"], k["dec_patch_size_xy"]
    shapes = {"weight_tokens_xy": (1, rs, rs, C), "weight_tokens_yt": (1, rt, rs, C),
              "weight_tokens_xt": (1, rt, rs, C),
              "encoder.cross_pos_emb": (1, n_video, D), "encoder.encoder.cls_token": (1, 1, D),
              "encoder.encoder.pos_emb": (1, n_video, D),
              "encoder.encoder.patch_embed.proj.weight": (D, 3, k["enc_patch_size_t"], k["enc_patch_size_xy"],
                                                          k["enc_patch_size_xy"]),
              "encoder.encoder.patch_embed.proj.bias": (D,), "encoder.encoder.norm.weight": (D,),
              "encoder.encoder.norm.bias": (D,), "encoder.transformer.norm.weight": (D,),
              "encoder.transformer.norm.bias": (D,),
              "decoder.transformer.pos_embed": (1, T_ // dpt, H // dps, W // dps, Dd),
              "decoder.transformer.patch_embed.weight": (Dd, 3 * C), "decoder.transformer.patch_embed.bias": (Dd,),
              "decoder.transformer.norm.weight": (Dd,), "decoder.transformer.norm.bias": (Dd,),
              "decoder.projector.weight": (dpt * dps * dps * 3, Dd), "decoder.projector.bias": (dpt * dps * dps * 3,)}
    for plane, patch in (("xy", (ps, ps)), ("yt", (pt, ps)), ("xt", (pt, ps))):
        shapes[f"encoder.patch_embeds_{plane}.proj.weight"] = (D, C, *patch)
        shapes[f"encoder.patch_embeds_{plane}.proj.bias"] = (D,)
        shapes[f"encoder.projectors_{plane}.weight"] = (math.prod(patch) * C, D)
        shapes[f"encoder.projectors_{plane}.bias"] = (math.prod(patch) * C,)

    def timm_block(prefix, dim, qkv_bias):
        block = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                 "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,), "norm2.weight": (dim,),
                 "norm2.bias": (dim,), "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
                 "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,)}
        if qkv_bias:
            block["attn.qkv.bias"] = (3 * dim,)
        return {f"{prefix}.{name}": shape for name, shape in block.items()}

    for i in range(k["enc_patch_num_layers"]):
        shapes.update(timm_block(f"encoder.encoder.layers.{i}", D, qkv_bias=False))
    for i in range(k["dec_num_layers"]):
        shapes.update(timm_block(f"decoder.transformer.layers.{i}", Dd, qkv_bias=True))
    for i in range(k["enc_num_layers"]):
        p = f"encoder.transformer.layers.{i}"
        for norm in ("norm1", "norm2", "norm3"):
            shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = (D,)
        for attn in ("cross_attn", "self_attn"):
            shapes[f"{p}.{attn}.in_proj_weight"], shapes[f"{p}.{attn}.out_proj.weight"] = (3 * D, D), (D, D)
        shapes.update({f"{p}.mlp.0.weight": (4 * D, D), f"{p}.mlp.0.bias": (4 * D,), f"{p}.mlp.3.weight": (D, 4 * D),
                       f"{p}.mlp.3.bias": (D,)})
    return shapes


def sit_layout(k):
    """Their SiT's state dict: name -> shape (missing arguments: the paper's SiT-L/2)."""
    k = {**H.OFFICIAL_SIT_PAPER_KWARGS, **k}
    (rt, rs), p, D, C = k["input_size"], k["patch_size"], k["hidden_size"], k["in_channels"]
    hidden, c_out = int(D * k["mlp_ratio"]), C * (2 if k["learn_sigma"] else 1)
    shapes = {"pos_embed_xy": (1, (rs // p) ** 2, D), "pos_embed_t": (1, (rt // p) * (rs // p), D),
              "type_embed": (1, 3, D), "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
              "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
              "y_embedder.embedding_table.weight": (k["num_classes"] + (k["class_dropout_prob"] > 0), D)}
    for plane in ("xy", "yt", "xt"):
        shapes.update({f"x_embedder_{plane}.proj.weight": (D, C, p, p), f"x_embedder_{plane}.proj.bias": (D,),
                       f"final_layer_{plane}.linear.weight": (p * p * c_out, D),
                       f"final_layer_{plane}.linear.bias": (p * p * c_out,),
                       f"final_layer_{plane}.adaLN_modulation.1.weight": (2 * D, D),
                       f"final_layer_{plane}.adaLN_modulation.1.bias": (2 * D,)})
    for i in range(k["depth"]):
        shapes.update({f"blocks.{i}.attn.qkv.weight": (3 * D, D), f"blocks.{i}.attn.qkv.bias": (3 * D,),
                       f"blocks.{i}.attn.proj.weight": (D, D), f"blocks.{i}.attn.proj.bias": (D,),
                       f"blocks.{i}.mlp.fc1.weight": (hidden, D), f"blocks.{i}.mlp.fc1.bias": (hidden,),
                       f"blocks.{i}.mlp.fc2.weight": (D, hidden), f"blocks.{i}.mlp.fc2.bias": (D,),
                       f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D),
                       f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,)})
    return shapes


def random_state(layout, seed):
    gen = torch.Generator().manual_seed(seed)
    return {name: 0.3 * torch.randn(shape, generator=gen) for name, shape in layout.items()}


def attend(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, written out: (B, N, D), (B, M, D) x2 -> (B, N, D)."""
    B, N, D = q.shape
    split = lambda x: x.reshape(B, x.shape[1], heads, D // heads).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(D // heads)
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, N, D)


def norm(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def timm_block(x, sd, prefix, heads, eps=1e-6):
    h = norm(x, sd, f"{prefix}.norm1", eps)
    q, k, v = F.linear(h, sd[f"{prefix}.attn.qkv.weight"], sd.get(f"{prefix}.attn.qkv.bias")).chunk(3, dim=-1)
    x = x + F.linear(attend(q, k, v, heads), sd[f"{prefix}.attn.proj.weight"], sd[f"{prefix}.attn.proj.bias"])
    h = F.gelu(F.linear(norm(x, sd, f"{prefix}.norm2", eps), sd[f"{prefix}.mlp.fc1.weight"],
                        sd[f"{prefix}.mlp.fc1.bias"]))
    return x + F.linear(h, sd[f"{prefix}.mlp.fc2.weight"], sd[f"{prefix}.mlp.fc2.bias"])


def torch_mha(x, context, sd, prefix, heads):  # torch's MultiheadAttention without biases
    w_q, w_k, w_v = sd[f"{prefix}.in_proj_weight"].chunk(3)
    out = attend(x @ w_q.T, context @ w_k.T, context @ w_v.T, heads)
    return out @ sd[f"{prefix}.out_proj.weight"].T


def reference_encode(sd, k, video):
    """Their Encoder.forward on full clips: video (B, T, H, W, 3) -> planes xy, yt, xt as (B, R, R', C)."""
    B, heads = video.shape[0], k["enc_num_heads"]
    pt, ps = k["enc_patch_size_t"], k["enc_patch_size_xy"]
    x = F.conv3d(video.permute(0, 4, 1, 2, 3), sd["encoder.encoder.patch_embed.proj.weight"],
                 sd["encoder.encoder.patch_embed.proj.bias"], stride=(pt, ps, ps))     # (B, D, T', H', W')
    x = x.flatten(2).transpose(1, 2) + sd["encoder.encoder.pos_emb"]                    # tokens (t, row, col)
    x = torch.cat([sd["encoder.encoder.cls_token"].expand(B, -1, -1), x], dim=1)
    for i in range(k["enc_patch_num_layers"]):
        x = timm_block(x, sd, f"encoder.encoder.layers.{i}", heads)
    video_tokens = norm(x[:, 1:], sd, "encoder.encoder.norm", 1e-5) + sd["encoder.cross_pos_emb"]
    rs, rt, lps, lpt, C = (k[n] for n in ("latent_resolution_xy", "latent_resolution_t", "latent_patch_size_xy",
                                          "latent_patch_size_t", "latent_n_features"))
    patches = {"xy": (lps, lps), "yt": (lpt, lps), "xt": (lpt, lps)}
    queries = [F.conv2d(sd[f"weight_tokens_{p}"].permute(0, 3, 1, 2), sd[f"encoder.patch_embeds_{p}.proj.weight"],
                        sd[f"encoder.patch_embeds_{p}.proj.bias"], stride=patches[p]).flatten(2).transpose(1, 2)
               for p in ("xy", "yt", "xt")]
    counts = [q.shape[1] for q in queries]
    q = torch.cat(queries, dim=1).expand(B, -1, -1)
    for i in range(k["enc_num_layers"]):
        p = f"encoder.transformer.layers.{i}"
        q = q + torch_mha(norm(q, sd, f"{p}.norm1", 1e-6), video_tokens, sd, f"{p}.cross_attn", heads)
        h = norm(q, sd, f"{p}.norm2", 1e-6)
        q = q + torch_mha(h, h, sd, f"{p}.self_attn", heads)
        h = F.gelu(F.linear(norm(q, sd, f"{p}.norm3", 1e-6), sd[f"{p}.mlp.0.weight"], sd[f"{p}.mlp.0.bias"]))
        q = q + F.linear(h, sd[f"{p}.mlp.3.weight"], sd[f"{p}.mlp.3.bias"])
    q = norm(q, sd, "encoder.transformer.norm", 1e-6)
    planes = []
    for plane, q_plane, rows in zip(("xy", "yt", "xt"), q.split(counts, dim=1), (rs, rt, rt)):
        p1, p2 = patches[plane]
        x = F.linear(q_plane, sd[f"encoder.projectors_{plane}.weight"], sd[f"encoder.projectors_{plane}.bias"])
        x = x.reshape(B, rows // p1, rs // p2, p1, p2, C).permute(0, 1, 3, 2, 4, 5)
        planes.append(x.reshape(B, rows, rs, C))
    return planes


def reference_decode(sd, k, planes, patch_index):
    """Their Decoder.sample_tokens: planes xy, yt, xt (B, R, R', C); patch_index (B, N, 3) integer (t, row, col)."""
    (T_, H, W), heads = k["video_shape"], k["dec_num_heads"]
    grid = torch.tensor([T_ // k["dec_patch_size_t"], H // k["dec_patch_size_xy"], W // k["dec_patch_size_xy"]])
    coords = patch_index.float() / (grid - 1)                                          # their input: in [0, 1]
    B = coords.shape[0]

    def bilinear(plane, uv):  # uv (B, N, 2) in [0, 1] over (rows, cols) of plane (B, R, R', C)
        size = torch.tensor(plane.shape[1:3])
        pos = uv * (size - 1)
        lo = pos.floor().long()
        hi = torch.minimum(lo + 1, size - 1)
        frac = pos - lo
        b = torch.arange(B)[:, None]
        at = lambda r, c: plane[b, r, c]
        top = at(lo[..., 0], lo[..., 1]) * (1 - frac[..., 1:]) + at(lo[..., 0], hi[..., 1]) * frac[..., 1:]
        bottom = at(hi[..., 0], lo[..., 1]) * (1 - frac[..., 1:]) + at(hi[..., 0], hi[..., 1]) * frac[..., 1:]
        return top * (1 - frac[..., :1]) + bottom * frac[..., :1]

    xy, yt, xt = planes
    features = torch.cat([bilinear(xy, coords[..., [1, 2]]), bilinear(yt, coords[..., [0, 2]]),
                          bilinear(xt, coords[..., [0, 1]])], dim=-1)
    x = F.linear(features, sd["decoder.transformer.patch_embed.weight"], sd["decoder.transformer.patch_embed.bias"])
    index = (coords * (grid - 1)).long()
    x = x + sd["decoder.transformer.pos_embed"][0, index[..., 0], index[..., 1], index[..., 2]]
    for i in range(k["dec_num_layers"]):
        x = timm_block(x, sd, f"decoder.transformer.layers.{i}", heads)
    x = norm(x, sd, "decoder.transformer.norm", 1e-5)
    return F.linear(x, sd["decoder.projector.weight"], sd["decoder.projector.bias"])


def reference_sit(sd, k, planes, t, y):
    """Their SiT.forward: planes xy, yt, xt (B, C, R, R') -> velocities of the same shapes."""
    k = {**H.OFFICIAL_SIT_PAPER_KWARGS, **k}
    p, heads, C = k["patch_size"], k["num_heads"], k["in_channels"]
    embed = lambda z, name: F.conv2d(z, sd[f"x_embedder_{name}.proj.weight"], sd[f"x_embedder_{name}.proj.bias"],
                                     stride=p).flatten(2).transpose(1, 2)
    xy, yt, xt = planes
    tokens = [embed(xy, "xy") + sd["pos_embed_xy"] + sd["type_embed"][:, 0],
              embed(yt, "yt") + sd["pos_embed_t"] + sd["type_embed"][:, 1],
              embed(xt, "xt") + sd["pos_embed_t"] + sd["type_embed"][:, 2]]
    counts = [n.shape[1] for n in tokens]
    x = torch.cat(tokens, dim=1)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    t_freq = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=-1)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]
    modulated = lambda x, shift, scale: F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    for i in range(k["depth"]):
        b = f"blocks.{i}"
        mod = F.linear(F.silu(c), sd[f"{b}.adaLN_modulation.1.weight"], sd[f"{b}.adaLN_modulation.1.bias"]).chunk(6, 1)
        qkv = F.linear(modulated(x, mod[0], mod[1]), sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"])
        q, kk, v = qkv.chunk(3, -1)
        attended = F.linear(attend(q, kk, v, heads), sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"])
        x = x + mod[2][:, None] * attended
        h = F.gelu(F.linear(modulated(x, mod[3], mod[4]), sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"]),
                   approximate="tanh")
        x = x + mod[5][:, None] * F.linear(h, sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"])
    out = []
    for name, x_plane, z in zip(("xy", "yt", "xt"), x.split(counts, dim=1), planes):
        f = f"final_layer_{name}"
        modulation = F.linear(F.silu(c), sd[f"{f}.adaLN_modulation.1.weight"], sd[f"{f}.adaLN_modulation.1.bias"])
        shift, scale = modulation.chunk(2, 1)
        x_plane = F.linear(modulated(x_plane, shift, scale), sd[f"{f}.linear.weight"], sd[f"{f}.linear.bias"])
        B, _, rows, cols = z.shape
        c_out = x_plane.shape[-1] // p ** 2
        x_plane = x_plane.reshape(B, rows // p, cols // p, p, p, c_out)
        out.append(torch.einsum("nhwpqc->nchpwq", x_plane).reshape(B, c_out, rows, cols)[:, :C])
    return out


def channels_last(planes):
    return [z.permute(0, 2, 3, 1) for z in planes]


def max_error(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# -----------------------------------------------------------------------------
# the fixture: the authors' outputs


def test_the_stated_layouts_and_forward_passes_are_the_authors(fixture):
    tok, sit = fixture["tokenizer"], fixture["sit"]
    assert {k: tuple(v.shape) for k, v in tok["state_dict"].items()} == tokenizer_layout(tok["official_kwargs"])
    assert {k: tuple(v.shape) for k, v in sit["state_dict"].items()} == sit_layout(sit["official_kwargs"])
    with torch.no_grad():
        planes = reference_encode(tok["state_dict"], tok["official_kwargs"], tok["video"])
        assert max_error(planes, tok["planes"]) < TOLERANCE
        patches = reference_decode(tok["state_dict"], tok["official_kwargs"], tok["planes"], tok["patch_index"])
        assert max_error([patches], [tok["patches"]]) < TOLERANCE
        velocity = reference_sit(sit["state_dict"], sit["official_kwargs"], sit["x"], sit["t"], sit["y"])
        assert max_error(velocity, sit["out"]) < TOLERANCE


def test_from_official_reproduces_the_authors_tokenizer(fixture):
    tok = fixture["tokenizer"]
    model = T.CoordTok.from_official(tok["state_dict"], tok["official_kwargs"]).eval()
    n_frames = tok["n_frames"].flatten()                                               # (B,): full clips here
    with torch.no_grad():
        planes = model.encode(tok["video"], n_frames)                                  # ours: (B, C, R, R')
        assert max_error(channels_last(planes), tok["planes"]) < TOLERANCE
        # the decoder alone, on their planes, and the two together
        theirs = [z.permute(0, 3, 1, 2) for z in tok["planes"]]
        assert max_error([model.decode(theirs, tok["patch_index"])], [tok["patches"]]) < TOLERANCE
        assert max_error([model.decode(planes, tok["patch_index"])], [tok["patches"]]) < TOLERANCE
        # a call that queried its coordinates leaves them as they were (theirs scales them in place)
        index = tok["patch_index"].clone()
        model.decode(planes, index)
        assert torch.equal(index, tok["patch_index"])


def test_from_official_reproduces_the_authors_sit(fixture):
    sit = fixture["sit"]
    model = dit.SiT.from_official(sit["state_dict"], sit["official_kwargs"]).eval()
    with torch.no_grad():
        assert max_error(model(sit["x"], sit["t"], sit["y"]), sit["out"]) < TOLERANCE
    # our fixed sin-cos table is theirs
    grid = model.grids[0]
    torch.testing.assert_close(dit.sincos_2d(*grid, model.config.width)[None], sit["state_dict"]["pos_embed_xy"])


# -----------------------------------------------------------------------------
# other configurations, through the stated forward passes


OTHER_TOKENIZERS = [
    # temporal decoder patches, odd head counts (3 and 5), time planes taller than wide
    dict(video_shape=(8, 16, 16), enc_embed_dim=24, enc_num_layers=2, enc_num_heads=3, enc_patch_size_xy=8,
         enc_patch_size_t=4, enc_patch_num_layers=1, latent_resolution_xy=4, latent_resolution_t=8,
         latent_n_features=3, latent_patch_size_xy=2, latent_patch_size_t=4, dec_embed_dim=20, dec_num_layers=2,
         dec_num_heads=5, dec_patch_size_xy=4, dec_patch_size_t=2),
    # a long thin time plane (Rt = 4 Rs), decoder patches four frames deep, one encoder token per frame group
    dict(video_shape=(16, 8, 8), enc_embed_dim=16, enc_num_layers=1, enc_num_heads=1, enc_patch_size_xy=8,
         enc_patch_size_t=2, enc_patch_num_layers=2, latent_resolution_xy=4, latent_resolution_t=16,
         latent_n_features=2, latent_patch_size_xy=2, latent_patch_size_t=8, dec_embed_dim=12, dec_num_layers=1,
         dec_num_heads=3, dec_patch_size_xy=2, dec_patch_size_t=4),
]


@pytest.mark.parametrize("kwargs", OTHER_TOKENIZERS)
def test_from_official_tokenizer_holds_for_other_configurations(kwargs):
    state = random_state(tokenizer_layout({**H.OFFICIAL_PAPER_KWARGS, **kwargs}), seed=1)
    for name in state:  # LayerNorm weights near one, as trained ones are
        if "norm" in name and name.endswith("weight"):
            state[name] += 1
    model = T.CoordTok.from_official(state, kwargs).eval()
    k = {**H.OFFICIAL_PAPER_KWARGS, **kwargs}
    gen = torch.Generator().manual_seed(2)
    video = torch.rand(2, *k["video_shape"], 3, generator=gen) * 2 - 1
    index = torch.stack([torch.randint(0, g, (2, 20), generator=gen) for g in model.grid_size], dim=-1)
    with torch.no_grad():
        theirs = reference_encode(state, k, video)
        ours = model.encode(video)
        assert max_error(channels_last(ours), theirs) < TOLERANCE
        assert max_error([model.decode(ours, index)], [reference_decode(state, k, theirs, index)]) < TOLERANCE


def test_from_official_sit_holds_for_another_configuration():
    # odd heads, rectangular planes, a conditional model with a null class, no variance half, MLP ratio 2
    kwargs = dict(input_size=(8, 4), patch_size=2, in_channels=3, hidden_size=24, depth=2, num_heads=3,
                  mlp_ratio=2.0, class_dropout_prob=0.1, num_classes=5, learn_sigma=False)
    state = random_state(sit_layout(kwargs), seed=3)
    model = dit.SiT.from_official(state, kwargs).eval()
    assert model.null_class == 5 and model.conditional
    gen = torch.Generator().manual_seed(4)
    planes = [torch.randn(3, 3, h, 4, generator=gen) for h in (4, 8, 8)]
    t, y = torch.rand(3, generator=gen), torch.tensor([0, 4, 5])
    with torch.no_grad():
        assert max_error(model(planes, t, y), reference_sit(state, kwargs, planes, t, y)) < TOLERANCE


# -----------------------------------------------------------------------------
# the paper's configuration and the released files' formats


def test_the_paper_presets_are_the_authors_models():
    # the issue's count of the authors' large model, and our presets built without memory
    with torch.device("meta"):
        large = T.CoordTok(T.PRESETS["large"])
        sit = dit.SiT(dit.PRESETS["L/2"], [(8, 16, 16), (8, 32, 16), (8, 32, 16)], num_classes=1)
    assert sum(p.numel() for p in large.parameters()) == 853_410_496
    assert T.CoordTokConfig(**H.official_tokenizer_fields()) == T.PRESETS["large"]                # from_official with no kwargs builds it
    assert sum(p.numel() for p in large.parameters()) == \
        sum(math.prod(s) for s in tokenizer_layout(H.OFFICIAL_PAPER_KWARGS).values())
    assert sum(p.numel() for p in sit.parameters()) == \
        sum(math.prod(s) for s in sit_layout(H.OFFICIAL_SIT_PAPER_KWARGS).values())
    assert large.num_tokens() == 1280 and math.prod(large.enc_grid) == 1024
    assert sum(h * w for h, w in large.query_grids) == 12
    for name, sizes in (("small", (512, 8, 8, 8)), ("base", (768, 12, 8, 12))):  # width, heads, ViT, query blocks
        cfg = T.PRESETS[name]
        assert (cfg.enc_width, cfg.enc_heads, cfg.enc_layers, cfg.query_layers) == sizes
        assert (cfg.dec_width, cfg.dec_heads, cfg.dec_layers) == (sizes[0], sizes[1], sizes[3])
        assert not cfg.pooled_queries


def test_released_file_formats_load_and_anything_else_is_refused(fixture, tmp_path):
    tok, sit = fixture["tokenizer"], fixture["sit"]
    # the tokenizer as train_coordtok.py saves it: DDP-wrapped state dict under "model"
    ddp = {"epoch": 5, "model": {f"module.{k}": v for k, v in tok["state_dict"].items()}, "best_psnr": 20.0}
    torch.save(ddp, tmp_path / "CoordTok.pth")
    model = T.CoordTok.from_official(str(tmp_path / "CoordTok.pth"), tok["official_kwargs"])
    torch.testing.assert_close(model.plane_xy, tok["state_dict"]["weight_tokens_xy"].permute(0, 3, 1, 2))
    # the SiT as train_sit.py saves it: model, ema, opt, args (an argparse.Namespace); the EMA is used
    ema = {k: v + 1 for k, v in sit["state_dict"].items()}
    torch.save({"model": sit["state_dict"], "ema": ema, "opt": {}, "args": argparse.Namespace(model="SiT-L/2")},
               tmp_path / "SiT.pt")
    model = dit.SiT.from_official(str(tmp_path / "SiT.pt"), sit["official_kwargs"])
    torch.testing.assert_close(model.plane_type, ema["type_embed"])
    # wrong files: clear errors
    with pytest.raises(ValueError, match="not the authors' tokenizer"):
        T.CoordTok.from_official(sit["state_dict"], tok["official_kwargs"])
    with pytest.raises(ValueError, match="not the authors' SiT"):
        dit.SiT.from_official(tok["state_dict"])
    with pytest.raises(ValueError, match="do not fit the paper's configuration.*official_kwargs"):
        T.CoordTok.from_official(tok["state_dict"])                     # micro weights, paper-sized model
    with pytest.raises(ValueError, match="unknown official CoordTok arguments"):
        T.CoordTok.from_official(tok["state_dict"], {"video_size": 3})
    with pytest.raises(FileNotFoundError):
        T.CoordTok.from_official(str(tmp_path / "missing.pth"))
    # load_tokenizer and load_dit recognise the released formats (here at the paper's size, on meta tensors)
    with pytest.raises(ValueError, match="neither a tokenizer checkpoint of ours nor the authors'"):
        T.load_tokenizer(str(tmp_path / "SiT.pt"))


def test_the_command_lines_take_the_released_files(fixture, tmp_path, micro_videos, monkeypatch):
    # the released files hold the paper's models; here the fixture's micro models stand in for them, under
    # their own layouts and file formats, with the paper's arguments replaced by the fixture's
    import eval as E
    import sample as S
    tok, sit = fixture["tokenizer"], fixture["sit"]
    monkeypatch.setattr(H, "OFFICIAL_PAPER_KWARGS", {**H.OFFICIAL_PAPER_KWARGS, **tok["official_kwargs"]})
    monkeypatch.setattr(H, "OFFICIAL_SIT_PAPER_KWARGS", {**H.OFFICIAL_SIT_PAPER_KWARGS, **sit["official_kwargs"]})
    released_tokenizer, released_sit = str(tmp_path / "CoordTok_UCF101_1M_50K.pth"), str(tmp_path / "SiT_L_2.pt")
    torch.save({"epoch": 1, "model": {f"module.{k}": v for k, v in tok["state_dict"].items()}}, released_tokenizer)
    torch.save({"model": sit["state_dict"], "ema": sit["state_dict"], "opt": {}, "args": argparse.Namespace()},
               released_sit)
    tokens = str(tmp_path / "tokens.pt")
    T.main(["--encode", tokens, "--init_from", released_tokenizer, "--data", micro_videos, "--num_workers=0"])
    assert T.load_tokenizer(released_tokenizer)[1]["kind"] == "official"
    assert torch.load(tokens, weights_only=False)["z_xt"].shape[1:] == (4, 16, 8)
    with pytest.raises(SystemExit, match="no token statistics; pass --tokens"):
        S.main(["--ckpt", released_sit, "--tokenizer", released_tokenizer, f"--out_dir={tmp_path / 'samples'}"])
    S.main(["--ckpt", released_sit, "--tokenizer", released_tokenizer, "--tokens", tokens, "--num_samples=2",
            "--steps=3", f"--out_dir={tmp_path / 'samples'}"])
    assert sorted(os.listdir(tmp_path / "samples")) == ["000_sample.mp4", "001_sample.mp4", "grid.png"]
    missing = str(tmp_path / "missing")
    result = E.main(["--ckpt", released_tokenizer, "--data", micro_videos, "--num_workers=0", "--i3d", missing,
                     "--lpips_vgg", missing, "--lpips_lin", missing, f"--out_dir={tmp_path / 'eval'}"])
    assert result["split"] == "all" and result["clips"] == 6 and result["psnr"] > 0
