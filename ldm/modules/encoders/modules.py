"""Conditioning encoders for Stable Diffusion v1: an offline CLIP tokenizer and the frozen CLIP text encoder."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.masking_utils import create_causal_mask

if TYPE_CHECKING:
    from ldm.modules.embedding_manager import EmbeddingManager


@functools.cache
def _bundled_bpe() -> SimpleTokenizer:
    """Builds open_clip's BPE tokenizer once per process (its vocabulary ships inside the pip package)."""
    return SimpleTokenizer()


class CLIPTokenizer:
    """OpenAI CLIP tokenizer that works offline, padding the way SD v1 expects.

    Token ids are identical to OpenAI CLIP's (open_clip bundles the same BPE vocabulary). Unlike
    ``open_clip.tokenize``, which pads with 0, rows are padded with the end-of-text id: SD v1 was trained
    with that padding and the padded positions are part of the UNet's cross-attention context.

    Args:
        max_length: Length of every tokenized row, start and end tokens included.
    """

    bos_token_id: int = 49406
    eos_token_id: int = 49407
    max_length: int = 77

    def __init__(self, max_length: int = 77) -> None:
        self.max_length = max_length
        self._bpe = _bundled_bpe()

    def encode(self, text: str) -> list[int]:
        """Returns the BPE ids of ``text``, without start or end tokens and without truncation."""
        return self._bpe.encode(text)

    def __call__(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """Tokenizes a batch into a ``[B, max_length]`` LongTensor.

        Each row is ``[bos] + ids + [eos]`` followed by ``eos`` padding; text longer than
        ``max_length - 2`` tokens is truncated so that the end token is always present.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = torch.full((len(texts), self.max_length), self.eos_token_id, dtype=torch.long)
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


class FrozenCLIPEmbedder(nn.Module):
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

    def train(self, mode: bool = True) -> FrozenCLIPEmbedder:
        """Ignores ``mode`` and stays in eval mode, so a parent's ``train()`` cannot enable dropout here."""
        return super().train(False)

    @property
    def text_model(self) -> CLIPTextModel:
        """The wrapped transformers ``CLIPTextModel``."""
        return self.transformer.text_model

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token embedding table, ``[vocab_size, hidden_size]``."""
        return self.text_model.embeddings.token_embedding

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
        """Encodes prompts (or already tokenized ids) to ``[B, max_length, hidden_size]``.

        The token embeddings are looked up first so that ``embedding_manager`` can replace the
        placeholder rows; the rest of ``CLIPTextModel.forward`` (position embeddings, causal
        self-attention, final layer norm) then runs on those embeddings. Without a manager the
        result equals ``CLIPTextModel(input_ids).last_hidden_state``.
        """
        tokens = text.to(self.device) if isinstance(text, Tensor) else self.tokenize(text)
        embeddings = self.token_embedding(tokens)
        if embedding_manager is not None:
            embeddings = embedding_manager(tokens, embeddings)
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

    def forward(
        self,
        text: str | Sequence[str] | torch.LongTensor,
        embedding_manager: EmbeddingManager | None = None,
    ) -> Tensor:
        """Same as :meth:`encode`."""
        return self.encode(text, embedding_manager)
