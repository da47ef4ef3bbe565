"""Build a tokenized dataset: tokenizer.json + train_*.bin / val_*.bin shards + meta.json in one directory.

    python -m data.prepare kjv --out data/cache/kjv --vocab-size 4096 [--num-proc 2]
    python -m data.prepare hf --dataset HuggingFaceFW/fineweb-edu --config sample-10BT \
        --tokenizer gpt2 --out data/cache/fineweb-edu --max-tokens 1000000000 [--text-column text]

`kjv` is offline: the embedded King James Bible (data/corpus.py), a byte-level BPE trained on its training
chapters (data/tokenizer.py; or an existing tokenizer.json via --tokenizer), tokenized with `datasets`.
`hf` is for users who are online: it streams a Hugging Face dataset (a Hub name, or a local directory of
json/parquet/text files), reading the documents from --text-column; validation = the first --val-tokens
tokens of the stream, training = what follows (up to --max-tokens). Both paths share the same code from
tokenization on (encode_batch, ShardWriter, finish), which the tests exercise through `kjv`.

Each document is preceded by the EOT token (as in nanoGPT's fineweb.py). Shards hold --shard-tokens tokens
(default 100M; the last one of a split holds the rest), in the modded-nanogpt/llm.c format (data/shards.py).
meta.json records the format, corpus, source sha256, tokenizer {file, sha256, vocab_size, eot_id}, every
shard's {file, tokens, sha256}, max_token_id, unigram_entropy_nats (entropy of the training-token unigram
distribution: the loss of the best context-free model, a baseline any LM must beat) and the arguments
(from which rebuild_command gives the command line back, for the loader's error messages).

Cached: when meta.json's arguments equal the requested ones and every shard has the size its header and
meta.json say, nothing is done. Deterministic: the same arguments give the same bytes on every run
(--num-proc does not change the output, so it is not part of the recorded arguments).
Whole or not at all: a build is written into a staging directory and moved into --out only when complete, so
an error (a dataset too small for --val-tokens, a missing --text-column, a lost connection) leaves --out as
it was, or absent; the too-small and missing-column checks come before anything is written at all.

modded-nanogpt's shards need no preparation here: run its `data/cached_fineweb10B.py`, put the resulting
fineweb_train_*.bin / fineweb_val_*.bin in data/cache/fineweb10B and train with `data=fineweb10b`; they load
unchanged, without meta.json.
"""

import argparse
import contextlib
import functools
import glob
import inspect
import itertools
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from data.config import KJV_DIR
from data.corpus import KJV_SHA256, kjv_documents
from data.shards import DataError, open_shard, sha256_file, write_shard
from data.tokenizer import EOT, eot_id, load_tokenizer, save_tokenizer, train_bpe
from runtime.files import atomic_write_json

SHARD_TOKENS = 100_000_000


@functools.lru_cache(maxsize=1)
def _tokenizer_from_json(tokenizer_json: str) -> Tokenizer:
    # Built once per worker process: datasets.map ships the tokenizer as its JSON text.
    return Tokenizer.from_str(tokenizer_json)


def encode_batch(batch: dict, tokenizer_json: str, text_field: str, eot: int) -> dict:
    """datasets.map function: texts -> token ids, each document preceded by EOT."""
    tok = _tokenizer_from_json(tokenizer_json)
    return {"ids": [[eot] + enc.ids for enc in tok.encode_batch(batch[text_field])]}


def tokenize(dataset, tok: Tokenizer, eot: int, text_field: str = "text", num_proc: int | None = None):
    """A datasets.Dataset or IterableDataset of texts -> the same kind with one column, "ids"."""
    dataset = dataset.select_columns([text_field])
    kwargs = {"num_proc": num_proc} if num_proc and num_proc > 1 else {}
    fn_kwargs = {"tokenizer_json": tok.to_str(), "text_field": text_field, "eot": eot}
    return dataset.map(encode_batch, batched=True, fn_kwargs=fn_kwargs, remove_columns=[text_field], **kwargs)


class ShardWriter:
    """Cuts one split's token stream into shards of `shard_tokens` tokens: {split}_000000.bin, ..."""

    def __init__(self, out: str, split: str, shard_tokens: int, vocab_size: int):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.out, self.split = out, split
        self.buf = np.empty(shard_tokens, dtype=np.uint32)  # pages are touched only as tokens arrive
        self.fill = 0
        self.total = 0
        self.shards: list[dict] = []
        self.counts = np.zeros(vocab_size, dtype=np.int64)  # unigram counts, for the entropy baseline

    def add(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.uint32)
        self.total += ids.size
        while ids.size:
            n = min(ids.size, self.buf.size - self.fill)
            self.buf[self.fill:self.fill + n] = ids[:n]
            self.fill += n
            ids = ids[n:]
            if self.fill == self.buf.size:
                self._flush()

    def _flush(self) -> None:
        tokens = self.buf[:self.fill]
        name = f"{self.split}_{len(self.shards):06d}.bin"
        sha = write_shard(os.path.join(self.out, name), tokens)
        self.counts += np.bincount(tokens, minlength=self.counts.size)
        self.shards.append({"file": name, "tokens": int(self.fill), "sha256": sha})
        self.fill = 0

    def close(self) -> list[dict]:
        if self.fill:
            self._flush()
        return self.shards


def unigram_entropy_nats(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _up_to_date(out: str, args: dict) -> bool:
    try:
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
        if meta["args"] != args:
            return False
        for rec in meta["train_shards"] + meta["val_shards"]:
            if len(open_shard(os.path.join(out, rec["file"]))) != rec["tokens"]:
                return False
        return sha256_file(os.path.join(out, meta["tokenizer"]["file"])) == meta["tokenizer"]["sha256"]
    except (OSError, ValueError, KeyError):  # missing or unreadable files, bad JSON, DataError
        return False


def _build_files(out: str) -> list[str]:
    """The files of a build in `out`, meta.json first (removed first, written last)."""
    files = [os.path.join(out, name) for name in ("meta.json", "tokenizer.json")]
    files += sorted(glob.glob(os.path.join(out, "train_" + "[0-9]" * 6 + ".bin")))
    files += sorted(glob.glob(os.path.join(out, "val_" + "[0-9]" * 6 + ".bin")))
    return [f for f in files if os.path.exists(f)]


@contextlib.contextmanager
def _staged(out: str):
    """A fresh directory to build in. On success its files replace the previous build of `out` (meta.json
    removed first and written last, so a crash never leaves a valid-looking mix; other files of `out`, such as
    a baselines cache, stay); on any error it is removed and `out` is left as it was (or absent)."""
    out = os.path.abspath(out)
    # Inside an existing `out` (the same file system, even when `out` is a link), else beside it.
    name = f".partial-{os.getpid()}"
    stage = os.path.join(out, name) if os.path.isdir(out) else out + name
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if not os.path.isdir(out):
        os.replace(stage, out)
        return
    for path in _build_files(out):
        os.remove(path)
    for path in reversed(_build_files(stage)):  # meta.json last
        os.replace(path, os.path.join(out, os.path.basename(path)))
    os.rmdir(stage)


def finish(out: str, corpus: str, source_sha256: str | None, tok: Tokenizer, tok_sha256: str, eot: int,
           train: ShardWriter, val: ShardWriter, args: dict) -> dict:
    train_shards, val_shards = train.close(), val.close()
    if not train_shards or not val_shards:
        raise DataError("data.prepare: the train or the val split came out empty; nothing was written")
    counts = train.counts + val.counts
    dtypes = sorted({str(open_shard(os.path.join(out, r["file"])).dtype) for r in train_shards + val_shards})
    meta = {
        "format": {"header_int32": 256, "token_dtypes": dtypes},
        "corpus": corpus,
        "source_sha256": source_sha256,
        "tokenizer": {"file": "tokenizer.json", "sha256": tok_sha256, "vocab_size": tok.get_vocab_size(),
                      "eot_id": eot},
        "train_shards": train_shards,
        "val_shards": val_shards,
        "train_tokens": train.total,
        "val_tokens": val.total,
        "max_token_id": int(np.flatnonzero(counts).max()),
        "unigram_entropy_nats": unigram_entropy_nats(train.counts),
        "args": args,
    }
    atomic_write_json(Path(out) / "meta.json", meta)
    return meta


def prepare_kjv(out: str, vocab_size: int | None = 4096, shard_tokens: int = SHARD_TOKENS,
                num_proc: int = 1, tokenizer: str | None = None) -> dict:
    """Prepare the embedded KJV corpus; returns meta.json's content. `tokenizer`: an existing
    tokenizer.json to use instead of training one (then vocab_size must be None)."""
    import datasets  # deferred: importing datasets takes a second and only preparation needs it

    if (tokenizer is None) == (vocab_size is None):
        raise ValueError("give exactly one of vocab_size (train a BPE) and tokenizer (an existing file)")
    train_docs, val_docs = kjv_documents()  # checks the sha256 pin first, even when the cache is valid
    args = {"corpus": "kjv", "vocab_size": vocab_size, "shard_tokens": shard_tokens,
            "tokenizer_sha256": sha256_file(tokenizer) if tokenizer else None}
    if _up_to_date(out, args):
        print(f"{out}: up to date (meta.json matches the arguments and the shard sizes); nothing to do")
        with open(os.path.join(out, "meta.json")) as f:
            return json.load(f)
    t0 = time.time()
    tok = load_tokenizer(tokenizer) if tokenizer else train_bpe(train_docs, vocab_size)
    eot = eot_id(tok)
    with _staged(out) as stage:
        tok_sha = save_tokenizer(tok, os.path.join(stage, "tokenizer.json"))
        writers = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            writers[split] = ShardWriter(stage, split, shard_tokens, tok.get_vocab_size())
            for row in tokenize(datasets.Dataset.from_dict({"text": docs}), tok, eot, num_proc=num_proc):
                writers[split].add(row["ids"])
        meta = finish(stage, "kjv", KJV_SHA256, tok, tok_sha, eot, writers["train"], writers["val"], args)
    print(f"{out}: {len(train_docs)} train / {len(val_docs)} val chapters -> {meta['train_tokens']:,} / "
          f"{meta['val_tokens']:,} tokens, vocab {meta['tokenizer']['vocab_size']}, unigram entropy "
          f"{meta['unigram_entropy_nats']:.4f} nats, {time.time() - t0:.1f} s")
    return meta


def _columns(stream) -> list[str]:
    """A streamed dataset's column names; some builders know them only once a row is read."""
    if stream.column_names is not None:
        return list(stream.column_names)
    return list(next(iter(stream), {}))


def prepare_hf(out: str, dataset: str, tokenizer: str, config: str | None = None, split: str = "train",
               text_column: str = "text", max_tokens: int | None = None, val_tokens: int = 2**24,
               shard_tokens: int = SHARD_TOKENS, eot: str = EOT) -> dict:
    """Stream a Hugging Face dataset (a Hub name needs the network); returns meta.json's content."""
    import datasets

    for key, value in (("val_tokens", val_tokens), ("max_tokens", max_tokens), ("shard_tokens", shard_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"data.prepare hf: --{key.replace('_', '-')} must be positive, got {value}")
    args = {"corpus": "hf", "dataset": dataset, "config": config, "split": split, "text_column": text_column,
            "tokenizer": tokenizer, "max_tokens": max_tokens, "val_tokens": val_tokens,
            "shard_tokens": shard_tokens, "eot": eot}
    if _up_to_date(out, args):
        print(f"{out}: up to date (meta.json matches the arguments and the shard sizes); nothing to do")
        with open(os.path.join(out, "meta.json")) as f:
            return json.load(f)
    t0 = time.time()
    tok = load_tokenizer(tokenizer, allow_hub=True)
    eot_token = eot_id(tok, eot)
    name = f"{dataset}" + (f"/{config}" if config else "") + f":{split}"
    stream = datasets.load_dataset(dataset, config, split=split, streaming=True)
    columns = _columns(stream)
    if text_column not in columns:
        raise DataError(f"data.prepare hf: {name} has no column {text_column!r} (its columns: "
                        f"{', '.join(columns) or 'none'}); name the text column with --text-column")
    rows = (np.asarray(row["ids"], dtype=np.uint32) for row in tokenize(stream, tok, eot_token, text_column))
    # The stream's first val_tokens tokens are validation, the rest training: hold the rows in memory until
    # they cover both (at most val_tokens + one document), so that a dataset too small writes nothing.
    head, held = [], 0
    for ids in rows:
        head.append(ids)
        held += ids.size
        if held > val_tokens:
            break
    else:
        raise DataError(f"data.prepare hf: {name} holds {held:,} tokens, fewer than the requested validation "
                        f"size --val-tokens {val_tokens:,} plus one training token; nothing was written")
    with _staged(out) as stage:
        tok_sha = save_tokenizer(tok, os.path.join(stage, "tokenizer.json"))
        val = ShardWriter(stage, "val", shard_tokens, tok.get_vocab_size())
        train = ShardWriter(stage, "train", shard_tokens, tok.get_vocab_size())
        for ids in itertools.chain(head, rows):
            take = min(ids.size, val_tokens - val.total)
            val.add(ids[:take])
            ids = ids[take:]
            if max_tokens is not None:
                ids = ids[:max_tokens - train.total]
            train.add(ids)
            if max_tokens is not None and train.total >= max_tokens:
                break
        meta = finish(stage, f"hf:{name}", None, tok, tok_sha, eot_token, train, val, args)
    print(f"{out}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens, "
          f"unigram entropy {meta['unigram_entropy_nats']:.4f} nats, {time.time() - t0:.1f} s")
    return meta


def rebuild_command(args: dict, out: str) -> str:
    """The command line that builds `out` again from its meta.json "args" (options in the function's order,
    those at their default left out); the loader's errors name it."""
    corpus = args["corpus"]
    options = {k: v for k, v in args.items() if k != "corpus"}
    if corpus == "kjv" and options.pop("tokenizer_sha256", None):  # that tokenizer is the one kept in `out`
        options.update(tokenizer=os.path.join(out, "tokenizer.json"), vocab_size=None)
    words = ["python", "-m", "data.prepare", corpus, "--out", out]
    for key, param in inspect.signature({"kjv": prepare_kjv, "hf": prepare_hf}[corpus]).parameters.items():
        if options.get(key) is not None and options[key] != param.default:
            words += [f"--{key.replace('_', '-')}", str(options[key])]
    return shlex.join(words)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    kjv = sub.add_parser("kjv", help="the embedded King James Bible (offline)")
    kjv.add_argument("--out", default=KJV_DIR, help="default: this repository's data/cache/kjv")
    group = kjv.add_mutually_exclusive_group()
    group.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size (default 4096)")
    group.add_argument("--tokenizer", help="use this existing tokenizer.json instead of training one")
    kjv.add_argument("--num-proc", type=int, default=1, help="tokenization processes (output is the same)")
    kjv.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS)
    hf = sub.add_parser("hf", help="stream a Hugging Face dataset (a Hub name needs the network)")
    hf.add_argument("--dataset", required=True, help="a Hub name, or a local directory of json/parquet/text files")
    hf.add_argument("--config")
    hf.add_argument("--split", default="train")
    hf.add_argument("--text-column", "--text-field", default="text", help="the column holding the documents")
    hf.add_argument("--tokenizer", required=True, help="a tokenizer.json path or a Hub name (e.g. gpt2)")
    hf.add_argument("--eot", default=EOT, help="the document-separator token of that tokenizer")
    hf.add_argument("--out", required=True)
    hf.add_argument("--max-tokens", type=int, help="stop after this many training tokens")
    hf.add_argument("--val-tokens", type=int, default=2**24,
                    help="validation tokens; keep it above data.val_tokens (the loader needs val_tokens + 1)")
    hf.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS)
    a = parser.parse_args(argv)
    try:
        if a.source == "kjv":
            vocab_size = 4096 if a.vocab_size is None and a.tokenizer is None else a.vocab_size
            prepare_kjv(a.out, vocab_size, a.shard_tokens, a.num_proc, a.tokenizer)
        else:
            prepare_hf(a.out, a.dataset, a.tokenizer, a.config, a.split, a.text_column, a.max_tokens,
                       a.val_tokens, a.shard_tokens, a.eot)
    except (ValueError, FileNotFoundError) as e:  # DataError, a dataset not found: one line, exit status 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
