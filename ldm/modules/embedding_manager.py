"""Learnable placeholder-token embeddings (the S* of Textual Inversion / ViCo)."""

import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ldm.modules.encoders.modules import CLIPTokenizer, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


class _PickledParameterDict:
    """Receives a pickled ``nn.ParameterDict`` while reading an embeddings file.

    What torch pickles for a ParameterDict depends on the version that wrote it: torch 1.10 (the
    authors' release files) keeps the entries only in ``_parameters`` (beside ``_initialized``);
    torch >= 1.12 also lists the keys in ``_keys``, and reads the entries through it, so a newer
    torch cannot use an old file as a ParameterDict. This stand-in only keeps the pickled state
    and reads both layouts; it is the one class besides tensors and plain containers that
    loading allows.
    """

    def __setstate__(self, state: object) -> None:
        self.state = state

    def entries(self) -> dict[object, object]:
        """The entries, in ``_keys`` order when the file has one (empty if the state is malformed)."""
        state = getattr(self, "state", None)
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        if not isinstance(parameters, Mapping):
            return {}
        keys = state.get("_keys")
        return {key: parameters.get(key) for key in (keys if isinstance(keys, Mapping) else parameters)}


_AUTHORS_FORMAT_GLOBALS = [(_PickledParameterDict, "torch.nn.modules.container.ParameterDict")]


def single_token_id(tokenizer: CLIPTokenizer, text: str, role: str, advice: str) -> int:
    """Returns the id of ``text``, which must tokenize to exactly one CLIP token."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise ValueError(f"{role} {text!r} is {len(ids)} CLIP tokens ({ids}); {advice}")
    return ids[0]


@functools.lru_cache(maxsize=1)
def _tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def check_init_word(word: str, source: str) -> None:
    """Refuse an init word that is not one CLIP token ("hexagon" is two) with a one-line
    ``ValueError`` naming ``source``: for commands that would otherwise find out only when the
    first training starts, minutes later."""
    single_token_id(_tokenizer(), word, f"{source}: init_word", "choose a word that is a single token")


def identifier_token_id(tokenizer: CLIPTokenizer, text: str) -> int:
    """The id of a rare identifier: a word that is one CLIP token (DreamBooth's ``sks``), or else
    an entry of the CLIP vocabulary itself (Custom Diffusion's ``ktn``, token 42170: a piece found
    inside words, which diffusers' ``convert_tokens_to_ids`` and the authors' code both take)."""
    ids = tokenizer.encode(text)
    if len(ids) == 1:
        return ids[0]
    token_id = tokenizer._bpe.encoder.get(text)
    if token_id is None:
        raise ValueError(
            f"identifier word {text!r} is {len(ids)} CLIP tokens ({ids}) and no entry of the CLIP vocabulary; "
            f"choose a word that is a single token"
        )
    return token_id


class EmbeddingManager(nn.Module):
    """Holds one learnable embedding per placeholder string and splices it into CLIP token embeddings.

    State dict: ``string_to_param_dict.<placeholder>`` (learnable, ``[num_vectors_per_token, D]``) and
    ``initial_embeddings.<placeholder>`` (a frozen copy of the starting value).

    Args:
        embedder: The text encoder whose tokenizer and token embedding table define the placeholders.
        placeholder_strings: Strings standing for the learned concepts; each must be one CLIP token.
        initializer_words: Words whose token embeddings initialise the placeholders, matched by
            position; each must be one CLIP token. Placeholders without one start from
            ``torch.rand`` values, as in Textual Inversion.
        num_vectors_per_token: Number of embedding vectors each placeholder expands into.
        identifier_words: Rare words whose token embeddings initialise the placeholders instead
            of ``initializer_words``, matched by position: DreamBooth's identifier ``[V]``
            (``sks``) and Custom Diffusion's modifier token (initialised from ``ktn``). A word that
            is several tokens may name one vocabulary entry (:func:`identifier_token_id`).
        class_words: One word (or phrase) per placeholder, by position: every prompt's
            placeholder then stands for "placeholder class word", the ``[V] class`` of DreamBooth
            and Custom Diffusion (paper Table 7): "a photo of * on the beach" is read as "a photo
            of * dog on the beach" (:meth:`expand_class_words`), in training captions and in
            sampling prompts alike. ``None``: a placeholder stands alone (Textual Inversion, ViCo).
    """

    def __init__(
        self,
        embedder: FrozenCLIPEmbedder | FrozenOpenCLIPEmbedder,
        placeholder_strings: Sequence[str] = ("*",),
        initializer_words: Sequence[str] | None = None,
        num_vectors_per_token: int = 1,
        identifier_words: Sequence[str] | None = None,
        class_words: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        initializer_words = list(initializer_words or [])
        identifier_words = list(identifier_words or [])
        class_words = list(class_words or [])
        if num_vectors_per_token < 1:
            raise ValueError(f"num_vectors_per_token must be >= 1, got {num_vectors_per_token}")
        for name, words in (("initializer", initializer_words), ("identifier", identifier_words), ("class", class_words)):
            if len(words) > len(placeholder_strings):
                raise ValueError(f"{len(words)} {name} words given for {len(placeholder_strings)} placeholder strings")
        if class_words and len(class_words) != len(placeholder_strings):
            raise ValueError(f"{len(class_words)} class words given for {len(placeholder_strings)} placeholder strings")
        tokenizer = embedder.tokenizer
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self.num_vectors_per_token = num_vectors_per_token
        #: placeholder -> the identifier token its vector started from (only those given one)
        self.identifier_token_ids: dict[str, int] = {}
        #: placeholder -> the token (init or identifier word) whose embedding it starts from
        self.init_token_ids: dict[str, int] = {}
        #: placeholder token id -> the ids of its class word (empty without class words)
        self.class_token_ids: dict[int, list[int]] = {}
        self.string_to_token_dict: dict[str, int] = {}
        self.string_to_param_dict = nn.ParameterDict()
        self.initial_embeddings = nn.ParameterDict()

        table = embedder.token_embedding.weight
        for index, placeholder in enumerate(placeholder_strings):
            token_id = single_token_id(
                embedder.tokenizer, placeholder, "placeholder string", "choose a string that is a single token"
            )
            if token_id in (embedder.tokenizer.pad_token_id, self.eos_token_id):
                # OpenCLIP pads with id 0 (a word-internal "!", which no one-token string gives): such a
                # placeholder would match every padding position
                raise ValueError(
                    f"placeholder string {placeholder!r} is token {token_id}, which this text encoder's "
                    f"tokenizer uses for padding or end of text; choose another string"
                )
            word = init_id = None
            if index < len(identifier_words):
                word = identifier_words[index]
                init_id = self.identifier_token_ids[placeholder] = identifier_token_id(tokenizer, word)
            elif index < len(initializer_words):
                word = initializer_words[index]
                init_id = single_token_id(tokenizer, word, "initializer word", "choose a word that is a single token")
            if init_id is not None:
                self.init_token_ids[placeholder] = init_id
                initial = table[init_id].detach().repeat(num_vectors_per_token, 1)
            else:
                initial = torch.rand(num_vectors_per_token, table.shape[1], dtype=table.dtype, device=table.device)
            if class_words:
                class_ids = tokenizer.encode(class_words[index])
                if not class_ids:
                    raise ValueError(f"class word {class_words[index]!r} of placeholder {placeholder!r} is empty")
                self.class_token_ids[token_id] = class_ids
            self.string_to_token_dict[placeholder] = token_id
            self.string_to_param_dict[placeholder] = nn.Parameter(initial.clone())
            self.initial_embeddings[placeholder] = nn.Parameter(initial, requires_grad=False)
            logger.debug("placeholder %r = token %d, initialised from %r", placeholder, token_id, word)

    @torch.no_grad()
    def restart_from_token_table(self, token_embedding: Tensor) -> None:
        """Set each placeholder with an init (or identifier) word back to that word's embedding.

        The manager is built with the text encoder, before a base checkpoint fills the token
        table; Textual Inversion's and ViCo's code build theirs on the pretrained CLIP, so S*
        starts at the init word's pretrained embedding. Called after the base weights are loaded.
        Placeholders without a word keep their ``torch.rand`` start.
        """
        for placeholder, token_id in self.init_token_ids.items():
            value = token_embedding[token_id].detach().repeat(self.num_vectors_per_token, 1)
            for params in (self.string_to_param_dict, self.initial_embeddings):
                param = params[placeholder]
                if param.is_meta:
                    params[placeholder] = nn.Parameter(value.to(param.dtype).clone(), requires_grad=param.requires_grad)
                else:
                    param.copy_(value)

    def embedding_parameters(self) -> Iterator[nn.Parameter]:
        """Yields the learnable placeholder vectors (what the optimizer trains)."""
        return iter(self.string_to_param_dict.values())

    def expand_class_words(self, tokens: torch.LongTensor) -> torch.LongTensor:
        """Insert each placeholder's class word after it: ``[V] class`` (see ``class_words``).

        Every row is rebuilt as the tokenizer builds one: start token, the prompt's tokens with
        the class words inserted (cut to fit, as the tokenizer cuts a long prompt), end token,
        padding. Without class words the tokens are returned unchanged.

        Args:
            tokens: Token ids ``[B, T]`` as the text encoder's tokenizer returns them.
        """
        if not self.class_token_ids:
            return tokens
        rows = []
        for row in tokens.tolist():
            end = row.index(self.eos_token_id) if self.eos_token_id in row else len(row)
            words: list[int] = []
            for token_id in row[1:end]:
                words += [token_id, *self.class_token_ids.get(token_id, [])]
            expanded = [self.bos_token_id, *words[: len(row) - 2], self.eos_token_id]
            rows.append(expanded + [self.pad_token_id] * (len(row) - len(expanded)))
        return torch.tensor(rows, dtype=tokens.dtype, device=tokens.device)

    def forward(self, tokens: torch.LongTensor, token_embeddings: Tensor) -> Tensor:
        """Replaces every placeholder position of ``token_embeddings`` by its learned vector(s).

        Args:
            tokens: Token ids, ``[B, T]``.
            token_embeddings: Their CLIP token embeddings, ``[B, T, D]``; not modified.

        Returns:
            ``[B, T, D]`` embeddings. With several vectors per token, each placeholder expands into
            consecutive positions, shifting the later tokens right and truncating to ``T``.
        """
        if self.num_vectors_per_token > 1:
            return self._expand_placeholders(tokens, token_embeddings)
        embeddings = token_embeddings
        for placeholder, token_id in self.string_to_token_dict.items():
            vector = self.string_to_param_dict[placeholder][0].to(embeddings.dtype)
            embeddings = torch.where((tokens == token_id).unsqueeze(-1), vector, embeddings)
        return embeddings

    def _expand_placeholders(self, tokens: torch.LongTensor, token_embeddings: Tensor) -> Tensor:
        """Inserts each placeholder's vectors at its occurrences, handling occurrences right to left.

        Right to left, an insertion only shifts positions after the one it replaces, so the columns
        of the occurrences still to handle stay valid in the original ``tokens``.
        """
        length = tokens.shape[1]
        occurrences: list[tuple[int, int, str]] = []
        for placeholder, token_id in self.string_to_token_dict.items():
            batch_index, columns = torch.nonzero(tokens == token_id, as_tuple=True)
            occurrences += [(column, row, placeholder) for row, column in zip(batch_index.tolist(), columns.tolist())]
        rows = list(token_embeddings.unbind(0))
        for column, row, placeholder in sorted(occurrences, reverse=True):
            vectors = self.string_to_param_dict[placeholder].to(token_embeddings.dtype)
            embedded = rows[row]
            rows[row] = torch.cat([embedded[:column], vectors, embedded[column + 1 :]])[:length]
        return torch.stack(rows)

    def placeholder_positions(
        self, tokens: torch.LongTensor, placeholder: str | None = None
    ) -> tuple[torch.LongTensor, torch.LongTensor, torch.BoolTensor]:
        """Locates the (first) placeholder and the end-of-text token in each row of the text context.

        End of text is the first end-of-text id of the row, for both tokenizers: SD v1's pads with
        that id (the first one ends the prompt), OpenCLIP's (SD 2.x) pads with 0 after a single one.
        Positions are those of the embeddings :meth:`forward` returns: with several vectors per
        token every placeholder occurrence before a token shifts it right, so the end-of-text
        index is taken after that expansion and the placeholder index is that of its first vector
        (both clamped to the last position should the expansion push them out of the row).

        Args:
            tokens: Token ids, ``[B, T]``.
            placeholder: the placeholder string to locate (several concepts: each reference is
                masked by its own placeholder's map); ``None`` locates whichever managed
                placeholder comes first in each row (with one placeholder, that one; in a
                multi-concept training caption, its concept's).

        Returns:
            ``(placeholder_index, eot_index, found)``, each ``[B]``: the column of the first
            placeholder's first occurrence, the column of the first end-of-text token, and whether
            the placeholder occurs. Where it does not, ``placeholder_index`` equals ``eot_index`` so
            that callers fall back to the end-of-text position.
        """
        if placeholder is not None and placeholder not in self.string_to_token_dict:
            known = list(self.string_to_token_dict)
            raise ValueError(f"{placeholder!r} is not a placeholder of this model (known: {known})")
        names = list(self.string_to_token_dict) if placeholder is None else [placeholder]
        ids = torch.tensor([self.string_to_token_dict[name] for name in names], device=tokens.device)
        is_placeholder = torch.isin(tokens, ids)
        found = is_placeholder.any(-1)
        column = self._expanded_columns(tokens).clamp(max=tokens.shape[1] - 1)
        eot_column = (tokens == self.eos_token_id).long().argmax(-1, keepdim=True)
        eot_index = column.gather(-1, eot_column).squeeze(-1)
        placeholder_column = is_placeholder.long().argmax(-1, keepdim=True)
        placeholder_index = torch.where(found, column.gather(-1, placeholder_column).squeeze(-1), eot_index)
        return placeholder_index, eot_index, found

    def placeholders_in(self, tokens: torch.LongTensor) -> list[str]:
        """The placeholder strings that occur in one row of token ids ``[T]``, in order of first occurrence."""
        row = tokens.reshape(-1).tolist()
        named = [(row.index(token_id), name) for name, token_id in self.string_to_token_dict.items() if token_id in row]
        return [name for _, name in sorted(named)]

    def _expanded_columns(self, tokens: torch.LongTensor) -> torch.LongTensor:
        """``[B, T]``: the column each token occupies once every placeholder has expanded."""
        placeholder_ids = torch.tensor(list(self.string_to_token_dict.values()), device=tokens.device)
        is_placeholder = torch.isin(tokens, placeholder_ids).long()
        placeholders_before = is_placeholder.cumsum(-1) - is_placeholder
        columns = torch.arange(tokens.shape[1], device=tokens.device)
        return columns + (self.num_vectors_per_token - 1) * placeholders_before

    def save_authors_format(self, path: PathLike) -> None:
        """Writes the embeddings in the format of the authors' ``embeddings.pt`` release files."""
        torch.save(
            {
                "string_to_token": {
                    placeholder: torch.tensor(token_id) for placeholder, token_id in self.string_to_token_dict.items()
                },
                "string_to_param": nn.ParameterDict(
                    {
                        placeholder: nn.Parameter(param.detach().cpu().clone())
                        for placeholder, param in self.string_to_param_dict.items()
                    }
                ),
            },
            path,
        )

    def load_placeholder_vectors(self, vectors: Mapping[str, Tensor]) -> None:
        """Copies ``{placeholder: [n, D] tensor}`` into the learnable vectors.

        Typically fed by :func:`load_authors_embeddings`.
        """
        for placeholder, value in vectors.items():
            if placeholder not in self.string_to_param_dict:
                raise ValueError(
                    f"placeholder {placeholder!r} is not managed here (known: {list(self.string_to_param_dict)})"
                )
            param = self.string_to_param_dict[placeholder]
            if value.shape != param.shape:
                raise ValueError(
                    f"placeholder {placeholder!r}: loaded vectors have shape {tuple(value.shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(value)


def load_authors_embeddings(path: PathLike) -> dict[str, Tensor]:
    """Reads an embeddings file in the authors' (Textual Inversion) format without unpickling code.

    The file is ``{"string_to_token": {...}, "string_to_param": <placeholder -> [n, D]>}`` where
    ``string_to_param`` is a pickled ``nn.ParameterDict`` (the authors' ``embeddings_gs-*.pt``,
    written by torch 1.10 or by a newer torch) or a plain dict of tensors. It is loaded with
    ``weights_only=True``; the only class allowed beyond that is a stand-in for the ParameterDict.

    Returns:
        ``{placeholder: [n, D] tensor}`` on the CPU.

    Raises:
        ValueError: One line naming the file when it cannot be read safely or does not hold
            embeddings in that format.
    """
    try:
        with torch.serialization.safe_globals(_AUTHORS_FORMAT_GLOBALS):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types; each means "unreadable"
        raise ValueError(
            f"{os.fspath(path)} cannot be loaded safely as an embeddings file ({type(error).__name__})"
        ) from error
    params = content.get("string_to_param") if isinstance(content, dict) else None
    if isinstance(params, _PickledParameterDict):
        params = params.entries()
    if not isinstance(params, dict) or not params or not all(
        isinstance(name, str) and isinstance(value, Tensor) and value.ndim == 2 for name, value in params.items()
    ):
        raise ValueError(
            f"{os.fspath(path)} is not an embeddings file: expected a dict whose 'string_to_param' "
            f"maps placeholder strings to [n, D] tensors"
        )
    return {name: value.detach() for name, value in params.items()}
