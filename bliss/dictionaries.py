"""Dictionary sources: the general text entries an image is compared against (the paper's D).

Every source yields its entries in a stable order, whitespace-normalised (stripped, inner runs
collapsed to one space), without empty entries or exact duplicates (the first one is kept),
and streams them, so a dictionary may be larger than memory.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Protocol

from bliss.errors import InvalidInputError, NotFoundError

WORDNET_ROOT = Path("/usr/share/wordnet")
WORDNET_INSTALL_HINT = "apt-get install -y wordnet-base"

_IMAGENET_RESOURCE = "data/imagenet_classes.tsv"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class Dictionary(Protocol):
    """A named, re-readable stream of dictionary entries."""

    @property
    def source(self) -> str:
        """What the store records: 'imagenet', 'file:/abs/path', 'wordnet-nouns:/root', ..."""
        ...

    def entries(self) -> Iterator[str]:
        """The entries, streamed, normalised and de-duplicated, in a stable order."""
        ...

    def fingerprint(self) -> str:
        """sha256 hex over the entries: equal entries in equal order, equal fingerprint."""
        ...


def normalise_entry(text: str) -> str:
    """Strip the text and collapse every inner run of whitespace to one space."""
    return " ".join(text.split())


@dataclass(frozen=True)
class _StreamedDictionary:
    source: str
    read_raw: Callable[[], Iterable[str]]  # raw candidate entries, in source order

    def entries(self) -> Iterator[str]:
        # 8-byte digests instead of the strings keep the memory per entry small for huge files;
        # a collision (about n**2 / 2**65) would drop one entry, never add one.
        seen: set[int] = set()
        for raw in self.read_raw():
            entry = normalise_entry(raw)
            if not entry:
                continue
            key = int.from_bytes(hashlib.blake2b(entry.encode(), digest_size=8).digest(), "little")
            if key not in seen:
                seen.add(key)
                yield entry

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for entry in self.entries():
            # Entries never contain a newline after normalisation, so this framing is unambiguous.
            digest.update(entry.encode())
            digest.update(b"\n")
        return digest.hexdigest()


def imagenet_dictionary(exclude: Iterable[str] = ()) -> Dictionary:
    """The packaged ImageNet-1k class names, each comma-separated synonym its own entry.

    ``exclude`` drops entries equal to one of the given labels, ignoring case and spacing
    (evaluation scores a dataset against "ImageNet minus the dataset's own labels").
    """
    if isinstance(exclude, str):
        raise InvalidInputError("exclude takes a collection of labels, not one string")
    excluded = frozenset(normalise_entry(label).casefold() for label in exclude) - {""}
    source = "imagenet"
    if excluded:
        listing = "\n".join(sorted(excluded)).encode()
        source = f"imagenet-minus:{hashlib.sha256(listing).hexdigest()[:8]}"

    def read() -> Iterator[str]:
        for name in _imagenet_names():
            if normalise_entry(name).casefold() not in excluded:
                yield name

    return _StreamedDictionary(source, read)


def _imagenet_names() -> Iterator[str]:
    # Lines are "<class index>\t<synonym>, <synonym>, ..."; '#' starts the header comment.
    resource = resources.files("bliss").joinpath(_IMAGENET_RESOURCE)
    with resource.open("r", encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("#"):
                continue
            _, _, names = line.partition("\t")
            yield from names.split(",")


def text_file_dictionary(path: str | Path) -> Dictionary:
    """One entry per line of a UTF-8 text file of any size, streamed.

    ``path`` is a local path or any fsspec URL (``s3://bucket/words.txt``, ``memory://...``;
    needs ``pip install 'bliss-anomaly[inputs]'`` and the protocol's backend, e.g. s3fs).
    """
    if isinstance(path, str) and _URL.match(path):
        name, opener = path, _url_opener(path)
    else:
        file = Path(path).expanduser().resolve()
        if not file.is_file():
            raise NotFoundError(f"dictionary file not found: {file}")
        name, opener = str(file), functools.partial(file.open, "r", encoding="utf-8-sig")

    def read() -> Iterator[str]:
        lines_read = 0
        # utf-8-sig drops a byte-order mark, which would otherwise glue onto the first entry.
        with opener() as lines:
            try:
                for line in lines:
                    yield line
                    lines_read += 1
            except UnicodeDecodeError as error:
                raise InvalidInputError(
                    f"dictionary file {name} is not UTF-8 text (an invalid byte somewhere "
                    f"after line {lines_read}: {error.reason}): convert it, e.g. with "
                    "`iconv -f latin1 -t utf-8`"
                ) from error

    return _StreamedDictionary(f"file:{name}", read)


def _url_opener(url: str) -> Callable[[], IO[str]]:
    """Opens the file at ``url`` as streamed text, after checking that it exists."""
    try:
        import fsspec
    except ImportError:
        raise InvalidInputError(
            f"dictionary {url}: URLs need fsspec: pip install 'bliss-anomaly[inputs]'"
        ) from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
        found = fs.isfile(path)
    except (ImportError, ValueError, OSError) as error:  # e.g. s3:// without s3fs
        raise InvalidInputError(f"cannot read dictionary {url}: {error}") from None
    if not found:
        raise NotFoundError(f"dictionary file not found: {url}")
    return functools.partial(fs.open, path, "rt", encoding="utf-8-sig")


def wordnet_nouns_dictionary(root: str | Path = WORDNET_ROOT) -> Dictionary:
    """Every noun lemma of WordNet's index.noun, underscores read as spaces."""
    folder = Path(root).expanduser().resolve()
    candidates = (folder / "index.noun", folder / "dict" / "index.noun")
    index = next((path for path in candidates if path.is_file()), None)
    if index is None:
        raise NotFoundError(
            f"WordNet's noun index was not found under {folder} (looked for index.noun and "
            f"dict/index.noun): install it with `{WORDNET_INSTALL_HINT}`, or pass the folder "
            "that holds index.noun"
        )

    def read() -> Iterator[str]:
        with index.open("r", encoding="utf-8") as lines:
            for line in lines:
                if line.startswith(" "):  # the license header lines
                    continue
                yield line.split(" ", 1)[0].replace("_", " ")

    return _StreamedDictionary(f"wordnet-nouns:{folder}", read)


def resolve_dictionary(spec: str) -> Dictionary:
    """'imagenet' | 'wordnet' | 'wordnet:FOLDER' | 'file:PATH_OR_URL' | an existing file's path."""
    text = spec.strip()
    keyword = text.lower()
    if keyword == "imagenet":
        return imagenet_dictionary()
    if keyword == "wordnet":
        return wordnet_nouns_dictionary()
    if keyword.startswith("wordnet:"):
        return wordnet_nouns_dictionary(text[len("wordnet:") :])
    if text.startswith("file:"):
        return text_file_dictionary(text[len("file:") :])
    if text and Path(text).expanduser().is_file():
        return text_file_dictionary(text)
    raise InvalidInputError(
        f"unknown dictionary {spec!r}: use 'imagenet' (the packaged ImageNet-1k names), "
        "'wordnet' (WordNet nouns from /usr/share/wordnet), 'wordnet:/folder/with/index.noun', "
        "'file:/path/to/entries.txt', 'file:s3://bucket/entries.txt' (any fsspec URL) or the "
        "path of an existing text file (one entry per line)"
    )
