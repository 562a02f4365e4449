"""Multi-object composition (paper Appendix, Fig. 25): several concepts trained together with one
set of image attention blocks; at sampling one reference per placeholder, each masked by the Otsu
mask of its own placeholder's attention map. One concept through these paths is the single-concept
path, bit for bit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import main
import sample
from ldm.data.images import load_image, to_tensor
from ldm.data.personalized import PersonalizedBase
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import (
    GuidedDenoiser,
    SamplingReference,
    references_for_prompt,
    sample_seeded,
)
from ldm.models.loading import save_adapter
from ldm.modules.attention import SpatialTransformer
from ldm.modules.vico import ReferenceCondition, otsu_mask
from ldm.util import instantiate_from_config, save_state_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "vico-tiny.yaml"
TOY = ROOT / "data" / "monster_toy"
RING = ROOT / "data" / "miniworld" / "sunset_ring"
LATENT = (4, 16, 16)
BOTH = "a photo of * next to @ on the beach"


def tiny_config(placeholders=("*",), init_words=("toy",)):
    config = OmegaConf.load(TINY)
    config.model.params.personalization_config.params.placeholder_strings = list(placeholders)
    config.model.params.personalization_config.params.initializer_words = list(init_words)
    return config


def build(config, weights=None):
    """A tiny model with non-zero output convolutions (every path shows in the outputs)."""
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    with torch.no_grad():
        if weights is not None:
            model.load_state_dict(weights, strict=False)
        else:
            for name, p in model.named_parameters():
                if name.endswith(("proj_out.weight", "out.2.weight", "out_layers.3.weight")):
                    p.normal_(0, 0.05)
            for p in model.embedding_manager.string_to_param_dict.values():
                p.normal_(0, 1)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    """``single``: placeholder '*'; ``double``: '*' and '@', the same weights and the same '*'."""
    single = build(tiny_config())
    double = build(tiny_config(("*", "@"), ("toy", "cat")), weights=single.state_dict())
    with torch.no_grad():
        double.embedding_manager.string_to_param_dict["@"].normal_(0, 1, generator=torch.Generator().manual_seed(9))
    return single, double


def photos(*paths: Path) -> torch.Tensor:
    return to_tensor(np.stack([load_image(p, 64) for p in paths]))


# ---------------------------------------------------------------------- data
def test_one_concept_as_a_list_is_the_single_concept_dataset():
    single = PersonalizedBase(str(TOY), size=16, flip_p=0.5, seed=3)
    listed = PersonalizedBase([str(TOY)], size=16, flip_p=0.5, seed=3, placeholder_token=["*"])
    assert [single[i] for i in range(30)] == [listed[i] for i in range(30)]
    assert torch.equal(single.pixels(), listed.pixels())


def test_two_concepts_take_turns_with_their_own_references_and_placeholders():
    dataset = PersonalizedBase([str(TOY), str(RING)], size=16, flip_p=0.5, seed=1, placeholder_token=["*", "@"], shuffle=False)
    toy, ring = dataset.concept_images(0), dataset.concept_images(1)
    assert len(toy) == 5 and len(ring) == 5 and dataset.pixels().shape[0] == 10
    for i in range(60):
        item = dataset[i]
        own, placeholder = (toy, "*") if i % 2 == 0 else (ring, "@")
        assert item["image_index"] in own and item["reference_index"] in own
        assert item["reference_index"] != item["image_index"]
        assert placeholder in item["caption"] and ("@" if placeholder == "*" else "*") not in item["caption"]
    assert {dataset[i]["image_index"] for i in range(1, 20, 2)} == set(ring)
    with pytest.raises(ValueError, match="one placeholder per folder"):
        PersonalizedBase([str(TOY), str(RING)], size=16, placeholder_token="*")
    with pytest.raises(ValueError, match="repeat"):
        PersonalizedBase([str(TOY), str(RING)], size=16, placeholder_token=["*", "*"])


# ------------------------------------------------------------ exact equality
def test_a_second_concept_does_not_change_the_first_concepts_loss(models):
    """The training loss of a '*' caption is bit-identical with and without a second placeholder."""
    single, double = models
    generator = torch.Generator().manual_seed(4)
    latent = torch.randn(2, *LATENT, generator=generator)
    reference = torch.randn(2, *LATENT, generator=generator)
    noise = torch.randn(2, *LATENT, generator=generator)
    t = torch.tensor([17, 640])
    captions = ["a photo of a *", "a rendering of the *"]
    losses = []
    for model in (single, double):
        tokens = model.tokenize(captions)
        context = model.get_learned_conditioning(tokens)
        condition = model.reference_condition(reference, context, tokens)
        loss, logs = model.p_losses(latent, t, context, condition, noise=noise)
        losses.append((loss, logs["loss_reg"]))
    assert losses[0][1] > 0
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])


def test_one_placeholders_reference_equals_the_single_concept_sampling(models):
    """'--ref *=a --ref @=b' with a prompt naming only '*' samples what '--ref a' samples."""
    single, double = models
    prompt = "a photo of * on the beach"
    refs = photos(TOY / "00.jpg", RING / "00.png")
    used, placeholders = references_for_prompt(double.embedding_manager, double.tokenize([prompt])[0], ["*", "@"])
    assert used == [0] and placeholders == ["*"]
    settings = dict(seeds=[3, 4], reference_seed=7, latent_shape=LATENT, steps=4, scale=7.5)
    plain, _ = sample_seeded(single, DDIMSampler(single), prompt, refs[:1], **settings)
    keyed, _ = sample_seeded(
        double, DDIMSampler(double), prompt, refs[used], reference_placeholders=placeholders, **settings
    )
    assert torch.equal(plain, keyed)


# ------------------------------------------------------------------- masks
def test_each_reference_row_is_masked_by_its_own_placeholders_map():
    """Hand-made maps: placeholder column 2 marks the left half, column 5 the right half."""
    layer = SpatialTransformer(32, n_heads=2, d_head=4, context_dim=8, image_attention=True)
    height = width = 4
    patches = height * width
    left = torch.zeros(height, width)
    left[:, :2] = 1
    probs = torch.full((2, patches, 7), 0.01)
    probs[:, :, 2] = 0.05 + 0.5 * left.flatten()
    probs[:, :, 5] = 0.05 + 0.5 * (1 - left.flatten())
    condition = ReferenceCondition(
        latent=torch.zeros(2, 32, height, width),
        context=torch.zeros(2, 7, 8),
        placeholder_index=torch.tensor([2, 5]),  # reference 0 belongs to the first placeholder
        eot_index=torch.tensor([6, 6]),
        timesteps=torch.zeros(2),
        references_per_group=2,
        record_attention=True,
    )
    tokens = torch.randn(1, patches, 8)
    layer._attend_reference(tokens, torch.randn(2, patches, 8), probs, condition, height, width)
    (record,) = condition.attention_records
    assert torch.equal(record.mask[0], left.flatten().bool())
    assert torch.equal(record.mask[1], ~left.flatten().bool())
    assert torch.equal(record.mask, otsu_mask(torch.stack([probs[0, :, 2], probs[1, :, 5]])))


def test_sampling_masks_follow_their_own_placeholder(models):
    """With both references, reference k's map is its placeholder's column: the same map as
    sampling reference k alone for that placeholder, not the other placeholder's map."""
    _, double = models
    tokens = double.tokenize([BOTH])
    context, uncond = double.get_learned_conditioning(tokens), double.get_learned_conditioning([""])
    latents = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(2))
    x = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(501)
    star, at = (double.embedding_manager.placeholder_positions(tokens, p)[0].item() for p in ("*", "@"))
    assert star != at

    def maps(latent, placeholders):
        records = []
        denoiser = GuidedDenoiser(double, context, 1, 7.5, uncond, SamplingReference(latent, tokens[0], placeholders))
        with torch.no_grad():
            denoiser.model_output(x, t, records)
        return denoiser, records

    both, records = maps(latents, ["*", "@"])
    assert both.placeholder_index.tolist() == [star, at, star, at]  # per branch: one index per reference
    alone = {p: maps(latents[k : k + 1], [p])[1] for k, p in enumerate(("*", "@"))}
    wrong = maps(latents[1:2], ["*"])[1]
    for layer, record in enumerate(records):
        for k, p in enumerate(("*", "@")):
            torch.testing.assert_close(record.placeholder_map[k], alone[p][layer].placeholder_map[0], atol=1e-6, rtol=0)
            assert torch.equal(record.mask[k], alone[p][layer].mask[0])
        assert not torch.allclose(record.placeholder_map[1], wrong[layer].placeholder_map[0])
    swapped, swapped_records = maps(latents.flip(0), ["@", "*"])
    for record, other in zip(records, swapped_records):
        assert torch.equal(record.mask, other.mask.flip(0))


def test_references_for_prompt(models):
    _, double = models
    manager = double.embedding_manager

    def plan(prompt, keys):
        return references_for_prompt(manager, double.tokenize([prompt])[0], keys)

    assert manager.placeholders_in(double.tokenize(["@ and *"])[0]) == ["@", "*"]
    assert plan(BOTH, ["*", "@"]) == ([0, 1], ["*", "@"])
    assert plan("a painting of @ in the style of *", ["*", "@"]) == ([0, 1], ["*", "@"])
    assert plan("a photo of @", ["*", "@"]) == ([1], ["@"])
    assert plan("a photo of *", [None, None]) == ([0, 1], None)  # plain references: the old behaviour
    with pytest.raises(ValueError, match="no reference is given for it"):
        plan(BOTH, ["*"])
    with pytest.raises(ValueError, match="names 2 placeholders"):
        plan(BOTH, [None])


# ----------------------------------------------------------------- training
def test_training_on_two_folders_trains_both_placeholders(tmp_path, monkeypatch):
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)
    opt, overrides = main.parse_args(
        ["--base", str(TINY), "-t", "--logdir", str(tmp_path), "-n", "two",
         "--data_root", str(TOY), "--placeholder_string", "*", "--init_word", "toy",
         "--data_root", str(RING), "--placeholder_string", "@", "--init_word", "ring",
         "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=2",
         "lightning.callbacks.image_logger.params.ddim_steps=2", "lightning.trainer.enable_progress_bar=false"]
    )  # fmt: skip
    run = main.setup_run(opt, overrides)
    manager = run.model.embedding_manager
    assert list(manager.string_to_param_dict) == ["*", "@"]
    before = {p: v.detach().clone() for p, v in manager.string_to_param_dict.items()}
    for p, word in (("*", "toy"), ("@", "ring")):
        table = run.model.cond_stage_model.token_embedding.weight
        token = run.model.cond_stage_model.tokenizer.encode(word)[0]
        assert torch.equal(before[p][0], table[token])
    image_attention = [p.detach().clone() for p in run.model.image_attention_parameters()]
    main.train(run)
    for p, value in manager.string_to_param_dict.items():
        assert not torch.equal(value.detach(), before[p]), f"placeholder {p} did not train"
    assert any(not torch.equal(a, b.detach()) for a, b in zip(image_attention, run.model.image_attention_parameters()))
    (preview,) = run.logdir.glob("images/train/step-000002.png")
    assert preview.with_suffix(".txt").read_text().splitlines() == ["a photo of *", "a photo of @"]
    stored = OmegaConf.load(next(run.logdir.glob("configs/*-project.yaml")))
    assert len(stored.data.params.train.params.data_root) == 2
    assert list(stored.data.params.train.params.placeholder_token) == ["*", "@"]


def main_error(capsys, tmp_path, *extra: str) -> str:
    code = main.main(["--base", str(TINY), "-t", "--logdir", str(tmp_path / "logs"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--data_root", str(TOY), "--data_root", str(RING)], "2 --data_root folders and 1 placeholder(s)"),
        (["--data_root", str(TOY), "--data_root", str(RING), "--placeholder_string", "*", "--placeholder_string", "*"],
         "repeat '*'"),
        (["--data_root", str(TOY), "--data_root", str(RING), "--placeholder_string", "*", "--placeholder_string", "@"],
         "2 placeholders ['*', '@'] and 1 --init_word"),
        (["--data_root", str(TOY), "--data_root", str(RING), "--placeholder_string", "*", "--placeholder_string", "@",
          "--init_word", "toy", "--init_word", "ring", "lightning.callbacks.image_logger.params.prompts=[a dog]"],
         "does not contain the placeholder '* or @'"),
    ],
)
def test_main_errors_are_one_line(capsys, tmp_path, monkeypatch, extra, expected):
    monkeypatch.delenv(main.RUN_DIR_VARIABLE, raising=False)
    monkeypatch.setattr(main, "build_model", lambda *a, **k: pytest.fail("built the model before the error"))
    assert expected in main_error(capsys, tmp_path, *extra)


# ------------------------------------------------------------------ sample.py
@pytest.fixture(scope="module")
def adapters(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi")
    single, double = models
    base = folder / "base.safetensors"
    save_state_dict(single.base_state_dict(), base)
    paths = {}
    for name, model, config in (
        ("single", single, tiny_config()),
        ("double", double, tiny_config(("*", "@"), ("toy", "cat"))),
    ):
        config.model.params.ckpt_path = str(base)
        paths[name] = folder / f"{name}.safetensors"
        save_adapter(model, config, paths[name])
    return paths


def run_sample(adapter: Path, outdir: Path, *extra: str) -> int:
    return sample.main(
        ["--ckpt", str(adapter), "--outdir", str(outdir), "--n_samples", "1", "--ddim_steps", "2",
         "--device", "cpu", "--seed", "5", *extra]
    )  # fmt: skip


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_cli_keyed_reference_of_one_concept_equals_the_plain_reference(adapters, tmp_path):
    prompt = ["--prompt", "a photo of * on the beach"]
    assert run_sample(adapters["single"], tmp_path / "plain", "--ref", str(TOY / "00.jpg"), *prompt) == 0
    assert run_sample(adapters["single"], tmp_path / "keyed", "--ref", f"*={TOY / '00.jpg'}", *prompt) == 0
    assert np.array_equal(pixels(tmp_path / "plain/samples/00000.png"), pixels(tmp_path / "keyed/samples/00000.png"))


def test_cli_two_concepts_one_attention_row_per_placeholder(adapters, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{BOTH}\na painting of @\n")
    refs = ["--ref", f"*={TOY / '00.jpg'}", "--ref", f"@={RING / '00.png'}"]
    assert run_sample(adapters["double"], tmp_path / "out", *refs, "--from_file", str(prompts), "--save_attention") == 0
    grid_both = pixels(next((tmp_path / "out").glob("grid-a-photo-of-s-next-to*.png")))
    grid_one = pixels(next((tmp_path / "out").glob("grid-a-painting-of*.png")))
    # grid: references at the left, then one sample (64 px cells, 2 px padding); attention: one row per reference
    assert grid_both.shape[1] == 2 + 3 * 66 and grid_one.shape[1] == 2 + 2 * 66
    pictures = sorted((tmp_path / "out" / "attention").glob("*.png"))
    both = [p for p in pictures if p.name.startswith("a-photo-of-s-next-to")]
    one = [p for p in pictures if p.name.startswith("a-painting-of")]
    assert both and one
    assert pixels(both[0]).shape[0] == 14 + 2 + 2 * 66 and pixels(one[0]).shape[0] == 14 + 2 + 66


@pytest.mark.parametrize(
    "refs, prompt, expected",
    [
        (["*=" + str(TOY / "00.jpg")], BOTH, "names '@' but no reference is given for it"),
        (["*=" + str(TOY / "00.jpg"), "*=" + str(TOY / "01.jpg")], BOTH, "placeholder '*' has more than one reference"),
        (["*=" + str(TOY / "00.jpg"), str(RING / "00.png")], BOTH, "give every reference with its placeholder"),
        (["%=" + str(TOY / "00.jpg")], BOTH, "'%' is not a placeholder of the model"),
        ([str(TOY / "00.jpg")], BOTH, "names 2 placeholders (*, @)"),
    ],
)
def test_cli_reference_errors_are_one_line(adapters, tmp_path, capsys, refs, prompt, expected):
    code = run_sample(adapters["double"], tmp_path / "out", "--ref", *refs, "--prompt", prompt)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert expected in err
    assert not (tmp_path / "out" / "samples").exists() or not any((tmp_path / "out" / "samples").iterdir())


def test_api_takes_references_per_placeholder(adapters):
    from ldm import api

    single, double = api.load(adapters["single"]), api.load(adapters["double"])
    settings = dict(steps=2, seed=3, size=64)
    plain = api.sample(single, "a photo of *", [TOY / "00.jpg"], **settings)
    keyed = api.sample(double, "a photo of *", {"*": TOY / "00.jpg", "@": RING / "00.png"}, **settings)
    assert np.array_equal(np.asarray(plain[0]), np.asarray(keyed[0]))
    assert len(api.sample(double, BOTH, {"*": TOY / "00.jpg", "@": RING / "00.png"}, **settings)) == 1
    with pytest.raises(ValueError, match="no reference is given"):
        api.sample(double, BOTH, {"*": TOY / "00.jpg"}, **settings)
