"""The reproduction harness (scripts/reproduce_miniworld.py): its statistics, the attention
recorder of the generated image, the object-mask proxy, and a --quick run end to end."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import scripts.reproduce_miniworld as rp
from ldm.data.miniworld import ConceptSpec, concept_scene, render
from ldm.evaluation.attention_analysis import TokenAttentionRecorder, colour_mask, proxy_quality, upsampled_mean
from ldm.modules.attention import SpatialTransformer
from scripts.compare_miniworld import compare
from tests.test_vico_unet import inputs, tiny_unet

ROOT = Path(__file__).resolve().parents[1]
CONCEPTS = sorted((ROOT / "configs" / "miniworld" / "concepts").glob("*.yaml"))


# ------------------------------------------------------------------ statistics
def test_mean_and_standard_error_on_hand_made_numbers():
    mean, se = rp.mean_and_se([0.1, 0.3, 0.5])
    assert mean == pytest.approx(0.3) and se == pytest.approx(0.2 / np.sqrt(3))
    assert rp.mean_and_se([0.4]) == (0.4, None)
    assert rp.with_se([0.1, 0.3, 0.5]) == "0.300 ± 0.115"


@pytest.mark.parametrize(
    "b, expected",
    [
        ([0.2, 0.3, 0.4, 0.5], "ahead"),       # +0.1 each: sd 0, beyond any two standard errors
        ([0.0, 0.1, 0.2, 0.3], "behind"),
        ([0.2, 0.1, 0.4, 0.3], "within noise"),  # differences +0.1, -0.1, +0.1, -0.1
    ],
)
def test_verdict_is_two_standard_errors_of_the_paired_difference(b, expected):
    a = [0.1, 0.2, 0.3, 0.4]
    pairs = [({"feature_similarity": x}, {"feature_similarity": y}) for x, y in zip(a, b)]
    comparison = compare(pairs, "feature_similarity")
    if expected == "ahead":  # identical differences have sd 0: beyond two standard errors of 0
        assert comparison.se == pytest.approx(0.0)
    assert rp.verdict(comparison) == expected
    assert rp.verdict(compare(pairs[:1], "feature_similarity")) == rp.ONE_PAIR
    assert rp.verdict(None) == "not measured"


def test_claim_verdicts_on_hand_made_differences():
    def comparison(differences):
        pairs = [({"prompt_fidelity": 0.5}, {"prompt_fidelity": 0.5 + d}) for d in differences]
        return compare(pairs, "prompt_fidelity")

    better = rp.Claim("b beats a", "", "a", "b", "prompt_fidelity")
    no_worse = rp.Claim("b does as well as a", "", "a", "b", "prompt_fidelity", sign=-1)
    assert rp.claim_verdict(better, comparison([0.1, 0.12, 0.09])) == "holds"
    assert rp.claim_verdict(better, comparison([-0.1, -0.12, -0.09])) == "contradicted"
    assert rp.claim_verdict(better, comparison([0.1, -0.1, 0.05])) == "within noise"
    assert rp.claim_verdict(no_worse, comparison([0.1, -0.1, 0.05])) == "holds"
    assert rp.claim_verdict(no_worse, comparison([-0.1, -0.12, -0.09])) == "contradicted"
    assert rp.claim_verdict(better, None) == "not measured"
    assert rp.claim_verdict(better, comparison([0.3])) == rp.ONE_PAIR
    assert all(claim.a in rp.ev.METHODS and claim.b in rp.ev.METHODS for claim in rp.CLAIMS)
    # "1e-5 is enough": the row at 1e-5 (b) must not be behind ViCo at 1e-4 (a)
    (enough,) = [claim for claim in rp.CLAIMS if "1e-5 is enough" in claim.text]
    assert (enough.a, enough.b, enough.sign) == ("vico", "vico-lr1e-5", -1)


# ------------------------------------------------------------------ attention on the generated image
def test_recorder_reads_the_conditional_rows_attention_to_the_token():
    """The hook's map equals the attention probabilities the layer itself computes, for the
    conditional branch only, averaged over calls."""
    unet = tiny_unet(layers=[])
    x, t, context = inputs(4)  # 2 unconditional + 2 conditional rows
    token = 3
    expected: dict[int, list[torch.Tensor]] = {}
    transformers = [m for m in unet.modules() if isinstance(m, SpatialTransformer)]
    handles = []
    for index, transformer in enumerate(transformers):
        def capture(module, args, kwargs, output, index=index):
            _, probs = module.forward(args[0], context=kwargs["context"], return_probs=True)  # no hooks
            expected.setdefault(index, []).append(probs[2:4, :, token])
        handles.append(transformer.transformer_blocks[0].attn2.register_forward_hook(capture, with_kwargs=True))
    recorder = TokenAttentionRecorder(unet, token, n_samples=2)
    with torch.no_grad(), recorder.recording():
        unet(x, t, context)
        unet(x * 0.5, t, context)
    for handle in handles:
        handle.remove()
    maps = recorder.maps()
    assert sorted(maps) == list(range(len(transformers)))
    for index, layer_map in maps.items():
        mean = torch.stack(expected[index]).mean(0)
        assert torch.allclose(layer_map.flatten(1), mean, atol=1e-6)
    picture = upsampled_mean(maps, 16)
    assert picture.shape == (2, 16, 16) and picture.min() == 0 and picture.max() == pytest.approx(1.0)


@pytest.mark.parametrize("spec_path", CONCEPTS, ids=[p.stem for p in CONCEPTS])
def test_the_colour_proxy_finds_the_object_on_renders(spec_path):
    """The proxy of the generated object's mask, measured where the truth is known."""
    spec = ConceptSpec.load(spec_path)
    colours = [part.colour for part in spec.object.halves]
    renders = [render(concept_scene(spec, seed, scene)) for seed in range(3) for scene in ("beach", "grass", "studio")]
    quality = proxy_quality(np.stack([r.image for r in renders]), np.stack([r.mask for r in renders]), colours)
    assert quality > 0.6, quality
    empty = np.zeros((64, 64, 3), dtype=np.uint8)
    assert not colour_mask(empty, colours).any() or "black" in colours


def test_edits_ask_for_a_property_the_concept_lacks():
    for path in CONCEPTS:
        spec = ConceptSpec.load(path)
        edits = rp.edits_for(spec)
        for kind, value in edits.values():
            assert value not in {getattr(part, kind) for part in spec.object.halves}


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_quick_run_makes_every_stage_and_the_report(tmp_path, shipped_miniworld_models):
    out = tmp_path / "reproduce"
    report = tmp_path / "REPRODUCTION.md"
    assert rp.main(["--quick", "--outdir", str(out), "--report", str(report), "--device", "cpu"]) == 0
    text = report.read_text()
    for heading in ("## What is done", "## The paper's claims, in miniature", "## Table 2 in miniature", "## Ablations", "### The S* mask over the course of training",
                    "### S* attention on the generated image", "### Property editing", "### How much of ViCo's picture comes from the reference", "## Table 3 in miniature", "## Pictures"):
        assert heading in text, heading
    for name in rp.QUICK_MAIN:
        assert (out / "seed23" / rp.QUICK_CONCEPT / name / "scores.json").is_file(), name
    assert (tmp_path / "images" / "reproduction" / f"{rp.QUICK_CONCEPT}.png").is_file()
    assert f"concepts with ablation cells: {rp.QUICK_CONCEPT}." in text
    # rerunning keeps what is done: nothing is trained or sampled again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("samples/*.png")}
    assert rp.main(["--quick", "--outdir", str(out), "--report", str(report), "--device", "cpu"]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_bad_stage_is_one_line(capsys):
    assert rp.main(["--stages", "main,everything"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown stage 'everything'") and "\n" not in err


def test_unknown_concept_is_one_line_and_a_subset_is_named_in_the_report(tmp_path, capsys):
    assert rp.main(["--concepts", "candy_star,moon_disc", "--stages", "report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown concept 'moon_disc'") and "\n" not in err
    report = tmp_path / "REPRODUCTION.md"
    assert rp.main(["--outdir", str(tmp_path / "empty"), "--concepts", "candy_star", "--stages", "report", "--report", str(report)]) == 0
    text = report.read_text()
    assert "`python scripts/reproduce_miniworld.py --concepts candy_star`" in text and "concepts candy_star;" in text
    assert "concepts with ablation cells: none yet." in text
