from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ldm.modules.embedding_manager import EmbeddingManager, load_authors_embeddings
from ldm.modules.encoders.modules import CLIPTokenizer, FrozenCLIPEmbedder

BOS, EOS = 49406, 49407
STAR = 265


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def tiny_embedder() -> FrozenCLIPEmbedder:
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)


def test_prompt_token_ids(tokenizer: CLIPTokenizer) -> None:
    tokens = tokenizer(["a photo of *"])
    assert tokens.dtype == torch.long
    assert tokens.shape == (1, 77)
    assert tokens[0].tolist() == [BOS, 320, 1125, 539, STAR, EOS] + [EOS] * 71


def test_single_token_words(tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.encode("*") == [STAR]
    assert tokenizer.encode("toy") == [5988]
    assert tokenizer.encode("sculpture") == [8757]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.max_length) == (BOS, EOS, 77)


def test_overlong_prompt_is_truncated(tokenizer: CLIPTokenizer) -> None:
    tokens = tokenizer(["toy " * 100, "toy"])
    assert tokens.shape == (2, 77)
    assert tokens[0].tolist() == [BOS] + [5988] * 75 + [EOS]
    assert tokens[1].tolist() == [BOS, 5988] + [EOS] * 75


def test_encode_equals_clip_text_model(tiny_embedder: FrozenCLIPEmbedder) -> None:
    tokens = tiny_embedder.tokenize(["a photo of *", "a toy sculpture on a table"])
    expected = tiny_embedder.text_model(input_ids=tokens).last_hidden_state
    assert torch.equal(tiny_embedder.encode(tokens), expected)
    assert torch.equal(tiny_embedder(["a photo of *", "a toy sculpture on a table"]), expected)


def test_manager_puts_learned_vector_at_placeholder(tiny_embedder: FrozenCLIPEmbedder) -> None:
    manager = EmbeddingManager(tiny_embedder, ["*"], ["toy"])
    tokens = tiny_embedder.tokenize(["a photo of *", "a toy"])
    plain = tiny_embedder.token_embedding(tokens)
    with torch.no_grad():
        manager.string_to_param_dict["*"].add_(1.0)
    replaced = manager(tokens, plain)
    is_star = tokens == STAR
    assert torch.equal(replaced[is_star], manager.string_to_param_dict["*"].detach().expand(1, -1))
    assert torch.equal(replaced[~is_star], plain[~is_star])


def test_changing_vector_changes_only_causal_future(tiny_embedder: FrozenCLIPEmbedder) -> None:
    manager = EmbeddingManager(tiny_embedder, ["*"], ["toy"])
    tokens = tiny_embedder.tokenize(["a photo of *"])
    position = 4
    with torch.no_grad():
        before = tiny_embedder.encode(tokens, manager)
        manager.string_to_param_dict["*"].add_(0.5)
        after = tiny_embedder.encode(tokens, manager)
    assert torch.equal(before[:, :position], after[:, :position])
    changed = (before - after).abs().amax(-1)[0]
    assert bool((changed[position:] > 0).all())


def test_gradient_reaches_placeholder_only(tiny_embedder: FrozenCLIPEmbedder) -> None:
    manager = EmbeddingManager(tiny_embedder, ["*"], ["sculpture"])
    output = tiny_embedder.encode(["a photo of *"], embedding_manager=manager)
    output.pow(2).mean().backward()
    grad = manager.string_to_param_dict["*"].grad
    assert grad is not None and bool(grad.abs().sum() > 0)
    assert manager.initial_embeddings["*"].grad is None
    assert all(param.grad is None for param in tiny_embedder.parameters())
    assert list(manager.embedding_parameters()) == [manager.string_to_param_dict["*"]]


def test_embedder_stays_frozen_and_in_eval(tiny_embedder: FrozenCLIPEmbedder) -> None:
    parent = torch.nn.ModuleDict({"cond_stage_model": tiny_embedder})
    parent.train()
    assert parent.training
    assert not any(module.training for module in tiny_embedder.modules())
    assert not any(param.requires_grad for param in tiny_embedder.parameters())


def test_manager_state_dict_layout(tiny_embedder: FrozenCLIPEmbedder) -> None:
    manager = EmbeddingManager(tiny_embedder, ["*"], ["sculpture"])
    state = manager.state_dict()
    assert list(state) == ["string_to_param_dict.*", "initial_embeddings.*"]
    sculpture = tiny_embedder.token_embedding.weight[8757]
    assert torch.equal(state["string_to_param_dict.*"], sculpture.unsqueeze(0))
    assert torch.equal(state["initial_embeddings.*"], sculpture.unsqueeze(0))
    assert manager.string_to_param_dict["*"].requires_grad
    assert not manager.initial_embeddings["*"].requires_grad
    assert manager.string_to_token_dict == {"*": STAR}


def test_multiple_vectors_shift_following_tokens(tiny_embedder: FrozenCLIPEmbedder) -> None:
    manager = EmbeddingManager(tiny_embedder, ["*"], None, num_vectors_per_token=3)
    assert manager.string_to_param_dict["*"].shape == (3, 32)
    tokens = tiny_embedder.tokenize(["a photo of *", "* toy", "no placeholder"])
    plain = tiny_embedder.token_embedding(tokens)
    expanded = manager(tokens, plain)
    vectors = manager.string_to_param_dict["*"].detach()
    assert expanded.shape == plain.shape
    assert torch.equal(expanded[0, :4], plain[0, :4])
    assert torch.equal(expanded[0, 4:7], vectors)
    assert torch.equal(expanded[0, 7:], plain[0, 5:-2])
    assert torch.equal(expanded[1, 1:4], vectors)
    assert torch.equal(expanded[1, 4:], plain[1, 2:-2])
    assert torch.equal(expanded[2], plain[2])


def test_multi_token_words_are_rejected(tiny_embedder: FrozenCLIPEmbedder) -> None:
    with pytest.raises(ValueError, match=r"initializer word 'teddy bear' is 2 CLIP tokens"):
        EmbeddingManager(tiny_embedder, ["*"], ["teddy bear"])
    with pytest.raises(ValueError, match=r"placeholder string 'sks-thing' is \d+ CLIP tokens"):
        EmbeddingManager(tiny_embedder, ["sks-thing"], ["toy"])


def test_authors_format_round_trip(tiny_embedder: FrozenCLIPEmbedder, tmp_path: Path) -> None:
    manager = EmbeddingManager(tiny_embedder, ["*"], ["toy"])
    path = tmp_path / "embeddings.pt"
    manager.save_authors_format(path)
    loaded = load_authors_embeddings(path)
    assert list(loaded) == ["*"]
    assert torch.equal(loaded["*"], manager.string_to_param_dict["*"].detach())

    other = EmbeddingManager(tiny_embedder, ["*"], ["sculpture"])
    other.load_placeholder_vectors(loaded)
    assert torch.equal(other.string_to_param_dict["*"], manager.string_to_param_dict["*"])
    with pytest.raises(ValueError, match=r"'\*'.*\(2, 32\).*\(1, 32\)"):
        other.load_placeholder_vectors({"*": torch.zeros(2, 32)})


def test_authors_format_file_contents(tiny_embedder: FrozenCLIPEmbedder, tmp_path: Path) -> None:
    manager = EmbeddingManager(tiny_embedder, ["*"], ["toy"])
    path = tmp_path / "embeddings.pt"
    manager.save_authors_format(path)
    with torch.serialization.safe_globals([torch.nn.ParameterDict]):
        content = torch.load(path, map_location="cpu", weights_only=True)
    assert set(content) == {"string_to_token", "string_to_param"}
    assert list(content["string_to_token"]) == ["*"]
    assert content["string_to_token"]["*"].item() == STAR
    assert isinstance(content["string_to_param"], torch.nn.ParameterDict)
    assert content["string_to_param"]["*"].shape == (1, 32)


def test_non_embeddings_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "not-embeddings.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not-embeddings.pt"):
        load_authors_embeddings(path)


def test_file_needing_other_classes_is_rejected_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    torch.save({"string_to_param": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ValueError, match="module.pt"):
        load_authors_embeddings(path)


def test_multiple_vectors_with_two_placeholders(tiny_embedder: FrozenCLIPEmbedder) -> None:
    manager = EmbeddingManager(tiny_embedder, ["*", "@"], ["toy"], num_vectors_per_token=2)
    tokens = tiny_embedder.tokenize(["@ and *"])
    plain = tiny_embedder.token_embedding(tokens)
    expanded = manager(tokens, plain)
    star = manager.string_to_param_dict["*"].detach()
    at = manager.string_to_param_dict["@"].detach()
    assert torch.equal(expanded[0, 1:3], at)
    assert torch.equal(expanded[0, 3], plain[0, 2])
    assert torch.equal(expanded[0, 4:6], star)
    assert torch.equal(expanded[0, 6:], plain[0, 4:-2])


@pytest.mark.parametrize(
    ("prompts", "placeholders", "expected"),
    [
        (["a photo of *", "* toy", "no placeholder"], ["*"], ([4, 1, 4], [7, 5, 4])),
        (["@ and *"], ["*", "@"], ([5], [8])),  # the "@" before "*" shifts both
    ],
)
def test_positions_with_several_vectors_are_those_after_expansion(
    tiny_embedder: FrozenCLIPEmbedder, prompts: list[str], placeholders: list[str], expected
) -> None:
    """The end-of-text index lands on end-of-text, the placeholder index on the first S* vector."""
    manager = EmbeddingManager(tiny_embedder, placeholders, None, num_vectors_per_token=3)
    tokens = tiny_embedder.tokenize(prompts)
    placeholder_index, eot_index, found = manager.placeholder_positions(tokens, placeholders[0])
    assert (placeholder_index.tolist(), eot_index.tolist()) == expected
    first_in_row, _, _ = manager.placeholder_positions(tokens)  # no name: whichever comes first in the row
    assert first_in_row.tolist() == ([1] if prompts == ["@ and *"] else expected[0])
    expanded = manager(tokens, tiny_embedder.token_embedding(tokens))
    rows = torch.arange(len(prompts))
    eos = tiny_embedder.token_embedding.weight[EOS]
    assert all(torch.equal(vector, eos) for vector in expanded[rows, eot_index])
    star = manager.string_to_param_dict["*"][0]
    assert all(torch.equal(expanded[row, placeholder_index[row]], star) for row in rows[found])


def test_positions_pushed_out_of_the_row_are_clamped(tiny_embedder: FrozenCLIPEmbedder) -> None:
    manager = EmbeddingManager(tiny_embedder, ["*"], None, num_vectors_per_token=4)
    tokens = tiny_embedder.tokenize(["* " * 30])
    placeholder_index, eot_index, _ = manager.placeholder_positions(tokens)
    assert placeholder_index.tolist() == [1] and eot_index.tolist() == [76]


def write_torch_1_10_embeddings(path: Path, vectors: torch.Tensor) -> None:
    """An ``embeddings_gs-*.pt`` as the authors' torch 1.10 wrote it.

    torch 1.10 pickled ``nn.ParameterDict`` with a state holding the entries in ``_parameters``
    and an ``_initialized`` flag, and no ``_keys``; the state is set here by hand.
    """
    params = torch.nn.ParameterDict()
    params.__dict__.clear()
    params.__dict__.update(
        {
            "training": True,
            "_parameters": OrderedDict([("*", torch.nn.Parameter(vectors))]),
            "_buffers": OrderedDict(),
            "_non_persistent_buffers_set": set(),
            "_backward_hooks": OrderedDict(),
            "_is_full_backward_hook": None,
            "_forward_hooks": OrderedDict(),
            "_forward_pre_hooks": OrderedDict(),
            "_state_dict_hooks": OrderedDict(),
            "_load_state_dict_pre_hooks": OrderedDict(),
            "_modules": OrderedDict(),
            "_initialized": True,
        }
    )
    torch.save({"string_to_token": {"*": torch.tensor(STAR)}, "string_to_param": params}, path)


def test_torch_1_10_embeddings_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "embeddings_gs-399.pt"
    vectors = torch.randn(1, 32)
    write_torch_1_10_embeddings(path, vectors)
    with torch.serialization.safe_globals([torch.nn.ParameterDict]):  # what torch 2 itself makes of it
        as_module = torch.load(path, weights_only=True)["string_to_param"]
    with pytest.raises(AttributeError, match="_keys"):
        dict(as_module.items())
    loaded = load_authors_embeddings(path)
    assert list(loaded) == ["*"] and torch.equal(loaded["*"], vectors)


def test_unreadable_embeddings_files_are_one_line_errors(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.pt"
    write_torch_1_10_embeddings(truncated, torch.randn(1, 32))
    truncated.write_bytes(truncated.read_bytes()[:200])
    malformed = tmp_path / "malformed.pt"
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.zeros(1, 32))})
    params.__dict__["_parameters"] = [1, 2]
    torch.save({"string_to_param": params}, malformed)
    for path in (truncated, malformed):
        with pytest.raises(ValueError) as caught:
            load_authors_embeddings(path)
        assert path.name in str(caught.value) and "\n" not in str(caught.value)
