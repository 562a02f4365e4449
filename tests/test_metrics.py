"""ldm.evaluation: the Sec. 4.1 metrics, preprocessing, weight files, prompts and concepts."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision import transforms as T

from ldm.evaluation import (
    ConceptScores,
    average_scores,
    build_clip,
    build_dino,
    clip_text,
    clip_transform,
    cosine_similarity_matrix,
    dino_transform,
    load_clip,
    load_concepts,
    load_dino,
    load_prompts,
    pairwise_image_similarity,
    read_weights,
    score_concept,
    text_image_similarity,
)

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "data" / "monster_toy" / "00.jpg"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_clip()


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(0)
    return build_dino()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    with Image.open(PHOTO) as image:
        return image.convert("RGB")


@pytest.fixture(scope="module", params=["square", "landscape", "portrait"])
def photos(request, photo: Image.Image) -> Image.Image:
    """The real photo, and crops of it that make the shorter-side resize and the centre crop matter."""
    width, height = photo.size
    boxes = {"square": (0, 0, width, height), "landscape": (0, 100, width, 600), "portrait": (50, 0, 450, height)}
    return photo.crop(boxes[request.param])


# ------------------------------------------------------------------------------ similarities
def test_known_cosines() -> None:
    x = torch.tensor([[1.0, 0.0]])
    assert pairwise_image_similarity(x, torch.tensor([[0.0, 3.0]])) == pytest.approx(0.0, abs=1e-12)
    assert pairwise_image_similarity(x, torch.tensor([[-2.0, 0.0]])) == pytest.approx(-1.0)
    sixty = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3)]]) * 7
    assert pairwise_image_similarity(x, sixty) == pytest.approx(0.5)
    assert text_image_similarity(x, sixty) == pytest.approx(0.5)


def test_mean_over_all_pairs_by_hand() -> None:
    generated = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    real = torch.tensor([[1.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # cosines: [[1, -1, 1/sqrt2], [0, 0, 1/sqrt2]]
    expected = (1 - 1 + 2 / math.sqrt(2)) / 6
    assert pairwise_image_similarity(generated, real) == pytest.approx(expected)
    matrix = cosine_similarity_matrix(generated, real)
    assert matrix.shape == (2, 3)
    assert matrix[0, 2].item() == pytest.approx(1 / math.sqrt(2))


def test_text_image_similarity_pairs_rows() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [math.cos(math.pi / 3), math.sin(math.pi / 3)]])
    assert text_image_similarity(images, texts) == pytest.approx((1 + 0 + 0.5) / 3)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (torch.zeros(0, 4), torch.ones(2, 4)),
        (torch.ones(4), torch.ones(2, 4)),
        (torch.ones(2, 4), torch.ones(2, 5)),
    ],
)
def test_bad_feature_shapes_are_errors(a: torch.Tensor, b: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        pairwise_image_similarity(a, b)
    with pytest.raises(ValueError):
        text_image_similarity(a, b)


def test_text_image_similarity_needs_one_text_per_image() -> None:
    with pytest.raises(ValueError, match="one text feature per image"):
        text_image_similarity(torch.ones(3, 4), torch.ones(2, 4))


@pytest.mark.parametrize("extractor", ["clip", "dino"])
def test_identical_images_have_similarity_one(extractor: str, request, photo: Image.Image) -> None:
    model = request.getfixturevalue(extractor)
    features = model.encode_images([photo, PHOTO])
    assert torch.allclose(features[0], features[1], atol=1e-5)
    assert pairwise_image_similarity(features, features[:1]) == pytest.approx(1.0, abs=1e-6)


def test_features_do_not_depend_on_batching(dino, photo: Image.Image) -> None:
    images = [photo, photo.rotate(90), photo.crop((0, 0, 400, 400))]
    whole = dino.encode_images(images)
    dino.batch_size = 2
    try:
        assert torch.allclose(dino.encode_images(images), whole, atol=1e-5)
    finally:
        dino.batch_size = 32


def test_clip_text_features(clip) -> None:
    features = clip.encode_texts(["a in the snow", "a red", "a in the snow"])
    assert features.shape == (3, 512)
    assert torch.allclose(features[0], features[2])
    assert not torch.allclose(features[0], features[1])


def test_score_concept_and_pooling(clip, dino, photo: Image.Image) -> None:
    scores = score_concept([photo, PHOTO], ["a in the snow", "a red"], [photo], clip, dino)
    assert scores.i_dino == pytest.approx(1.0, abs=1e-6)
    assert scores.i_clip == pytest.approx(1.0, abs=1e-6)
    image = clip.encode_images([photo])
    expected_t = text_image_similarity(image.repeat(2, 1), clip.encode_texts(["a in the snow", "a red"]))
    assert scores.t_clip == pytest.approx(expected_t, abs=1e-6)
    assert (scores.num_generated, scores.num_real) == (2, 1)
    with pytest.raises(ValueError, match="one text per generated image"):
        score_concept([photo], ["a", "b"], [photo], clip, dino)


def test_average_scores_pool_all_pairs() -> None:
    a = ConceptScores(i_dino=0.2, i_clip=0.4, t_clip=0.1, num_generated=2, num_real=1)
    b = ConceptScores(i_dino=0.8, i_clip=0.6, t_clip=0.3, num_generated=2, num_real=3)
    pooled = average_scores([a, b])
    assert pooled["i_dino"] == pytest.approx((0.2 * 2 + 0.8 * 6) / 8)
    assert pooled["i_clip"] == pytest.approx((0.4 * 2 + 0.6 * 6) / 8)
    assert pooled["t_clip"] == pytest.approx(0.2)


# ----------------------------------------------------------------------------- preprocessing
def test_clip_preprocessing_equals_library_and_openai_transform(photos: Image.Image) -> None:
    ours = clip_transform()(photos)
    _, _, library = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    openai = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize(OPENAI_MEAN, OPENAI_STD),
        ]
    )
    assert ours.shape == (3, 224, 224)
    assert torch.equal(ours, library(photos))
    assert torch.equal(ours, openai(photos))


def test_dino_preprocessing_equals_dino_eval_transform(photos: Image.Image, dino) -> None:
    ours = dino_transform()(photos)
    dino_eval = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    config = resolve_data_config(model=dino.model)
    assert (config["interpolation"], config["mean"], config["std"]) == ("bicubic", IMAGENET_MEAN, IMAGENET_STD)
    from_model = create_transform(**{**config, "crop_pct": 224 / 256})
    assert ours.shape == (3, 224, 224)
    assert torch.equal(ours, dino_eval(photos))
    assert torch.equal(ours, from_model(photos))


# ----------------------------------------------------------------------------------- weights
@pytest.mark.parametrize(
    ("loader", "download_name"), [(load_clip, "ViT-B-32.pt"), (load_dino, "dino_deitsmall16_pretrain.pth")]
)
def test_missing_weights_name_the_file(loader, download_name: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-weights.pt"
    with pytest.raises(FileNotFoundError) as error:
        loader(missing)
    message = str(error.value)
    assert str(missing) in message and download_name in message and "\n" not in message


@pytest.mark.parametrize("layout", ["pth", "safetensors", "wrapped"])
def test_state_dict_file_layouts(layout: str, tmp_path: Path) -> None:
    state = nn.Linear(3, 2).state_dict()
    path = tmp_path / f"weights.{'safetensors' if layout == 'safetensors' else 'pth'}"
    if layout == "safetensors":
        save_file(state, str(path))
    elif layout == "wrapped":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 100}, path)
    else:
        torch.save(state, path)
    read = read_weights(path, "test", "test.pt")
    assert set(read) == set(state) and all(torch.equal(read[k], state[k]) for k in state)


def test_dino_weights_round_trip(dino, photo: Image.Image, tmp_path: Path) -> None:
    source = copy.deepcopy(dino.model)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(source.state_dict(), path)
    loaded = load_dino(path)
    pixels = dino_transform()(photo)[None]
    with torch.no_grad():
        expected = source(pixels)
    assert torch.allclose(loaded.encode_images([photo]), expected, atol=1e-5)
    assert not torch.allclose(dino.encode_images([photo]), expected, atol=1e-3)


@pytest.mark.slow
def test_clip_weights_round_trip(clip, photo: Image.Image, tmp_path: Path) -> None:
    """A 600 MB file: OpenAI-layout state dict, as open_clip saves it."""
    torch.manual_seed(2)
    source = build_clip()
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = load_clip(path)
    assert torch.allclose(loaded.encode_images([photo]), source.encode_images([photo]), atol=1e-5)
    assert torch.allclose(loaded.encode_texts(["a red"]), source.encode_texts(["a red"]), atol=1e-5)


def test_clip_uses_quick_gelu_for_openai_weights(clip) -> None:
    activations = {type(m).__name__ for m in clip.model.modules() if "GELU" in type(m).__name__}
    assert activations == {"QuickGELU"}
    laion = build_clip("laion2b_s34b_b79k")
    assert {type(m).__name__ for m in laion.model.modules() if "GELU" in type(m).__name__} == {"GELU"}


class _ScriptedWeights(nn.Module):
    """Stands in for OpenAI's TorchScript ``ViT-B-32.pt``: weights plus its integer entries."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 3)
        self.register_buffer("input_resolution", torch.tensor(224))
        self.register_buffer("context_length", torch.tensor(77))
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _ScriptedBlock(nn.Module):
    """A block of OpenAI's text transformer: its causal mask is a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2)
        self.attn_mask = torch.full((3, 3), float("-inf")).triu(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False, attn_mask=self.attn_mask)[0]


@pytest.fixture
def no_torchscript_execution(monkeypatch):
    """Fails the test if anything compiles or runs a TorchScript archive."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load ran the archive's code")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module", refuse)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, the files are not
def test_torchscript_archive_weights_are_read_without_running_it(tmp_path: Path, no_torchscript_execution) -> None:
    module = _ScriptedWeights()
    module.block = _ScriptedBlock()
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(module).save(str(path))
    state = read_weights(path, "test", "test.pt")
    expected = {k: v for k, v in module.state_dict().items() if k in {"proj.weight", "proj.bias"} or k.startswith("block.")}
    assert set(state) == set(expected)  # input_resolution, context_length, vocab_size and block.attn_mask dropped
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


class _SelfWritingModule(nn.Module):
    """A TorchScript module whose ``__setstate__`` runs at ``torch.jit.load`` (it could write files)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.weight = state[0] * 0
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_code_never_runs(tmp_path: Path, no_torchscript_execution) -> None:
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(_SelfWritingModule()).save(str(path))
    with pytest.raises(ValueError) as caught:
        read_weights(path, "CLIP ViT-B/32", "ViT-B-32.pt")
    message = str(caught.value)
    assert "ViT-B-32.pt" in message and "custom state" in message and "\n" not in message


def test_wrong_model_weights_name_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "dino.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 197, 384)}, path)
    with pytest.raises(ValueError, match=r"dino\.pth: not a CLIP ViT-B/32 state dict: missing key"):
        load_clip(path)


def test_transformers_clip_checkpoint_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"vision_model.embeddings.class_embedding": torch.zeros(768)}, path)
    with pytest.raises(ValueError, match="transformers"):
        load_clip(path)


class _Payload:
    pass


@pytest.mark.parametrize("content", ["garbage", "pickle"])
def test_unreadable_weight_files_are_value_errors(content: str, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        torch.save({"x": _Payload()}, path)
    with pytest.raises(ValueError, match="weights.pt"):
        load_dino(path)


# ------------------------------------------------------------------------- prompts, concepts
def test_prompt_lists_match_table_7() -> None:
    prompts = load_prompts()
    assert prompts.placeholder == "*"
    assert len(prompts.object) == 31 and len(prompts.live) == 31
    assert prompts.object[0] == prompts.live[0] == "a * in the jungle"
    assert "a * wearing a black top hat and a monocle" in prompts.live
    assert "a * floating in an ocean of milk" in prompts.object
    assert prompts.object[20:] == prompts.live[20:]
    assert all("cube" not in p for p in prompts.object + prompts.live)


def test_concepts_match_table_6() -> None:
    concepts = load_concepts()
    assert [c.index for c in concepts] == list(range(20))
    assert sum(c.live for c in concepts) == 6
    assert sum(not c.live for c in concepts) == 14
    assert all(c.live == (c.category == "pet") for c in concepts)
    categories = [c.category for c in concepts]
    assert {k: categories.count(k) for k in set(categories)} == {
        "toy": 6, "pet": 6, "accessory": 4, "container": 3, "building": 1,
    }  # fmt: skip
    assert {c.source for c in concepts} == {"Textual Inversion", "DreamBooth", "Custom Diffusion"}
    assert len({c.name for c in concepts}) == 20
    prompts = load_prompts()
    assert sum(len(prompts.for_concept(c)) * 8 for c in concepts) == 4960  # Sec. 4.1


def test_for_concept_picks_the_live_list() -> None:
    prompts = load_prompts()
    concepts = {c.name: c for c in load_concepts()}
    assert prompts.for_concept(concepts["black_cat"]) == prompts.live
    assert prompts.for_concept(concepts["barn"]) == prompts.object


def test_clip_text_omits_placeholder() -> None:
    assert clip_text("a * in the jungle") == "a in the jungle"
    assert clip_text("a red *") == "a red"
    assert clip_text("  a *   with a  beautiful sunset ") == "a with a beautiful sunset"


def test_clip_text_class_word_variant() -> None:
    assert clip_text("a * in the jungle", class_word="dog") == "a dog in the jungle"
    assert clip_text("a shiny *", class_word="teddy bear") == "a shiny teddy bear"
    assert clip_text("a <v> in the snow", class_word="cat", placeholder="<v>") == "a cat in the snow"


def test_clip_text_never_leaves_double_spaces() -> None:
    prompts = load_prompts()
    for concept in load_concepts():
        for prompt in prompts.for_concept(concept):
            for text in (clip_text(prompt), clip_text(prompt, concept.class_word)):
                assert "  " not in text and text == text.strip() and "*" not in text


def test_clip_text_needs_the_placeholder() -> None:
    with pytest.raises(ValueError, match="placeholder"):
        clip_text("a photo of a dog")


def test_prompt_without_placeholder_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "prompts.yaml"
    path.write_text('placeholder: "*"\nobject: ["a * here"]\nlive: ["no placeholder"]\n')
    with pytest.raises(ValueError, match="no placeholder"):
        load_prompts(path)
