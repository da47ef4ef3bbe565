"""`python -m data.prepare hf` offline, on local json datasets (`datasets.load_dataset` of a directory): a
dataset too small for --val-tokens and a missing --text-column are refused before anything is written, an
error mid-stream leaves the previous build as it was, --text-column reads another column, and the loader's
errors on an hf-built directory name the command that rebuilds it.

    .venv/bin/python -m pytest tests/test_data_prepare_hf.py -q
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from data.config import DataConfig
from data.corpus import kjv_documents
from data.loader import TokenData
from data.prepare import main, prepare_hf, rebuild_command
from data.shards import DataError, open_shard
from data.tokenizer import save_tokenizer, train_bpe

DOCS = kjv_documents()[1][:6]  # six validation chapters of the embedded corpus: real text, offline


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """(tokenizer.json path, the documents' token count with one EOT each) for a 300-entry BPE."""
    tokenizer = train_bpe(DOCS, 300)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(tokenizer, str(path))
    return str(path), sum(len(tokenizer.encode(d).ids) + 1 for d in DOCS)


def local_dataset(root: Path, column: str = "text") -> str:
    """A directory that datasets.load_dataset reads as a json dataset: DOCS under `column`, plus an id."""
    root.mkdir()
    with open(root / "part.jsonl", "w") as f:
        f.writelines(json.dumps({column: doc, "id": i}) + "\n" for i, doc in enumerate(DOCS))
    return str(root)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refusal(capsys, argv) -> str:
    """Run the CLI expecting a refusal: exit status 2 and exactly one stderr line, returned."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(lines) == 1, lines
    return lines[0]


def tokens(out: Path, meta: dict) -> list[int]:
    shards = meta["val_shards"] + meta["train_shards"]
    return np.concatenate([open_shard(str(out / r["file"])) for r in shards]).tolist()


def test_a_dataset_too_small_for_val_tokens_writes_nothing(tok, tmp_path, capsys):
    tokenizer, total = tok
    data = local_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    argv = ["hf", "--dataset", data, "--tokenizer", tokenizer, "--out", str(out)]
    # All of it would be validation (val-tokens = total) or more than all of it: refused, nothing written
    for val in (total, total + 5000):
        line = refusal(capsys, [*argv, "--val-tokens", str(val)])
        assert line == (f"error: data.prepare hf: {data}:train holds {total:,} tokens, fewer than the requested "
                        f"validation size --val-tokens {val:,} plus one training token; nothing was written")
        assert sorted(os.listdir(tmp_path)) == ["ds"]  # no output directory, no staging directory
    # One token fewer leaves exactly one training token
    main([*argv, "--val-tokens", str(total - 1)])
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["val_tokens"], meta["train_tokens"]) == (total - 1, 1)
    # An existing build is never touched by a refused one
    before = snapshot(out)
    refusal(capsys, [*argv, "--val-tokens", str(total)])
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["ds", "out"]


def test_an_error_mid_stream_leaves_the_previous_build(tok, tmp_path, monkeypatch):
    import datasets

    tokenizer = tok[0]
    out = tmp_path / "out"
    prepare_hf(str(out), local_dataset(tmp_path / "ds"), tokenizer, val_tokens=1000)
    before = snapshot(out)

    def lost_connection():
        yield from ({"text": d} for d in DOCS[:4])
        raise ConnectionError("the stream broke off")

    stream = datasets.IterableDataset.from_generator(lost_connection)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: stream)
    with pytest.raises(ConnectionError):
        prepare_hf(str(out), "remote/flaky", tokenizer, val_tokens=1000)  # other arguments: a rebuild
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["ds", "out"]


def test_text_column_reads_another_column(tok, tmp_path):
    tokenizer, total = tok
    base = ["--tokenizer", tokenizer, "--val-tokens", "2000", "--shard-tokens", "1500"]
    main(["hf", "--dataset", local_dataset(tmp_path / "text"), "--out", str(tmp_path / "a"), *base])
    main(["hf", "--dataset", local_dataset(tmp_path / "content", "content"), "--text-column", "content",
          "--out", str(tmp_path / "b"), *base])
    a, b = (json.loads((tmp_path / d / "meta.json").read_text()) for d in "ab")
    assert [r["tokens"] for r in b["val_shards"]] == [1500, 500] and b["train_tokens"] == total - 2000
    assert tokens(tmp_path / "b", b) == tokens(tmp_path / "a", a) and len(tokens(tmp_path / "a", a)) == total
    assert b["args"]["text_column"] == "content"


def test_a_missing_text_column_lists_the_columns(tok, tmp_path, capsys):
    data = local_dataset(tmp_path / "ds", "content")
    line = refusal(capsys, ["hf", "--dataset", data, "--tokenizer", tok[0], "--out", str(tmp_path / "out")])
    assert line == (f"error: data.prepare hf: {data}:train has no column 'text' (its columns: content, id); name "
                    "the text column with --text-column")
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_loader_errors_on_an_hf_build_name_its_command(tok, tmp_path):
    tokenizer = tok[0]
    data, out = local_dataset(tmp_path / "ds"), tmp_path / "out"
    meta = prepare_hf(str(out), data, tokenizer, max_tokens=3000, val_tokens=1000, shard_tokens=2000)
    command = f"python -m data.prepare hf --out {out} --dataset {data} --tokenizer {tokenizer} --max-tokens 3000 " \
              "--val-tokens 1000 --shard-tokens 2000"
    assert rebuild_command(meta["args"], str(out)) == command
    # trained with the default data config (data=kjv data.dir=...): the hint is the hf command, not KJV's
    cfg = DataConfig(dir=str(out), vocab_size=300, val_tokens=999)
    (out / "train_000001.bin").unlink()
    with pytest.raises(DataError) as err:
        TokenData(str(out), cfg, 64)
    assert str(err.value) == (f"{out / 'meta.json'}: lists train_shards (file, tokens) [('train_000000.bin', 2000), "
                              "('train_000001.bin', 1000)] but the directory holds [('train_000000.bin', 2000)]; "
                              f"rebuild the data with: {command}")
    # a validation split too small for data.val_tokens: the same command with a larger --val-tokens
    prepare_hf(str(out), data, tokenizer, max_tokens=3000, val_tokens=1000, shard_tokens=2000)
    with pytest.raises(DataError) as err:
        TokenData(str(out), DataConfig(dir=str(out), vocab_size=300, val_tokens=1000), 64)
    assert str(err.value) == (f"{out}: data.val_tokens = 1000 needs 1001 tokens (the last target) but val_*.bin "
                              "holds only 1000; lower data.val_tokens below 1000, or build the data for it with: "
                              + command.replace("--val-tokens 1000", "--val-tokens 1001"))
    # another vocabulary: an hf build's is its tokenizer's, so only the config can change
    with pytest.raises(DataError) as err:
        TokenData(str(out), DataConfig(dir=str(out), vocab_size=4096, val_tokens=999), 64)
    assert str(err.value).endswith("differs from data.vocab_size 4096; set data.vocab_size=300 for this data")
