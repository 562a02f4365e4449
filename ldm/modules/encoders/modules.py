"""Conditioning encoders: an offline CLIP tokenizer, the frozen CLIP ViT-L/14 text encoder of Stable
Diffusion v1 and the frozen OpenCLIP ViT-H/14 text encoder of Stable Diffusion 2.x."""

from __future__ import annotations

import functools
import importlib.util
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.masking_utils import create_causal_mask

if TYPE_CHECKING:
    from ldm.modules.embedding_manager import EmbeddingManager


@functools.cache
def _bundled_bpe():
    """open_clip's BPE tokenizer (``open_clip.tokenizer.SimpleTokenizer``; its vocabulary ships
    inside the pip package), built once per process.

    Its module is loaded on its own (it imports nothing from its package, open-clip-torch 3.3):
    ``import open_clip`` would run the package's ``__init__``, which imports its image models,
    seconds of start-up for every sample.py run, even of SD v1, which never uses them.
    """
    location = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("_ldm_open_clip_tokenizer", f"{location}/tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


class CLIPTokenizer:
    """OpenAI CLIP tokenizer that works offline, padding the way the text encoder was trained.

    Token ids are identical to OpenAI CLIP's (open_clip bundles the same BPE vocabulary). By default
    rows are padded with the end-of-text id, as SD v1's tokenizer does (the padded positions are part
    of the UNet's cross-attention context); SD 2.x's OpenCLIP encoder was trained with
    ``open_clip.tokenize``, which pads with 0 (``pad_token_id=0``). Either way the first end-of-text
    token of a row ends the prompt.

    Args:
        max_length: Length of every tokenized row, start and end tokens included.
        pad_token_id: Id written after the end-of-text token; ``None`` means the end-of-text id.
    """

    bos_token_id: int = 49406
    eos_token_id: int = 49407
    max_length: int = 77

    def __init__(self, max_length: int = 77, pad_token_id: int | None = None) -> None:
        self.max_length = max_length
        self.pad_token_id = self.eos_token_id if pad_token_id is None else pad_token_id
        self._bpe = _bundled_bpe()

    def encode(self, text: str) -> list[int]:
        """Returns the BPE ids of ``text``, without start or end tokens and without truncation."""
        return self._bpe.encode(text)

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Tokenizes a batch into a ``[B, max_length]`` LongTensor.

        Each row is ``[bos] + ids + [eos]`` followed by ``pad_token_id`` padding; text longer than
        ``max_length - 2`` tokens is truncated so that the end token is always present.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = torch.full((len(texts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, text in zip(rows, texts):
            ids = [self.bos_token_id, *self.encode(text)[: self.max_length - 2], self.eos_token_id]
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        return rows


class _TextModelHolder(nn.Module):
    """Nests the CLIP text model under ``text_model``.

    transformers 5 dropped the ``text_model`` level from ``CLIPTextModel``; this holder restores it so
    that the state-dict keys read ``transformer.text_model.*`` as in CompVis SD v1 checkpoints.
    """

    def __init__(self, text_model: CLIPTextModel) -> None:
        super().__init__()
        self.text_model = text_model


class FrozenTextEncoder(nn.Module):
    """What SD's frozen text encoders share: tokenizing on the weights' device, eval mode for
    good, and the token lookup where an :class:`EmbeddingManager` swaps in its vectors.

    Subclasses set ``self.tokenizer`` and provide :attr:`token_embedding` and
    :meth:`encode_embeddings` (the network after the token lookup).
    """

    tokenizer: CLIPTokenizer

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Ignores ``mode`` and stays in eval mode, so a parent's ``train()`` cannot enable dropout here."""
        return super().train(False)

    @property
    def token_embedding(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Device holding the encoder's weights."""
        return self.token_embedding.weight.device

    def tokenize(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Tokenizes ``texts`` to ``[B, max_length]`` ids on the module's device."""
        return self.tokenizer(texts).to(self.device)

    def encode(
        self,
        text: str | Sequence[str] | torch.LongTensor,
        embedding_manager: EmbeddingManager | None = None,
    ) -> Tensor:
        """Encodes prompts (or already tokenized ids) to ``[B, max_length, width]``.

        The token embeddings are looked up first so that ``embedding_manager`` can replace the
        placeholder rows; :meth:`encode_embeddings` then runs the rest of the network on them.
        """
        tokens = text.to(self.device) if isinstance(text, Tensor) else self.tokenize(text)
        embeddings = self.token_embedding(tokens)
        if embedding_manager is not None:
            embeddings = embedding_manager(tokens, embeddings)
        return self.encode_embeddings(embeddings)

    def encode_embeddings(self, embeddings: Tensor) -> Tensor:
        """The network after the token lookup, ``[B, max_length, width]`` -> same shape."""
        raise NotImplementedError

    def forward(
        self,
        text: str | Sequence[str] | torch.LongTensor,
        embedding_manager: EmbeddingManager | None = None,
    ) -> Tensor:
        """Same as :meth:`encode`."""
        return self.encode(text, embedding_manager)


class FrozenCLIPEmbedder(FrozenTextEncoder):
    """Frozen CLIP ViT-L/14 text encoder of SD v1 (last hidden state after the final layer norm).

    The weights are randomly initialised here and come from the SD checkpoint, whose
    ``cond_stage_model.*`` keys match this module's state dict without remapping. Parameters never
    require grad and the module stays in eval mode, but gradients still flow through it to the
    learnable vectors of an :class:`EmbeddingManager`.

    Args:
        vocab_size: Number of token embeddings.
        hidden_size: Width of the transformer and of its output.
        intermediate_size: Hidden width of each MLP.
        num_layers: Number of transformer layers.
        num_heads: Number of attention heads per layer.
        max_length: Number of position embeddings and tokenized length.
    """

    def __init__(
        self,
        vocab_size: int = 49408,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        max_length: int = 77,
    ) -> None:
        super().__init__()
        config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_length,
            hidden_act="quick_gelu",
            attn_implementation="sdpa",
        )
        self.transformer = _TextModelHolder(CLIPTextModel(config))
        self.tokenizer = CLIPTokenizer(max_length)
        self.max_length = max_length
        self.requires_grad_(False)
        self.train(False)

    @property
    def text_model(self) -> CLIPTextModel:
        """The wrapped transformers ``CLIPTextModel``."""
        return self.transformer.text_model

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token embedding table, ``[vocab_size, hidden_size]``."""
        return self.text_model.embeddings.token_embedding

    def encode_embeddings(self, embeddings: Tensor) -> Tensor:
        """The rest of ``CLIPTextModel.forward`` (position embeddings, causal self-attention, final
        layer norm): with the plain token embeddings this is ``CLIPTextModel(input_ids).last_hidden_state``."""
        text_model = self.text_model
        hidden_states = text_model.embeddings(inputs_embeds=embeddings)
        causal_mask = create_causal_mask(
            config=text_model.config,
            inputs_embeds=hidden_states,
            attention_mask=None,
            cache=None,
        )
        hidden_states = text_model.encoder(
            inputs_embeds=hidden_states,
            attention_mask=causal_mask,
            is_causal=True,
        ).last_hidden_state
        return text_model.final_layer_norm(hidden_states)


class _OpenCLIPResidualBlock(nn.Module):
    """One pre-norm transformer layer of the OpenCLIP text tower (open_clip's parameter names)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(), c_proj=nn.Linear(hidden, width))
        )

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPLayers(nn.Module):
    """Holds the layers under ``resblocks``, as open_clip's ``Transformer`` does."""

    def __init__(self, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_OpenCLIPResidualBlock(width, heads) for _ in range(layers))


class OpenCLIPTextModel(nn.Module):
    """The text half of an open_clip ``CLIP`` model, with its state-dict names.

    ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*``, ``ln_final``,
    ``text_projection`` and ``logit_scale`` are what SD 2.x checkpoints hold under
    ``cond_stage_model.model.`` (Stability's embedder deletes the vision tower of the open_clip
    model and keeps the rest). The projection and the logit scale are not used to condition the
    UNet; they are kept so that the checkpoint loads without unexpected keys.
    """

    def __init__(self, vocab_size: int, context_length: int, width: int, heads: int, layers: int, embed_dim: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = _OpenCLIPLayers(width, heads, layers)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)


class FrozenOpenCLIPEmbedder(FrozenTextEncoder):
    """Frozen OpenCLIP text encoder of Stable Diffusion 2.x (ViT-H/14, penultimate layer by default).

    As Stability's ``FrozenOpenCLIPEmbedder(layer="penultimate")``: token and position embeddings,
    the causal transformer stopped before its last layer, then the final layer norm. The network is
    built from open_clip's bundled model config (``arch``), never from downloaded weights: they come
    from the SD 2.x checkpoint, whose ``cond_stage_model.model.*`` keys match this module. Prompts
    are tokenized as ``open_clip.tokenize`` does (CLIP's BPE, padded with 0 after the end-of-text
    token). Frozen and always in eval mode, like :class:`FrozenCLIPEmbedder`.

    Args:
        arch: open_clip model name whose ``text_cfg`` gives the default sizes.
        layer: ``"penultimate"`` (SD 2.x) or ``"last"``.
        max_length: Tokenized length (the context length of ``arch`` unless given).
        width, heads, layers, vocab_size, embed_dim: Override ``arch``'s sizes (tiny test models).
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        layer: str = "penultimate",
        max_length: int | None = None,
        width: int | None = None,
        heads: int | None = None,
        layers: int | None = None,
        vocab_size: int | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got '{layer}'")
        import open_clip  # its model configs; imported only for SD 2.x (see _bundled_bpe)

        config = open_clip.get_model_config(arch)
        if config is None:
            raise ValueError(f"open_clip has no bundled model config named '{arch}'")
        text = config["text_cfg"]
        self.max_length = max_length or text.get("context_length", 77)
        self.model = OpenCLIPTextModel(
            vocab_size=vocab_size or text.get("vocab_size", 49408),
            context_length=self.max_length,
            width=width or text["width"],
            heads=heads or text["heads"],
            layers=layers or text["layers"],
            embed_dim=embed_dim or config["embed_dim"],
        )
        self.layer = layer
        self.tokenizer = CLIPTokenizer(self.max_length, pad_token_id=0)
        self.requires_grad_(False)
        self.train(False)

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token embedding table, ``[vocab_size, width]``."""
        return self.model.token_embedding

    def unused_state_keys(self) -> list[str]:
        """Weights that no output depends on: the projection to the joint space, the logit scale
        and, at the penultimate layer, the last transformer layer (diffusers' SD 2.x text encoder
        has none of them)."""
        names = [name for name in ("model.text_projection", "model.logit_scale") if name in self.state_dict()]
        if self.layer == "penultimate":
            last = f"model.transformer.resblocks.{len(self.model.transformer.resblocks) - 1}."
            names += [name for name in self.state_dict() if name.startswith(last)]
        return names

    def encode_embeddings(self, embeddings: Tensor) -> Tensor:
        """Position embeddings, the causal transformer up to ``layer``, the final layer norm."""
        x = embeddings + self.model.positional_embedding.to(embeddings.dtype)
        length = x.shape[1]
        causal = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        blocks = self.model.transformer.resblocks
        for block in blocks[: len(blocks) - (1 if self.layer == "penultimate" else 0)]:
            x = block(x, causal)
        return self.model.ln_final(x)
