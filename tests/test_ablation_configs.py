"""configs/ablations: each override merges over its base config, builds the intended model and trains."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import main
from ldm.modules.attention import SpatialTransformer
from ldm.util import instantiate_from_config, read_checkpoint
from tests.test_training import setup as setup_training_run

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "ablations"
FULL_DECODER = (8, 10, 12, 14)
TINY_DECODER = (4, 6)
DEFAULT_REG = 5e-4

#: name -> (full-size layers, tiny layers, mask mode, reg weight)
EXPECTED: dict[str, tuple[tuple[int, ...], tuple[int, ...], str, float]] = {
    "textual-inversion": ((), (), "logits", DEFAULT_REG),
    "no-mask": (FULL_DECODER, TINY_DECODER, "none", DEFAULT_REG),
    "no-regularizer": (FULL_DECODER, TINY_DECODER, "logits", 0.0),
    "paper-mask": (FULL_DECODER, TINY_DECODER, "probs", DEFAULT_REG),
    "encoder-layers": ((1, 3, 5), (1,), "logits", DEFAULT_REG),
    "decoder-layers": (FULL_DECODER, TINY_DECODER, "logits", DEFAULT_REG),
    "both-layers": ((1, 3, 5, *FULL_DECODER), (1, *TINY_DECODER), "logits", DEFAULT_REG),
}
#: Layer-choosing ablations, which need their own file for the tiny layout.
LAYER_ABLATIONS = ("encoder-layers", "decoder-layers", "both-layers")
#: Which UNet part each layer ablation patches.
PLACES = {"encoder-layers": {"encoder"}, "decoder-layers": {"decoder"}, "both-layers": {"encoder", "decoder"}}
#: Channels of the tiny config's attention layers (model_channels 32, channel_mult [1, 2]):
#: encoder 0 (32) and 1 (64), middle 2 (64), decoder 3-4 (64) and 5-6 (32).
TINY_WIDTHS = {0: 32, 1: 64, 2: 64, 3: 64, 4: 64, 5: 32, 6: 32}
#: S* is one vector of the tiny text encoder's width (hidden_size 32, num_vectors_per_token 1).
TINY_PLACEHOLDER_SIZE = 32


def ablation_file(name: str, tiny: bool) -> Path:
    return ABLATIONS / "tiny" / f"{name}.yaml" if tiny and name in LAYER_ABLATIONS else ABLATIONS / f"{name}.yaml"


def merged(name: str, tiny: bool) -> DictConfig:
    base = ROOT / "configs" / ("vico-tiny.yaml" if tiny else "vico.yaml")
    return OmegaConf.merge(OmegaConf.load(base), OmegaConf.load(ablation_file(name, tiny)))


def leaves(config: DictConfig) -> dict[str, object]:
    """Every leaf of a config as ``dotted.key -> value`` (lists are leaves: merging replaces them)."""
    flat: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(config), "")
    return flat


def transformer_places(model: torch.nn.Module) -> dict[str, list[SpatialTransformer]]:
    unet = model.model.diffusion_model
    return {
        "encoder": [m for m in unet.input_blocks.modules() if isinstance(m, SpatialTransformer)],
        "middle": [m for m in unet.middle_block.modules() if isinstance(m, SpatialTransformer)],
        "decoder": [m for m in unet.output_blocks.modules() if isinstance(m, SpatialTransformer)],
    }


def check_model(model: torch.nn.Module, name: str, layers: tuple[int, ...], mask: str, reg: float) -> None:
    unet = model.model.diffusion_model
    assert unet.image_attention_layers == layers
    places = transformer_places(model)
    transformers = [t for part in places.values() for t in part]
    patched = [t for t in transformers if t.has_image_attention]
    assert tuple(t.layer_index for t in patched) == layers
    assert {t.image_attention_mask for t in transformers} == {mask}
    assert model.reg_weight == reg
    assert bool(model.image_attention_parameters()) == bool(layers)
    if name in PLACES:
        assert {part for part, members in places.items() if any(t.has_image_attention for t in members)} == PLACES[name]


def test_every_ablation_file_is_covered() -> None:
    assert {p.stem for p in ABLATIONS.glob("*.yaml")} == set(EXPECTED)
    assert {p.stem for p in (ABLATIONS / "tiny").glob("*.yaml")} == set(LAYER_ABLATIONS)


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_override_changes_only_its_keys(name: str, tiny: bool) -> None:
    base = leaves(OmegaConf.load(ROOT / "configs" / ("vico-tiny.yaml" if tiny else "vico.yaml")))
    after = leaves(merged(name, tiny))
    assert set(after) == set(base)
    changed = {key for key in base if base[key] != after[key]}
    allowed = {
        "model.params.unet_config.params.image_attention_layers",
        "model.params.unet_config.params.image_attention_mask",
        "model.params.reg_weight",
    }
    assert changed <= allowed
    if name != "decoder-layers":  # decoder-layers states the default explicitly
        assert changed


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_size_ablation_builds_on_meta(name: str) -> None:
    layers, _, mask, reg = EXPECTED[name]
    with torch.device("meta"):
        model = instantiate_from_config(merged(name, tiny=False).model)
    check_model(model, name, layers, mask, reg)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tiny_ablation_builds(name: str) -> None:
    _, layers, mask, reg = EXPECTED[name]
    model = instantiate_from_config(merged(name, tiny=True).model)
    check_model(model, name, layers, mask, reg)
    optimizer = model.configure_optimizers()
    assert len(optimizer.param_groups) == (2 if layers else 1)


def test_full_size_layer_files_do_not_fit_the_tiny_layout() -> None:
    config = OmegaConf.merge(
        OmegaConf.load(ROOT / "configs" / "vico-tiny.yaml"), OmegaConf.load(ABLATIONS / "both-layers.yaml")
    )
    with pytest.raises(ValueError, match="do not exist"):
        instantiate_from_config(config.model)


def image_attention_size(width: int) -> int:
    """Parameters of one image-attention block, a BasicTransformerBlock of ``width`` channels.

    Two attentions (q, k, v without bias and the output with bias: ``4 w^2 + w`` each), the
    gated feed-forward (``w -> 8w`` and ``4w -> w`` with biases: ``12 w^2 + 9 w``) and three
    LayerNorms (``6 w``).
    """
    return 20 * width**2 + 17 * width


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tiny_ablation_trains_one_step(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)
    _, layers, _, _ = EXPECTED[name]
    tiny = str(ROOT / "configs" / "vico-tiny.yaml")
    # setup passes its own --base first; argparse keeps the last one, the tiny config then the ablation.
    run = setup_training_run(tmp_path, "--base", tiny, str(ablation_file(name, tiny=True)), steps=1)
    main.train(run)
    (metrics,) = run.logdir.glob("metrics/*/metrics.csv")
    with open(metrics, newline="") as handle:
        losses = [float(row["train/loss"]) for row in csv.DictReader(handle) if row["train/loss"]]
    assert len(losses) == 1 and math.isfinite(losses[0])
    expected = TINY_PLACEHOLDER_SIZE + sum(image_attention_size(TINY_WIDTHS[layer]) for layer in layers)
    assert sum(p.numel() for p in run.model.parameters() if p.requires_grad) == expected
    saved = read_checkpoint(run.logdir / "checkpoints" / "last.ckpt")["state_dict"]
    assert sum(v.numel() for v in saved.values()) == expected
