"""Dictionary sources: ImageNet names, text files, WordNet nouns, and how specs resolve."""

import hashlib
import re
from pathlib import Path

import pytest

from bliss.dictionaries import (
    imagenet_dictionary,
    normalise_entry,
    resolve_dictionary,
    text_file_dictionary,
    wordnet_nouns_dictionary,
)
from bliss.errors import InvalidInputError, NotFoundError

# 1,860 comma-separated names in the packaged file; 18 of them repeat an earlier one exactly
# ('crane', 'maillot', ...), leaving 1,842.
IMAGENET_ENTRIES = 1842
# Pinned so that any change to how the packaged names are split or cleaned is noticed: it
# changes every index built from them.
IMAGENET_FINGERPRINT = "a2f9207f99f8389ece76ccb121bd9d8932a6b531adb7e374ed970a7ebf9166ce"
WORDNET = Path("/usr/share/wordnet")
needs_wordnet = pytest.mark.skipif(
    not (WORDNET / "index.noun").is_file(),
    reason="WordNet is not installed at /usr/share/wordnet (apt-get install -y wordnet-base)",
)


def naive_fingerprint(entries: list[str]) -> str:
    return hashlib.sha256("".join(f"{entry}\n" for entry in entries).encode()).hexdigest()


def test_imagenet_entries_are_split_cleaned_and_unique():
    dictionary = imagenet_dictionary()
    entries = list(dictionary.entries())
    assert dictionary.source == "imagenet"
    assert len(entries) == IMAGENET_ENTRIES
    assert len(set(entries)) == len(entries)
    assert entries[:6] == [
        "tench",
        "Tinca tinca",
        "goldfish",
        "Carassius auratus",
        "great white shark",
        "white shark",
    ]
    assert {"man-eater", "Carcharodon carcharias", "toilet tissue"} <= set(entries)
    assert entries[-1] == "bathroom tissue"
    assert all(entry == normalise_entry(entry) and entry for entry in entries)
    assert entries.count("crane") == 1
    # Exact de-duplication only: the dog breed and the sweater stay two entries.
    assert "Cardigan" in entries and "cardigan" in entries


def test_imagenet_fingerprint_is_over_the_entries_and_pinned():
    dictionary = imagenet_dictionary()
    assert dictionary.fingerprint() == naive_fingerprint(list(dictionary.entries()))
    assert dictionary.fingerprint() == IMAGENET_FINGERPRINT


def test_imagenet_exclude_ignores_case_and_spacing():
    dictionary = imagenet_dictionary(exclude=["TENCH", "  great   white\tshark ", "not a class"])
    entries = list(dictionary.entries())
    assert len(entries) == IMAGENET_ENTRIES - 2
    assert "tench" not in entries and "great white shark" not in entries
    assert "Tinca tinca" in entries and "white shark" in entries
    assert re.fullmatch(r"imagenet-minus:[0-9a-f]{8}", dictionary.source)
    # The source names the excluded set, whatever its order, case or spacing.
    same = imagenet_dictionary(exclude=["great white shark", "not a class", "tench"])
    assert same.source == dictionary.source
    assert imagenet_dictionary(exclude=["tench"]).source != dictionary.source
    assert dictionary.fingerprint() != imagenet_dictionary().fingerprint()


def test_imagenet_exclude_drops_every_case_variant():
    entries = list(imagenet_dictionary(exclude=["cardigan", "crane"]).entries())
    assert len(entries) == IMAGENET_ENTRIES - 3
    assert "Cardigan" not in entries and "cardigan" not in entries and "crane" not in entries
    assert "Cardigan Welsh corgi" in entries


def test_imagenet_exclude_nothing_is_plain_imagenet():
    assert imagenet_dictionary(exclude=["", "  "]).source == "imagenet"


def test_imagenet_exclude_refuses_a_bare_string():
    with pytest.raises(InvalidInputError, match="not one string"):
        imagenet_dictionary(exclude="dog")


def test_text_file_entries_are_streamed_cleaned_and_unique(tmp_path):
    path = tmp_path / "words.txt"
    content = (
        "\ufeffzebra\r\n"
        "  red   fox \n"
        "\n"
        "   \t \n"
        "red fox\n"
        "zebra\n"
        "Zebra\n"
        "café au\u00a0lait\n"
        "東京 タワー\n"
        "naïve\tbear"  # no newline at the end
    )
    path.write_text(content, encoding="utf-8", newline="")
    dictionary = text_file_dictionary(path)
    entries = dictionary.entries()
    assert iter(entries) is entries  # a stream, not a list
    assert list(entries) == [
        "zebra",
        "red fox",
        "Zebra",
        "café au lait",
        "東京 タワー",
        "naïve bear",
    ]
    assert dictionary.source == f"file:{path.resolve()}"
    # Read again from the start on every call.
    assert next(dictionary.entries()) == "zebra"


def test_text_file_large_file_dedupes(tmp_path):
    path = tmp_path / "many.txt"
    with path.open("w", encoding="utf-8") as file:
        for index in range(30_000):
            file.write(f"entry {index % 10_000}\n")
    entries = list(text_file_dictionary(path).entries())
    assert entries == [f"entry {index}" for index in range(10_000)]


def test_text_file_errors(tmp_path):
    with pytest.raises(NotFoundError, match=r"missing\.txt"):
        text_file_dictionary(tmp_path / "missing.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("ok\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(InvalidInputError, match=r"latin1\.txt is not UTF-8"):
        list(text_file_dictionary(latin1).entries())


def test_fingerprints_are_stable_and_content_sensitive(tmp_path):
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    base = text_file_dictionary(write("a.txt", "dog\ncat\nbird\n"))
    assert base.fingerprint() == base.fingerprint()
    assert base.fingerprint() == naive_fingerprint(["dog", "cat", "bird"])
    # Same entries after cleaning: same fingerprint, though the files and sources differ.
    messy = text_file_dictionary(write("b.txt", "  dog\n\ncat \ndog\nbird"))
    assert messy.fingerprint() == base.fingerprint()
    assert messy.source != base.source
    for changed in ("dog\ncat\nbirds\n", "cat\ndog\nbird\n", "dog\ncat\n", "dog cat\nbird\n"):
        other = text_file_dictionary(write("c.txt", changed))
        assert other.fingerprint() != base.fingerprint(), changed


@needs_wordnet
def test_wordnet_nouns():
    dictionary = wordnet_nouns_dictionary()
    entries = list(dictionary.entries())
    assert dictionary.source == "wordnet-nouns:/usr/share/wordnet"
    assert len(entries) == 117_798
    assert entries[:3] == ["'hood", "'s gravenhage", ".22"]
    assert not any("_" in entry for entry in entries)
    assert {"dog", "great white shark", "hot dog"} <= set(entries)
    assert entries[-1] == "zyrian"


def test_wordnet_layout_with_dict_folder_and_header(tmp_path):
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "index.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by  \n"
        "  2 Princeton University under the following license.  \n"
        "a_cappella n 1 1 @ 1 0 07032817  \n"
        "dog n 7 5 @ ~ #m #p %p + 7 1 02084071 10114209  \n"
        "new_york_city n 1 3 @ #p %p 1 0 08524905  \n",
        encoding="utf-8",
    )
    dictionary = wordnet_nouns_dictionary(tmp_path)
    assert list(dictionary.entries()) == ["a cappella", "dog", "new york city"]
    assert dictionary.source == f"wordnet-nouns:{tmp_path.resolve()}"


def test_wordnet_missing_names_the_install_command(tmp_path):
    with pytest.raises(NotFoundError, match="apt-get install -y wordnet-base"):
        wordnet_nouns_dictionary(tmp_path)


def test_resolve_dictionary_forms(tmp_path, monkeypatch):
    path = tmp_path / "entries.txt"
    path.write_text("alpha\nbeta\n", encoding="utf-8")
    assert resolve_dictionary("imagenet").source == "imagenet"
    assert resolve_dictionary(" ImageNet ").source == "imagenet"
    assert resolve_dictionary(f"file:{path}").source == f"file:{path.resolve()}"
    assert list(resolve_dictionary(str(path)).entries()) == ["alpha", "beta"]
    monkeypatch.chdir(tmp_path)
    assert resolve_dictionary("entries.txt").source == f"file:{path.resolve()}"
    (tmp_path / "index.noun").write_text("dog n 1 0 1 0 02084071  \n", encoding="utf-8")
    assert list(resolve_dictionary(f"wordnet:{tmp_path}").entries()) == ["dog"]


@needs_wordnet
def test_resolve_wordnet():
    assert resolve_dictionary("wordnet").source == "wordnet-nouns:/usr/share/wordnet"


def test_resolve_dictionary_rejects_unknown_specs(tmp_path):
    for spec in ("imagenet21k", "", str(tmp_path / "absent.txt")):
        with pytest.raises(InvalidInputError, match="unknown dictionary") as raised:
            resolve_dictionary(spec)
        assert "'imagenet'" in str(raised.value) and "'file:" in str(raised.value)
    with pytest.raises(NotFoundError):
        resolve_dictionary(f"file:{tmp_path / 'absent.txt'}")
