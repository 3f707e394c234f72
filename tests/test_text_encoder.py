"""The frozen text encoder: real MiniLM (BERT) offline, a tiny random Qwen3, and missing weights."""

import pytest
import torch
import transformers

from deco.model.text_encoder import TextEncoder, TextEncoderConfig, WeightsNotFoundError, minilm_path

PROMPTS = ["a red cube on top of a blue sphere", "two dogs"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoderConfig(kind="encoder", path=minilm_path(), max_length=32, dtype="float32").build()


def test_minilm_shapes_mask_and_zeroed_padding(minilm):
    features, mask = minilm.encode(PROMPTS)
    assert minilm.feature_dim == 384
    assert features.shape == (2, 32, 384) and features.dtype == torch.float32
    assert mask.shape == (2, 32) and mask.dtype == torch.bool
    token_counts = [len(minilm.tokenizer(p)["input_ids"]) for p in PROMPTS]
    assert mask.sum(dim=1).tolist() == token_counts
    # Right padding: valid tokens come first.
    for row, count in zip(mask, token_counts):
        assert row[:count].all() and not row[count:].any()
    assert (features[~mask] == 0).all()
    assert (features[mask].abs().sum(dim=-1) > 0).all()
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())


def test_minilm_valid_features_do_not_depend_on_padding_length(minilm):
    longer = TextEncoder.from_modules(minilm.tokenizer, minilm.model, "encoder", max_length=64)
    features_32, mask_32 = minilm.encode(PROMPTS)
    features_64, mask_64 = longer.encode(PROMPTS)
    assert torch.equal(mask_64[:, :32], mask_32) and not mask_64[:, 32:].any()
    torch.testing.assert_close(features_64[:, :32], features_32, atol=1e-5, rtol=1e-5)


def test_minilm_different_prompts_differ_and_truncation(minilm):
    features, mask = minilm.encode(["a cat", "a dog"])
    assert not torch.allclose(features[0, mask[0]], features[1, mask[1]])
    _, long_mask = minilm.encode(["word " * 100])
    assert long_mask.all()  # truncated at max_length, not an error


def test_minilm_empty_encoding_is_cached(minilm):
    features, mask = minilm.empty_encoding()
    assert features.shape == (1, 32, 384)
    assert mask.sum().item() == 2  # BERT's [CLS] [SEP]
    assert minilm.empty_encoding()[0] is features


def test_frozen_encoder_stays_in_eval_under_parent_train(minilm):
    parent = torch.nn.ModuleDict({"text": minilm})
    parent.train()
    assert not minilm.model.training
    minilm.eval()


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    """A random 2-layer Qwen3 saved as a *ForCausalLM checkpoint, like the real Qwen3-1.7B."""
    path = tmp_path_factory.mktemp("tiny_qwen3")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    config = transformers.Qwen3Config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_qwen3_features_are_final_normed_last_hidden_state(tiny_qwen3):
    path, reference = tiny_qwen3
    encoder = TextEncoderConfig(kind="causal_lm", path=str(path), max_length=16, dtype="float32").build()
    assert isinstance(encoder.model, transformers.Qwen3Model)
    assert encoder.feature_dim == 64
    features, mask = encoder.encode(PROMPTS)
    assert features.shape == (2, 16, 64)

    tokens = encoder.tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt")
    captured = {}
    hook = reference.model.norm.register_forward_hook(lambda m, args, out: captured.update(pre_norm=args[0]))
    with torch.no_grad():
        expected = reference.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state
        renormed = reference.model.norm(captured["pre_norm"])
    hook.remove()
    torch.testing.assert_close(features[mask], expected[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features[mask], renormed[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features[mask], captured["pre_norm"][mask], atol=1e-3)
    assert (features[~mask] == 0).all()


def test_tokenizer_without_pad_token_pads_with_eos(tiny_qwen3):
    path, reference = tiny_qwen3
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.pad_token = None
    encoder = TextEncoder.from_modules(tokenizer, reference.model, "causal_lm", max_length=16)
    assert encoder.tokenizer.pad_token == encoder.tokenizer.eos_token
    features, mask = encoder.encode(PROMPTS)
    assert (features[~mask] == 0).all() and mask.any(dim=1).all()


def test_empty_prompt_without_special_tokens_gives_all_false_mask(tiny_qwen3):
    path, reference = tiny_qwen3
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.backend_tokenizer.post_processor = None  # like Qwen's tokenizer: no BOS/EOS added
    encoder = TextEncoder.from_modules(tokenizer, reference.model, "causal_lm", max_length=8)
    features, mask = encoder.empty_encoding()
    assert not mask.any()
    assert torch.isfinite(features).all() and (features == 0).all()


def test_missing_path_raises_weights_not_found(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(WeightsNotFoundError, match=str(missing)) as info:
        TextEncoderConfig(kind="encoder", path=str(missing)).build()
    assert "huggingface-cli download" in str(info.value)
    with pytest.raises(WeightsNotFoundError, match="not-a-real-org/not-a-real-model"):
        TextEncoderConfig(path="not-a-real-org/not-a-real-model").build()
    with pytest.raises(WeightsNotFoundError, match="no path configured"):
        TextEncoderConfig().build()


def test_config_rejects_unknown_kind_and_dtype():
    with pytest.raises(ValueError, match="causal_lm"):
        TextEncoderConfig(kind="seq2seq")
    with pytest.raises(ValueError, match="bfloat16"):
        TextEncoderConfig(dtype="fp8")


def test_minilm_alias_resolves_to_the_packaged_model():
    from deco.model.text_encoder import TextEncoderConfig, minilm_path

    cfg = TextEncoderConfig(kind="encoder", path="minilm", max_length=16, dtype="float32")
    assert cfg.resolved_path() == minilm_path()
    features, mask = cfg.build().encode(["a red circle"])
    assert features.shape == (1, 16, 384) and mask.sum() > 2
