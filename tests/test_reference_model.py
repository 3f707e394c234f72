"""The model as the authors' T2I code computes it (spec sections 3-4), and their checkpoints imported.

Nothing of the reference code is used: the checkpoints here are built by the test in their naming
and layout (names and shapes of their PixNerDiT state dict, nested in a Lightning checkpoint), and
the forward they must compute is written out below from the spec, on those names, independently of
model/. The agreement with their own code, run outside this repository, is in the README.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deco.model.decoder import dct_position_code, rope_cos_position_code
from deco.model.layers import rope_2d, rope_positions
from deco.model.text_encoder import TextEncoderConfig
from deco.pipeline.cli.main import main as deco_main
from deco.pipeline.config import ConfigError
from deco.pipeline.reference_import import convert_reference, import_reference, our_name
from deco.pipeline.train.config import load_train_config
from deco.pipeline.train.init_from import init_weights_file
from deco.pipeline.weights import MODEL_KEY, load_weights, save_weights
from train_helpers import TINY_CPU

# A small PixNerDiT: hidden D, heads, image/text blocks, SwiGLU width H, text width E and length L,
# patch p, decoder width w and depth, position-code size F (F^2 values), REPA teacher width C.
D, HEADS, DEPTH, TEXT_DEPTH, H, E, L, P, W, DEC_DEPTH, F_CODE, C = 32, 4, 2, 1, 64, 12, 6, 4, 8, 2, 4, 16
HD = D // HEADS
SETS = ["model.resolution=16", "model.repa.block=1", "text_encoder.path=minilm", "text_encoder.kind=encoder"]


def reference_state(seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    """Random weights under the reference denoiser's names and shapes (zero-initialised ones too)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"s_embedder.proj.weight": (D, 3 * P * P), "s_embedder.proj.bias": (D,),
              "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
              "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
              "y_embedder.proj.weight": (D, E), "y_embedder.proj.bias": (D,), "y_embedder.norm.weight": (D,),
              "y_pos_embedding": (1, L, D),
              "x_embedder.embedder.0.weight": (W, 3 + F_CODE**2), "x_embedder.embedder.0.bias": (W,),
              "dec_net.cond_embed.weight": (P * P * W, D), "dec_net.cond_embed.bias": (P * P * W,),
              "dec_net.input_proj.weight": (W, W), "dec_net.input_proj.bias": (W,),
              "dec_net.final_layer.linear.weight": (3, W), "dec_net.final_layer.linear.bias": (3,)}
    for kind, count in (("blocks", DEPTH), ("text_refine_blocks", TEXT_DEPTH)):
        for i in range(count):
            b = f"{kind}.{i}."
            attn = {b + "attn.qkv_x.weight": (3 * D, D), b + "attn.kv_y.weight": (2 * D, D)} if kind == "blocks" \
                else {b + "attn.qkv.weight": (3 * D, D)}
            shapes |= attn | {b + "norm1.weight": (D,), b + "attn.q_norm.weight": (HD,), b + "attn.k_norm.weight": (HD,),
                              b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,), b + "norm2.weight": (D,),
                              b + "mlp.w12.weight": (2 * H, D), b + "mlp.w3.weight": (D, H),
                              b + "adaLN_modulation.0.weight": (6 * D, D), b + "adaLN_modulation.0.bias": (6 * D,)}
    for i in range(DEC_DEPTH):
        b = f"dec_net.res_blocks.{i}."
        shapes |= {b + "in_ln.weight": (W,), b + "in_ln.bias": (W,), b + "mlp.0.weight": (W, W), b + "mlp.0.bias": (W,),
                   b + "mlp.2.weight": (W, W), b + "mlp.2.bias": (W,),
                   b + "adaLN_modulation.1.weight": (3 * W, W), b + "adaLN_modulation.1.bias": (3 * W,)}
    state = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=gen, dtype=torch.float64)
        scale = 1 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.1
        state[name] = (values * scale + (1.0 if "norm" in name or "in_ln.weight" in name else 0.0)).to(dtype)
    return state


def projector_state(seed: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (D, D), "0.bias": (D,), "2.weight": (D, D), "2.bias": (D,), "4.weight": (C, D), "4.bias": (C,)}
    return {name: (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.1).to(dtype) for name, shape in shapes.items()}


def lightning_state(denoiser: dict, ema: dict, projector: dict) -> dict:
    return {**{"denoiser." + k: v for k, v in denoiser.items()}, **{"ema_denoiser." + k: v for k, v in ema.items()},
            **{"diffusion_trainer.proj.0." + k: v for k, v in projector.items()}}


# -- the forward the spec describes, on the reference's names ---------------------------------------

def rms(x, weight, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def linear(x, ws, name, bias=True):
    return F.linear(x, ws[name + ".weight"], ws[name + ".bias"] if bias else None)


def rotate(x, angles):
    """Complex rotation of channel pairs (x B, N, heads, hd; angles N, hd/2)."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)


def spec_block(ws, b, x, cond, angles=None, text=None):
    batch, n, _ = x.shape
    sh_a, sc_a, g_a, sh_m, sc_m, g_m = linear(cond, ws, b + "adaLN_modulation.0").chunk(6, dim=-1)
    h = rms(x, ws[b + "norm1.weight"]) * (1 + sc_a) + sh_a
    qkv = linear(h, ws, b + ("attn.qkv_x" if text is not None else "attn.qkv"), bias=False)
    q, k, v = qkv.view(batch, n, 3, HEADS, HD).unbind(2)
    q, k = rms(q, ws[b + "attn.q_norm.weight"]), rms(k, ws[b + "attn.k_norm.weight"])
    if angles is not None:
        q, k = rotate(q, angles), rotate(k, angles)
    if text is not None:   # keys/values: image tokens, then this block's projection of the text
        kt, vt = linear(text, ws, b + "attn.kv_y", bias=False).view(batch, -1, 2, HEADS, HD).unbind(2)
        k, v = torch.cat([k, rms(kt, ws[b + "attn.k_norm.weight"])], 1), torch.cat([v, vt], 1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HD)
    attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, n, D)
    x = x + g_a * linear(attn, ws, b + "attn.proj")
    gate, up = linear(rms(x, ws[b + "norm2.weight"]) * (1 + sc_m) + sh_m, ws, b + "mlp.w12", bias=False).chunk(2, -1)
    return x + g_m * F.linear(F.silu(gate) * up, ws[b + "mlp.w3.weight"])


def spec_forward(ws, x, t, y):
    batch, _, height, width = x.shape
    gh, gw = height // P, width // P
    patches = F.unfold(x, P, stride=P).transpose(1, 2)                     # (B, N, 3 p^2), channel-major
    s = linear(patches, ws, "s_embedder.proj")
    half = 128
    args = t[:, None] * torch.exp(-math.log(10.0) * torch.arange(half, dtype=x.dtype) / half)
    c = linear(F.silu(linear(torch.cat([args.cos(), args.sin()], -1), ws, "t_embedder.mlp.0")), ws, "t_embedder.mlp.2")
    cond = F.silu(c)[:, None]
    text = rms(linear(y, ws, "y_embedder.proj"), ws["y_embedder.norm.weight"]) + ws["y_pos_embedding"]
    for i in range(TEXT_DEPTH):
        text = spec_block(ws, f"text_refine_blocks.{i}.", text, cond)
    # RoPE: x positions linspace(0, gh, gw), y positions linspace(0, gw, gh), pairs alternate x, y.
    freqs = 10000.0 ** (-4 * torch.arange(HD // 4, dtype=x.dtype) / HD)
    ys, xs = torch.meshgrid(torch.linspace(0, gw, gh, dtype=x.dtype), torch.linspace(0, gh, gw, dtype=x.dtype),
                            indexing="ij")
    angles = torch.stack([xs.reshape(-1, 1) * freqs, ys.reshape(-1, 1) * freqs], -1).reshape(gh * gw, -1)
    for i in range(DEPTH):
        s = spec_block(ws, f"blocks.{i}.", s, cond, angles, text)
    s = F.silu(c[:, None] + s).reshape(batch * gh * gw, D)
    # Decoder: per pixel [r, g, b, code], code = cos of a rotary table at linspace(0, p, p).
    pixels = patches.reshape(batch * gh * gw, 3, P * P).transpose(1, 2)
    pos = torch.linspace(0, P, P, dtype=x.dtype)
    code_freqs = 10000.0 ** (-4 * torch.arange(F_CODE**2 // 2, dtype=x.dtype) / (2 * F_CODE**2))
    py, px = torch.meshgrid(pos, pos, indexing="ij")
    code = torch.stack([px.reshape(-1, 1) * code_freqs, py.reshape(-1, 1) * code_freqs], -1).reshape(P * P, -1).cos()
    h = linear(linear(torch.cat([pixels, code.expand(len(pixels), -1, -1)], -1), ws, "x_embedder.embedder.0"),
               ws, "dec_net.input_proj")
    pixel_cond = linear(s, ws, "dec_net.cond_embed").reshape(len(s), P * P, W)
    for i in range(DEC_DEPTH):
        b = f"dec_net.res_blocks.{i}."
        shift, scale, gate = linear(F.silu(pixel_cond), ws, b + "adaLN_modulation.1").chunk(3, -1)
        hn = F.layer_norm(h, (W,), ws[b + "in_ln.weight"], ws[b + "in_ln.bias"], eps=1e-6) * (1 + scale) + shift
        h = h + gate * linear(F.silu(linear(hn, ws, b + "mlp.0")), ws, b + "mlp.2")
    out = linear(F.layer_norm(h, (W,), eps=1e-6), ws, "dec_net.final_layer.linear")     # (B*N, p^2, 3)
    out = out.transpose(1, 2).reshape(batch, gh * gw, 3 * P * P).transpose(1, 2)
    return F.fold(out, (height, width), P, stride=P)


def inputs(height, width, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, height, width, generator=gen, dtype=torch.float64).to(dtype),
            torch.rand(2, generator=gen, dtype=torch.float64).to(dtype),
            torch.randn(2, L, E, generator=gen, dtype=torch.float64).to(dtype))


# -- positions and position codes by hand -----------------------------------------------------------

@pytest.mark.parametrize(("grid", "xs", "ys"), [((4, 4), [0, 4 / 3, 8 / 3, 4], [0, 4 / 3, 8 / 3, 4]),      # 64 px
                                                ((2, 4), [0, 2 / 3, 4 / 3, 2], [0, 4])])                 # 32 x 64 px
def test_rope_positions_are_the_reference_linspace(grid, xs, ys):
    x_pos, y_pos = rope_positions(*grid, "reference")
    assert x_pos.tolist() == pytest.approx(xs) and y_pos.tolist() == pytest.approx(ys)
    cos, sin = rope_2d(*grid, head_dim=8, theta=10000.0, dtype=torch.float64)
    freqs = [1.0, 0.01]                           # 10000^(-4k/8)
    for row, y in enumerate(ys):
        for col, x in enumerate(xs):
            angles = torch.tensor([x * freqs[0], y * freqs[0], x * freqs[1], y * freqs[1]], dtype=torch.float64)
            token = row * len(xs) + col
            torch.testing.assert_close(cos[token], angles.cos(), rtol=0, atol=1e-15)
            torch.testing.assert_close(sin[token], angles.sin(), rtol=0, atol=1e-15)
    assert rope_positions(*grid, "arange")[0].tolist() == list(range(grid[1]))


def test_position_codes_by_hand():
    code = rope_cos_position_code(patch=4, freqs=2)           # 2 frequencies (1, 0.01), positions 0..4
    assert code.shape == (16, 4)
    y, x = 4 / 3, 4.0                                         # pixel row 1, column 3
    torch.testing.assert_close(code[1 * 4 + 3], torch.tensor([math.cos(x), math.cos(y), math.cos(x / 100),
                                                              math.cos(y / 100)], dtype=torch.float64))
    paper = rope_cos_position_code(patch=16, freqs=8)         # the T2I decoder's 64 values per pixel
    expected = torch.ones(64, dtype=torch.float64)            # pixel (0, 15): y = 0, x = 16
    expected[0::2] = torch.cos(16 * 10000.0 ** (-torch.arange(32, dtype=torch.float64) / 32))
    torch.testing.assert_close(paper[15], expected, rtol=0, atol=1e-15)
    dct = dct_position_code(patch=8, freqs=8) / 8             # the DCT option: an orthonormal basis
    torch.testing.assert_close(dct.T @ dct, torch.eye(64, dtype=torch.float64))


# -- weight mapping -------------------------------------------------------------------------------------

def test_imported_reference_weights_compute_the_spec_forward_in_float64():
    ws, projector = reference_state(1), projector_state(2)
    cfg, ours = convert_reference(lightning_state(reference_state(9), ws, projector), ema=True, overrides=SETS)
    model = cfg.model.build().double()
    model.load_state_dict(ours)
    model.reset_buffers()
    for height, width in ((16, 16), (8, 24)):                # square and non-square grids
        x, t, y = inputs(height, width, torch.float64)
        with torch.no_grad():
            expected, got = spec_forward(ws, x, t, y), model.eval()(x, t, y)
        assert ((got - expected).norm() / expected.norm()).item() < 1e-12


def test_import_writes_every_tensor_unchanged_and_loads_for_sampling(tmp_path):
    raw, ema, projector = reference_state(3, torch.float32), reference_state(4, torch.float32), projector_state(5, torch.float32)
    ckpt = tmp_path / "t2i_DeCo.ckpt"
    torch.save({"epoch": 2, "global_step": 40, "pytorch-lightning_version": "2.4.0",
                "state_dict": lightning_state(raw, ema, projector), "loops": {"fit_loop": {"state_dict": {}}},
                "optimizer_states": [{"state": {0: {"step": torch.tensor(40.0), "exp_avg": torch.zeros(3)}},
                                      "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.95), "params": [0]}]}],
                "lr_schedulers": []}, ckpt)
    out = tmp_path / "imported.safetensors"
    assert deco_main(["model", "import-reference", "--checkpoint", str(ckpt), "--out", str(out), "--ema",
                      *[arg for s in SETS for arg in ("--set", s)]]) == 0
    with safe_open(str(out), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
        model_cfg = json.loads(f.metadata()[MODEL_KEY])
    # Round trip: every reference tensor is in the file, bit for bit, under its name; nothing else is.
    expected = {our_name(k): v.reshape(v.shape[1:]) if k == "y_pos_embedding" else v for k, v in ema.items()}
    expected |= {f"repa_projector.{k}": v for k, v in projector.items()}
    assert stored.keys() == expected.keys() and all(torch.equal(stored[k], v) for k, v in expected.items())
    assert {"rope_positions": "reference", "mlp_bias": False, "mask_text_padding": False}.items() <= model_cfg["dit"].items()
    assert model_cfg["decoder"]["position_code"] == "rope_cos" and model_cfg["resolution"] == 16
    model, text_cfg = load_weights(out)                      # what `deco sample` and GenEval load
    assert text_cfg.path == "minilm" and model.repa_projector is None
    x, t, y = inputs(8, 16, torch.float32, seed=1)
    with torch.no_grad():
        reference = spec_forward({k: v.double() for k, v in ema.items()}, x.double(), t.double(), y.double())
        assert ((model(x, t, y).double() - reference).norm() / reference.norm()).item() < 1e-5
    import_reference(ckpt, tmp_path / "raw.safetensors", ema=False, overrides=SETS)
    with safe_open(str(tmp_path / "raw.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("dit.patch_embed.weight"), raw["s_embedder.proj.weight"])


def test_import_refuses_leftovers_gaps_and_fixed_fields():
    ws, projector = reference_state(1, torch.float32), projector_state(2, torch.float32)

    def convert(state, overrides=SETS):
        return convert_reference(state, ema=True, overrides=overrides)

    with pytest.raises(ConfigError, match=r"no place in our model: \['ema_denoiser\.blocks\.0\.mlp\.w12\.bias'\]"):
        convert(lightning_state(ws, ws | {"blocks.0.mlp.w12.bias": torch.zeros(2 * H)}, projector))
    with pytest.raises(ConfigError, match=r"missing \['dit\.blocks\.1\.mlp\.down\.weight'\]"):
        convert(lightning_state(ws, {k: v for k, v in ws.items() if k != "blocks.1.mlp.w3.weight"}, projector))
    with pytest.raises(ConfigError, match=r"outside the denoiser and REPA projector: \['vae\.scale'\]"):
        convert(lightning_state(ws, ws, projector) | {"vae.scale": torch.ones(1)})
    with pytest.raises(ConfigError, match="dit.hidden: fixed by the reference checkpoint"):
        convert(lightning_state(ws, ws, projector), [*SETS, "model.dit.hidden=64"])
    with pytest.raises(ConfigError, match="no `ema_denoiser.` tensors"):
        convert({"denoiser." + k: v for k, v in ws.items()})


class Trap:
    """An object a checkpoint should not be able to build: unpickling it would run its code."""
    built = False

    def __init__(self):
        self.payload = "x"     # a non-empty state, so unpickling would call __setstate__

    def __setstate__(self, state):
        Trap.built = True


def test_import_refuses_pickled_objects_without_building_them(tmp_path):
    path = tmp_path / "trap.ckpt"
    torch.save({"state_dict": lightning_state(reference_state(1, torch.float32), {}, {}), "hparams": Trap()}, path)
    with pytest.raises(ConfigError, match=r"refused to unpickle .*Trap"):
        import_reference(path, tmp_path / "out.safetensors", ema=False, overrides=SETS)
    assert not Trap.built and not (tmp_path / "out.safetensors").exists()


# -- variants travel with the weights --------------------------------------------------------------

def test_weights_of_another_variant_are_refused_and_load_as_their_own(tmp_path):
    text = TextEncoderConfig(kind="encoder", path="minilm", max_length=32, dtype="float32")
    run = load_train_config(TINY_CPU)
    variant = load_train_config(TINY_CPU, ["model.decoder.position_code=dct", "model.dit.rope_positions=arange",
                                           "model.dit.mask_text_padding=true"]).model
    torch.manual_seed(0)
    model = variant.build()
    path = save_weights(tmp_path / "dct.safetensors", model, text)
    run.init_from = str(path)
    with pytest.raises(ConfigError, match=r"another model variant .*decoder\.position_code: dct vs rope_cos") as err:
        init_weights_file(run, tmp_path, world=None)
    assert "dit.rope_positions: arange vs reference" in str(err.value) and "\n" not in str(err.value)
    loaded, _ = load_weights(path)                          # built as the variant the file says
    assert (loaded.cfg.decoder.position_code, loaded.cfg.dit.rope_positions) == ("dct", "arange")
    x, t, y = torch.randn(1, 3, 32, 32), torch.rand(1), torch.randn(1, 4, 384)
    assert torch.equal(loaded(x, t, y), model.eval()(x, t, y))
    # A file written before the variant fields existed is refused by name, not half-loaded.
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    legacy = json.loads(metadata[MODEL_KEY])
    del legacy["decoder"]["position_code"]
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={**metadata, MODEL_KEY: json.dumps(legacy)})
    with pytest.raises(ConfigError, match=r"predates the variant fields decoder\.position_code"):
        load_weights(tmp_path / "old.safetensors")
