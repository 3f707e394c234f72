"""Text-padding masks under both attention backends: FlexAttention (BlockMask) against boolean SDPA.

The two must agree to fp32 rounding, ignore padded text exactly, and reduce to the unmasked model
when nothing is padded. torch runs flex eagerly (unfused) on CPU, so these run anywhere; the speed
comparison needs CUDA and lives in benchmarks/attention.py.
"""
import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module
from torch._dynamo.testing import CompileCounter
from torch.nn.attention.flex_attention import BlockMask, create_mask

from deco.model.config import DiTConfig, ModelConfig
from deco.model.layers import rope_2d
from deco.pipeline.config import ConfigError, load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.yaml"
ATOL = 1e-5                      # fp32 rounding: the two kernels sum the softmax in different orders
TEXT_LEN = 12
VALID = (TEXT_LEN, 1, 5, 0)      # no padding, a single valid token, partial, an empty caption

# torch warns once per process that eager flex is unfused; expected here, on CPU.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors this small gain nothing from threads, and on a shared 2-core machine oversubscribed
    # threads made this file several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def tiny_model(backend: str, *overrides: str):
    """The tiny model with padding masked (the reference, and so the default, does not mask),
    identical weights for every backend (same seed), decoder made input-dependent.

    Cached: built once per configuration (tests that backpropagate take a deepcopy)."""
    torch.manual_seed(0)
    cfg = load_config(ModelConfig, TINY, [f"dit.attention_backend={backend}", "dit.mask_text_padding=true", *overrides])
    model = cfg.build()
    with torch.no_grad():
        for block in model.decoder.blocks:   # zero-initialised: the velocity would not see the DiT
            block.adaln.weight.normal_(0, 0.2)
        model.decoder.out.weight.normal_(0, 0.2)
    return model


def batch(valid=VALID, seed=1):
    gen = torch.Generator().manual_seed(seed)
    rows = len(valid)
    x = torch.randn(rows, 3, 32, 32, generator=gen)
    t = torch.rand(rows, generator=gen)
    text = torch.randn(rows, TEXT_LEN, 384, generator=gen)
    mask = torch.arange(TEXT_LEN)[None, :] < torch.tensor(valid)[:, None]
    return x, t, text, mask


def with_garbage_padding(text, mask, seed=2):
    gen = torch.Generator().manual_seed(seed)
    noisy = text.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), text.shape[-1], generator=gen) * 10
    return noisy


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """Let flex_attention record autograd on CPU.

    torch refuses CPU backward only because its compiled CPU kernel returns no logsumexp; eagerly the
    higher-order op runs a dense math forward and backward, which this file checks against SDPA.
    """
    monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


def test_auto_resolves_by_device_and_masks_have_the_backends_type():
    model = tiny_model("auto")
    assert model.dit.attention_backend(torch.device("cpu")) == "sdpa"
    assert model.dit.attention_backend(torch.device("cuda")) == "flex"
    _, _, _, mask = batch()
    assert all(isinstance(m, torch.Tensor) for m in model.dit._masks(mask, 16))
    text_self, image = tiny_model("flex").dit._masks(mask, 16)
    assert isinstance(text_self, BlockMask) and text_self.shape == (4, 1, TEXT_LEN, TEXT_LEN)
    assert isinstance(image, BlockMask) and image.shape == (4, 1, 16, 16 + TEXT_LEN)
    # Nothing to mask: plain SDPA with no mask (the flash kernel on GPU), whatever the backend.
    assert tiny_model("flex").dit._masks(None, 16) == (None, None)
    assert tiny_model("flex", "dit.mask_text_padding=false").dit._masks(mask, 16) == (None, None)


def test_block_masks_equal_the_boolean_masks():
    _, _, _, mask = batch()
    dense = tiny_model("sdpa").dit._masks(mask, 16)
    for block_mask, boolean in zip(tiny_model("flex").dit._masks(mask, 16), dense):
        q_len, kv_len = block_mask.shape[-2:]
        evaluated = create_mask(block_mask.mask_mod, 4, 1, q_len, kv_len, device="cpu")
        assert torch.equal(evaluated, boolean.expand(4, 1, q_len, kv_len))


def test_flex_and_sdpa_masked_forwards_agree():
    x, t, text, mask = batch()
    with torch.no_grad():
        sdpa = tiny_model("sdpa")(x, t, text, mask)
        flex = tiny_model("flex")(x, t, text, mask)
    assert torch.isfinite(flex).all()
    diff = (flex - sdpa).abs().max().item()
    assert diff < ATOL, diff


def test_masked_equals_unmasked_without_padding():
    x, t, text, mask = batch(valid=(TEXT_LEN,) * len(VALID))   # same shapes: no flex recompile
    with torch.no_grad():
        unmasked = tiny_model("sdpa", "dit.mask_text_padding=false")(x, t, text, mask)
        for backend in ("sdpa", "flex"):
            diff = (tiny_model(backend)(x, t, text, mask) - unmasked).abs().max().item()
            assert diff < ATOL, (backend, diff)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_padded_text_features_are_ignored(backend):
    model = tiny_model(backend)
    x, t, text, mask = batch()
    with torch.no_grad():
        base, noisy = model(x, t, text, mask), model(x, t, with_garbage_padding(text, mask), mask)
    diff = (noisy - base).abs().max().item()
    assert diff < ATOL, diff


def test_unmasked_model_sees_padding_so_the_test_above_can_fail():
    model = tiny_model("sdpa", "dit.mask_text_padding=false")
    x, t, text, mask = batch()
    with torch.no_grad():
        base, noisy = model(x, t, text, mask), model(x, t, with_garbage_padding(text, mask), mask)
    per_row = (noisy - base).abs().flatten(1).amax(1)
    assert per_row[0] < ATOL                      # the unpadded caption is unchanged
    assert (per_row[1:] > 1e-3).all(), per_row    # every padded one moves


def test_gradients_agree_and_padding_gets_none(cpu_flex_backward):
    x, t, text, mask = batch()
    grads = {}
    for backend in ("sdpa", "flex"):
        model = copy.deepcopy(tiny_model(backend))
        text_in = text.clone().requires_grad_(True)
        model(x, t, text_in, mask).square().mean().backward()
        grads[backend] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        grads[backend]["text"] = text_in.grad
        assert torch.count_nonzero(text_in.grad[~mask]) == 0      # padding has no influence at all
        assert text_in.grad[mask].abs().amax() > 0
    assert grads["flex"].keys() == grads["sdpa"].keys() and len(grads["sdpa"]) > 100
    for name, sdpa_grad in grads["sdpa"].items():   # relative: gradients here are ~1e-7 to 1e-5
        scale = sdpa_grad.abs().max().item()
        diff = (grads["flex"][name] - sdpa_grad).abs().max().item()
        assert diff <= 1e-5 * scale, (name, diff, scale)


def test_compiled_blocks_take_a_new_block_mask_per_batch_without_recompiling():
    # The engine compiles each block's forward with fullgraph=True and DiT.forward passes a fresh
    # BlockMask (new mask_mod closures) every step: that must neither break the graph nor recompile.
    dit = tiny_model("flex").dit
    text_block, image_block = dit.text_blocks[0], dit.blocks[0]
    counters = [CompileCounter(), CompileCounter()]
    torch._dynamo.reset()
    compiled_text = torch.compile(text_block.forward, fullgraph=True, backend=counters[0])
    compiled_image = torch.compile(image_block.forward, fullgraph=True, backend=counters[1])
    rope = rope_2d(4, 4, dit.cfg.head_dim, dit.cfg.rope_theta)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for valid in [VALID, (3, 7, TEXT_LEN, 2), (1, 1, 1, 1)]:
            _, t, text, mask = batch(valid=valid)
            t_emb = dit.time_embed(t)
            text_tokens = torch.randn(4, TEXT_LEN, 192, generator=gen)
            image_tokens = torch.randn(4, 16, 192, generator=gen)
            text_self, image = dit._masks(mask, 16)
            out = compiled_text(text_tokens, t_emb, None, None, text_self)
            assert (out - text_block(text_tokens, t_emb, None, None, text_self)).abs().max() < ATOL
            out = compiled_image(image_tokens, t_emb, rope, text_tokens, image)
            assert (out - image_block(image_tokens, t_emb, rope, text_tokens, image)).abs().max() < ATOL
    assert [c.frame_count for c in counters] == [1, 1]


def test_wrong_backend_name_is_a_clear_config_error():
    with pytest.raises(ConfigError, match=r"dit.attention_backend='flash' is not one of sdpa, flex, auto"):
        load_config(ModelConfig, TINY, ["dit.attention_backend=flash"])
    with pytest.raises(ValueError, match="dit.attention_backend"):
        DiTConfig(attention_backend="FLEX").validate()
