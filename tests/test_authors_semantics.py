"""What the authors' code computes, pinned on small hand-made tensors.

The invariance tests elsewhere (branch off == plain SD, shared reference stream == per-sample
stream) hold for many wrong implementations too. These pin the definitions themselves: the
normalisation epsilons of the pretrained networks, Otsu's threshold, the logits mask, the
regulariser, the reference stream's inputs, classifier-free guidance with the reference in both
branches, the DDIM update, q_sample and the latent scale factor.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]

# (module path pattern, class, epsilon) for every normalisation layer of SD v1 + ViCo. CompVis:
# ResBlocks and the UNet's output use ``normalization`` (GroupNorm32, eps 1e-5), the
# SpatialTransformer its own ``Normalize`` (eps 1e-6), the transformer blocks nn.LayerNorm
# (1e-5), the VAE ``Normalize`` (1e-6); the CLIP text model's layer_norm_eps is 1e-5.
NORM_RULES = [
    (r"model\.diffusion_model\..*\.(in_layers|out_layers)\.0", "GroupNorm32", 1e-5),
    (r"model\.diffusion_model\.out\.0", "GroupNorm32", 1e-5),
    (r"model\.diffusion_model\..*\.\d+\.norm", "GroupNorm32", 1e-6),
    (r"model\.diffusion_model\..*\.(transformer_blocks\.\d+|image_cross_attention)\.norm[123]", "LayerNorm", 1e-5),
    (r"first_stage_model\..*", "GroupNorm", 1e-6),
    (r"cond_stage_model\..*(layer_norm[12]|final_layer_norm)", "LayerNorm", 1e-5),
]


@pytest.fixture(scope="module")
def full_model():
    with torch.device("meta"):
        return instantiate_from_config(OmegaConf.load(ROOT / "configs" / "vico.yaml").model)


def test_every_norm_has_the_pretrained_epsilon(full_model):
    norms = {
        name: module
        for name, module in full_model.named_modules()
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.InstanceNorm2d))
    }
    used = set()
    for name, module in norms.items():
        rules = [rule for rule in NORM_RULES if re.fullmatch(rule[0], name)]
        assert len(rules) == 1, (name, rules)
        _, class_name, eps = rules[0]
        assert (type(module).__name__, module.eps) == (class_name, eps), name
        used.add(rules[0])
    assert used == set(NORM_RULES)
    assert len(norms) == 61 + 48 + 12 + 52 + 25  # UNet GroupNorms, UNet LayerNorms, ViCo, VAE, CLIP
