r"""Evaluation corpora (WikiText-2, LAMBADA), read byte for byte and checked by SHA-256.

Where the files come from, in this order:

1. ``data_dir`` (the CLI's ``--data-dir``),
2. the environment variable ``KVTHEORY_DATA``,
3. the Hugging Face Hub through the optional package ``datasets`` (needs network).

Local files must match the SHA-256 sums published in ``../shared/data/README.md``
(:data:`SHA256`); a mismatch is a :class:`~kvtheory.errors.KVTheoryError` that names the file,
both sums and what to do. The corpora are read in place and never copied into the repository.

Layout of a data folder::

    wikitext-2-raw-v1/wiki.test.raw        # one UTF-8 string, 2,891 lines
    lambada_openai/lambada_test.jsonl      # 5,153 lines {"text": ...}

>>> from kvtheory.data import split_lambada
>>> split_lambada("he said hello to his friend  ")
('he said hello to his', 'friend')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ._checks import check_choice, check_int
from .errors import KVTheoryError, bad_argument
from .io import sha256_bytes

__all__ = [
    "SHA256",
    "FILES",
    "Corpus",
    "load_corpus",
    "load_wikitext2",
    "load_lambada",
    "corpus_sha256",
    "split_lambada",
    "resolve_data_dir",
]

#: corpus name -> path inside a data folder
FILES: dict[str, str] = {
    "wikitext2": "wikitext-2-raw-v1/wiki.test.raw",
    "lambada": "lambada_openai/lambada_test.jsonl",
}

#: corpus name -> SHA-256 of the local file (from ``../shared/data/README.md``)
SHA256: dict[str, str] = {
    "wikitext2": "bbf94c53a05abe9ee670d3b6343608095822c85e26de37c70b24fc571964574a",
    "lambada": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
}

#: corpus name -> (Hub dataset, config, split) used when no local folder is given
HUB: dict[str, tuple[str, str, str]] = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"),
    "lambada": ("EleutherAI/lambada_openai", "default", "test"),
}


@dataclass(frozen=True)
class Corpus:
    """A corpus as read: its text (WikiText-2) or passages (LAMBADA), and where it came from.

    ``sha256`` is the SHA-256 of the bytes read (the local file, or for the Hub the UTF-8
    encoding of the assembled text / of the passages joined by newlines); ``verified`` says
    whether it was checked against :data:`SHA256`.
    """

    name: str
    source: str
    sha256: str
    verified: bool
    text: str = ""
    passages: tuple[str, ...] = ()

    def provenance(self) -> dict[str, object]:
        """What a result file records about its data."""
        return {"corpus": self.name, "source": self.source, "sha256": self.sha256,
                "verified": self.verified}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """``data_dir``, else ``$KVTHEORY_DATA``, else None (meaning: the Hub)."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get("KVTHEORY_DATA") or None
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise bad_argument("data_dir", str(path), "an existing folder holding "
                           f"{FILES['wikitext2']} and {FILES['lambada']}")
    return path


def _read_local(name: str, folder: Path) -> tuple[bytes, Path]:
    path = folder / FILES[name]
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KVTheoryError(
            f"data_dir: got {str(folder)!r}, which has no {FILES[name]}; expected the corpus "
            "files listed in ../shared/data/README.md"
        ) from None
    except OSError as exc:
        raise KVTheoryError(f"data_dir: cannot read {str(path)!r} ({exc.strerror})") from None
    got = sha256_bytes(raw)
    if got != SHA256[name]:
        raise KVTheoryError(
            f"corpus {str(path)!r}: SHA-256 mismatch, got {got}; expected {SHA256[name]} "
            "(the file is corrupted or a different version: restore it from "
            f"../shared/data or the Hub dataset {HUB[name][0]})"
        )
    return raw, path


def _read_hub(name: str) -> list[str]:  # pragma: no cover - needs network
    try:
        import datasets
    except ImportError:
        raise KVTheoryError(
            f"corpus {name}: no data folder given (--data-dir or KVTHEORY_DATA) and the "
            "optional package 'datasets' is missing; pip install datasets (it needs network "
            "access to the Hugging Face Hub), or pass --data-dir ../shared/data"
        ) from None
    repo, config, split = HUB[name]
    try:
        rows = datasets.load_dataset(repo, config, split=split)["text"]
    except Exception as exc:  # network, auth, missing dataset
        raise KVTheoryError(
            f"corpus {name}: could not load {repo}/{config} from the Hub "
            f"({type(exc).__name__}); it needs network access, or pass --data-dir"
        ) from None
    return list(rows)


def load_corpus(
    name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> Corpus:
    """Read ``"wikitext2"`` or ``"lambada"`` (first ``limit`` passages) with its SHA-256.

    WikiText-2 is the raw test split as one string; LAMBADA is a tuple of passages.
    """
    check_choice("corpus", name, tuple(FILES))
    if limit is not None:
        limit = check_int("limit", limit, 1)
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        raw, path = _read_local(name, folder)
        text = raw.decode("utf-8")
        src, sha, verified = str(path), SHA256[name], True
        if name == "wikitext2":
            return Corpus(name, src, sha, verified, text=text)
        passages = [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    else:  # pragma: no cover - needs network
        rows = _read_hub(name)
        repo, config, split = HUB[name]
        src, verified = f"hub:{repo}/{config}/{split}", False
        if name == "wikitext2":
            text = "".join(rows)
            return Corpus(name, src, sha256_bytes(text.encode("utf-8")), verified, text=text)
        passages = rows
        sha = sha256_bytes("\n".join(passages).encode("utf-8"))
    if limit is not None:
        passages = passages[:limit]
    return Corpus(name, src, sha, verified, passages=tuple(passages))


def load_wikitext2(data_dir: str | os.PathLike | None = None) -> str:
    """The raw WikiText-2 test split as one string (SHA-256 checked when read from a folder)."""
    return load_corpus("wikitext2", data_dir).text


def load_lambada(data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[str]:
    """The LAMBADA (OpenAI) test passages, the first ``limit`` of them if given."""
    return list(load_corpus("lambada", data_dir, limit).passages)


def corpus_sha256(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of a corpus as :func:`load_corpus` reads it (checked for local files)."""
    return load_corpus(name, data_dir).sha256


def split_lambada(passage: str) -> tuple[str, str]:
    r"""Split a LAMBADA passage into (context, target word).

    The target is the last whitespace-separated word; the context is everything before the
    whitespace run that precedes it (trailing whitespace dropped). The model is then asked
    for the tokens of ``sep + target`` after the context, where ``sep`` is that whitespace
    run as it stands in the passage (a space in 5,146 of the 5,153 passages, else newlines).
    """
    text = passage.rstrip()
    cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
    if not text or cut <= 0:
        raise bad_argument("passage", passage, "a text with a context and a last word")
    context, target = text[:cut].rstrip(), text[cut + 1:]
    if not context:
        raise bad_argument("passage", passage, "a text with a context and a last word")
    return context, target
