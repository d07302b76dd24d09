"""Dictionary sources: the general text entries an image is compared against (the paper's D).

Every source yields its entries in a stable order, whitespace-normalised (stripped, inner runs
collapsed to one space), without empty entries or exact duplicates (the first one is kept),
and streams them, so a dictionary may be larger than memory.

Text files (a ``file:`` dictionary here, ``dictionary.txt`` and ``classes.txt`` of an
embeddings bundle) are read the same way by :func:`read_text_lines`: UTF-8, one entry
per line, lines end at ``\n`` only (``\r\n`` too), a byte-order mark is dropped at the
start of the file. A line holding a control character, a byte-order mark or a line break
that some tools count and others do not (a lone ``\r``, ``\v``, ``\f``, U+001C-U+001E,
U+0085, U+2028, U+2029) is refused with its line number, so that every reader counts the
same lines: a ``dictionary.txt`` has exactly one line per ``dictionary.npy`` row.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO, Protocol

from bliss.errors import InvalidInputError, NotFoundError

WORDNET_ROOT = Path("/usr/share/wordnet")
WORDNET_INSTALL_HINT = "apt-get install -y wordnet-base"

_IMAGENET_RESOURCE = "data/imagenet_classes.tsv"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Every C0 control but the tab, DEL, C1 (U+0085 NEXT LINE among them), U+2028, U+2029, BOM.
_FORBIDDEN = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ufeff]")
_CHARACTER_NAMES = {
    "\x00": "a NUL character",
    "\r": "a carriage return that does not end the line",
    "\x0b": "a vertical tab (a line break to some tools)",
    "\x0c": "a form feed (a line break to some tools)",
    "\x85": "U+0085 NEXT LINE (a line break to some tools)",
    "\u2028": "U+2028 LINE SEPARATOR (a line break to some tools)",
    "\u2029": "U+2029 PARAGRAPH SEPARATOR (a line break to some tools)",
    "\ufeff": "a byte-order mark (U+FEFF) inside the file",
}


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


def read_text_lines(stream: Iterable[bytes], name: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of a UTF-8 text file opened in binary mode.

    InvalidInputError naming ``name`` and the line when a line is not UTF-8 or holds a
    character no entry may contain (see the module docstring).
    """
    for number, raw in enumerate(stream, start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInputError(
                f"{name} is not UTF-8 text (line {number}, byte {error.start + 1}: "
                f"{error.reason}): convert it, e.g. with `iconv -f latin1 -t utf-8`"
            ) from None
        line = line.removesuffix("\n").removesuffix("\r")
        found = _FORBIDDEN.search(line)
        if found is not None:
            character = found.group()
            what = _CHARACTER_NAMES.get(character, f"the control character U+{ord(character):04X}")
            raise InvalidInputError(
                f"{name} line {number} contains {what} at column {found.start() + 1}: remove "
                "it (one entry per line, lines end at \\n)"
            )
        yield number, line


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
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
        # Once per dictionary: a pass over a huge file is not free, and a build asks twice.
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
    The whole file is read once here, so that a bad line stops a build before any other
    work (:func:`read_text_lines` says which); empty lines are skipped.
    """
    if isinstance(path, str) and _URL.match(path):
        name, opener = path, _url_opener(path)
    else:
        file = Path(path).expanduser().resolve()
        if not file.is_file():
            raise NotFoundError(f"dictionary file not found: {file}")
        name, opener = str(file), lambda: file.open("rb")

    def read() -> Iterator[str]:
        with opener() as stream:
            for _, line in read_text_lines(stream, f"dictionary file {name}"):
                yield line

    dictionary = _StreamedDictionary(f"file:{name}", read)
    dictionary.fingerprint()  # the check, and the fingerprint the build asks for next
    return dictionary


def _url_opener(url: str) -> Callable[[], BinaryIO]:
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
    return functools.partial(fs.open, path, "rb")


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
