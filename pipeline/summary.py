"""`deco model summary`: parameter counts and training cost of a model config, built on meta."""
from __future__ import annotations

import torch

from deco.model.config import ModelConfig
from deco.model.deco import count_params
from deco.model.flops import deco_flops


def model_summary(cfg: ModelConfig) -> dict:
    # The meta device allocates nothing, so the 1.1 B config answers in about a second anywhere.
    with torch.device("meta"):
        model = cfg.build()
    flops = deco_flops(cfg)
    dit, decoder = count_params(model.dit), count_params(model.decoder)
    return {
        "params_total": dit + decoder,            # the generator: what sampling loads
        "params_dit": dit,
        "params_decoder": decoder,
        "params_repa_projector": count_params(model.repa_projector),  # training only
        "resolution": cfg.resolution,
        "tokens": (cfg.resolution // cfg.dit.patch_size) ** 2,
        "forward_flops_per_sample": flops.forward,
        "train_flops_per_sample": flops.train,
    }
