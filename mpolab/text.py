"""Real English sentences that install with the library, for healing and measuring fidelity.

Two sources, both offline:

* :func:`reference_sentences`: prose sentences from the Python language reference, which
  CPython ships as ``pydoc_data.topics`` (528 on Python 3.11.7 after filtering out code and
  fragments; the count depends on the Python version);
* :func:`everyday_sentences`: 80 everyday sentences written for this project
  (``mpolab/data/everyday_sentences.txt``), a different domain for held-out checks.

And, when the optional ``gensim`` package is installed (its wheel ships the Lee news corpus as
test data; ``pip install --no-deps gensim`` is enough, nothing of gensim is imported):

* :func:`news_documents`: Australian news articles (Lee et al. 2005), 300 "background"
  documents (~360 kB) and 50 disjoint "test" documents (~25 kB): long real English prose for
  calibrating and measuring the perplexity of language models.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from importlib import resources, util
from pathlib import Path

__all__ = ["everyday_sentences", "news_documents", "reference_sentences", "train_eval_sentences"]

_PROSE = re.compile(r"[A-Za-z][A-Za-z ,;:'()\-]+\.")


@lru_cache(maxsize=1)
def reference_sentences() -> tuple[str, ...]:
    """Prose sentences (40-200 characters, letters and punctuation only) from ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics.values()))
    candidates = re.split(r"(?<=[.!?])\s+", text)
    keep = [s for s in candidates if 40 <= len(s) <= 200 and _PROSE.fullmatch(s) and s.count("(") == s.count(")")]
    return tuple(dict.fromkeys(keep))


@lru_cache(maxsize=1)
def everyday_sentences() -> tuple[str, ...]:
    """The 80 everyday sentences written for mpolab."""
    text = resources.files("mpolab").joinpath("data/everyday_sentences.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def train_eval_sentences(num_train: int | None = 400, num_eval: int = 60, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint train / held-out sentence lists mixing both sources.

    Held-out sentences are half everyday, half reference prose, none of them in the train list.
    ``num_train=None``: every sentence that is not held out.
    """
    rng = random.Random(seed)
    everyday = list(everyday_sentences())
    reference = list(reference_sentences())
    rng.shuffle(everyday)
    rng.shuffle(reference)
    eval_everyday = min(num_eval // 2, len(everyday) // 2)
    eval_set = everyday[:eval_everyday] + reference[: num_eval - eval_everyday]
    train_pool = everyday[eval_everyday:] + reference[num_eval - eval_everyday :]
    rng.shuffle(train_pool)
    if num_train is None:
        return train_pool, eval_set
    if num_train > len(train_pool):
        raise ValueError(f"num_train={num_train} exceeds the {len(train_pool)} sentences available")
    return train_pool[:num_train], eval_set


_LEE_FILES = {"background": "lee_background.cor", "test": "lee.cor"}


@lru_cache(maxsize=2)
def news_documents(split: str = "background") -> tuple[str, ...]:
    """The Lee news corpus shipped in ``gensim``'s wheel: one article per entry.

    Args:
        split: ``"background"`` (300 articles, for calibration and healing) or ``"test"``
            (50 other articles, for held-out perplexity). No article or sentence is in both.

    Raises:
        ValueError: an unknown split.
        ImportError: ``gensim`` is not installed (``pip install --no-deps gensim``).
    """
    if split not in _LEE_FILES:
        raise ValueError(f"split must be one of {sorted(_LEE_FILES)}, got {split!r}")
    spec = util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("news_documents needs the gensim wheel's test data: pip install --no-deps gensim")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / _LEE_FILES[split]
    if not path.is_file():
        raise ImportError(f"gensim is installed but {path} is missing (a wheel without test data?)")
    text = path.read_text(encoding="latin-1")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
