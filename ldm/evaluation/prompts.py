"""The evaluation concepts (paper Table 6) and prompts (Table 7) kept in ``configs/eval/``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ldm import CONFIG_DIR

EVAL_CONFIG_DIR = CONFIG_DIR / "eval"
DEFAULT_PROMPTS = EVAL_CONFIG_DIR / "prompts.yaml"
DEFAULT_CONCEPTS = EVAL_CONFIG_DIR / "concepts.yaml"
PLACEHOLDER = "*"


@dataclass(frozen=True)
class Concept:
    """One row of Table 6 plus the fields this project adds (``name``, ``class_word``)."""

    index: int
    name: str
    object: str
    category: str
    class_word: str
    live: bool
    source: str
    num_images: int


@dataclass(frozen=True)
class PromptLists:
    """Table 7: the prompts for non-live objects and for live subjects."""

    placeholder: str
    object: tuple[str, ...]
    live: tuple[str, ...]

    def for_concept(self, concept: Concept) -> tuple[str, ...]:
        """The list a concept is evaluated on: the live one for pets, the object one otherwise."""
        return self.live if concept.live else self.object


def load_prompts(path: str | Path = DEFAULT_PROMPTS) -> PromptLists:
    """Read the prompt lists; every prompt must hold the placeholder exactly once."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    placeholder = str(data["placeholder"])
    lists = {kind: tuple(str(p) for p in data[kind]) for kind in ("object", "live")}
    for kind, prompts in lists.items():
        for prompt in prompts:
            if prompt.count(placeholder) != 1:
                raise ValueError(f"{path}: {kind} prompt '{prompt}' must contain '{placeholder}' exactly once")
    return PromptLists(placeholder=placeholder, object=lists["object"], live=lists["live"])


def load_concepts(path: str | Path = DEFAULT_CONCEPTS) -> tuple[Concept, ...]:
    """Read the concept table; names must be unique (they name the image folders)."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    concepts = tuple(Concept(**row) for row in data["concepts"])
    names = [c.name for c in concepts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: concept names must be unique, '{duplicates[0]}' repeats")
    return concepts


def clip_text(prompt: str, class_word: str | None = None, placeholder: str = PLACEHOLDER) -> str:
    """The text T_CLIP compares a generated image with.

    Sec. 4.1 uses the prompt "that omits the placeholder" (``class_word=None``): ``"a * in the
    snow"`` becomes ``"a in the snow"``. With ``class_word`` the placeholder is replaced by it
    instead (``"a dog in the snow"``), the variant DreamBooth-style evaluations use. Runs of
    whitespace collapse to one space and the ends are stripped either way.
    """
    if placeholder not in prompt:
        raise ValueError(f"prompt '{prompt}' does not contain the placeholder '{placeholder}'")
    return " ".join(prompt.replace(placeholder, class_word or " ").split())

