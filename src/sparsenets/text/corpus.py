"""A pinned English corpus that ships with the package, with fixed train/validation/test splits.

``corpus.txt.gz`` is the Python documentation's help topics (what ``help("with")`` shows), as
CPython 3.11.7 ships them in ``pydoc_data.topics.topics``: English prose with code samples.
Text © Python Software Foundation, under the PSF License Agreement
(https://docs.python.org/3/license.html). Topics repeat each other (``compound`` contains
``function``, ``class``, ...), so each paragraph of 60 characters or more is kept only at its
first occurrence; otherwise held-out text would also be training text. 2,279 paragraphs,
379,167 UTF-8 bytes (112 KB gzipped), produced once with::

    import gzip, pydoc_data.topics as t
    seen, kept = set(), []
    for key in sorted(t.topics):
        for p in t.topics[key].strip("\n").split("\n\n"):
            if len(p) < 60 or p not in seen:
                seen.add(p)
                kept.append(p)
    data = ("\n\n".join(kept) + "\n").encode()
    open("corpus.txt.gz", "wb").write(gzip.compress(data, compresslevel=9, mtime=0))

:data:`SHA256` pins the uncompressed bytes (gzip output may differ between zlib versions, the
text may not); a file that does not match raises :class:`~sparsenets.errors.SparsenetsError`.

Splits: the text is cut at paragraph breaks into chunks of about :data:`CHUNK` characters; of
every 20 consecutive chunks the 19th is validation, the 20th test, the rest train. Held-out
text is so never a paragraph that also appears in train, yet it samples the whole corpus
rather than only the topics at the end of the alphabet.

Domains: :func:`domain_text` splits a split further into its ``"code"`` paragraphs (every
non-empty line indented by 3 spaces: the code samples, ~36% of train) and its ``"prose"``
(the rest), for experiments on a shift of domain.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
from pathlib import Path

from ..errors import ConfigError, SparsenetsError

DATA = Path(__file__).with_name("corpus.txt.gz")
SHA256 = "e0fedef82441ccc5ebd48b141f4358372243542fe83fc85b5cf54ec31f353a34"
SOURCE = "CPython 3.11.7 pydoc_data.topics (Python documentation help topics), PSF License"
SPLITS = ("train", "validation", "test")
KINDS = ("prose", "code")
CHUNK = 4_000
GROUP = 20


@functools.lru_cache(maxsize=4)
def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise SparsenetsError(f"{path}: sha256 {digest} does not match the pinned {SHA256}; "
                              "the corpus file is damaged or was replaced (reinstall sparsenets)")
    return data.decode("utf-8")


@functools.lru_cache(maxsize=4)
def _splits(path: Path) -> dict[str, str]:
    parts: dict[str, list[str]] = {split: [] for split in SPLITS}
    position = 0
    for paragraph in _read(path).split("\n\n"):
        slot = (position // CHUNK) % GROUP  # by where the paragraph starts: contiguous chunks
        parts["validation" if slot == GROUP - 2 else "test" if slot == GROUP - 1 else "train"].append(paragraph)
        position += len(paragraph) + 2
    return {split: "\n\n".join(paragraphs) for split, paragraphs in parts.items()}


def corpus_text(split: str) -> str:
    """The ``"train"`` (92%), ``"validation"`` (3.5%) or ``"test"`` (4.3%) text; the same on every call."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    return _splits(DATA)[split]


def _is_code(paragraph: str) -> bool:
    lines = [line for line in paragraph.split("\n") if line.strip()]
    return bool(lines) and all(line.startswith("   ") for line in lines)


@functools.lru_cache(maxsize=8)
def _domain(path: Path, split: str, kind: str) -> str:
    code = kind == "code"
    return "\n\n".join(p for p in _splits(path)[split].split("\n\n") if _is_code(p) == code)


def domain_text(split: str, kind: str) -> str:
    """The ``"prose"`` or ``"code"`` paragraphs of ``split`` (see :func:`corpus_text`), in corpus
    order, joined by blank lines as in the corpus; code paragraphs are those whose every non-empty
    line starts with 3 spaces. The same on every call."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    return _domain(DATA, split, kind)


def corpus_info() -> dict:
    """Source, license, sha256 and sizes (characters and UTF-8 bytes per split), for docs and reports."""
    splits = _splits(DATA)
    return {"source": SOURCE, "file": DATA.name, "sha256": SHA256, "compressed_bytes": DATA.stat().st_size,
            "bytes": len(_read(DATA).encode()),
            "splits": {s: {"chars": len(t), "bytes": len(t.encode())} for s, t in splits.items()}}
