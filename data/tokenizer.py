"""Byte-level BPE tokenizer: trained on the training documents only, or loaded from an existing file.

Training is deterministic (measured: two trainings, also in two processes, give byte-identical
tokenizer.json), so a prepared dataset can be rebuilt bit for bit. The only special token is EOT, which
prepare.py puts before every document (the document separator, as in nanoGPT's fineweb.py).

Example:
    .venv/bin/python -c "from data.corpus import kjv_documents; from data.tokenizer import train_bpe; \
tok = train_bpe(kjv_documents()[0], 4096); print(tok.encode('In the beginning').tokens)"
"""

import hashlib
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.shards import DataError

EOT = "<|endoftext|>"


def train_bpe(docs: list[str], vocab_size: int = 4096) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE (EOT gets id 0, the 256 byte symbols follow, then merges)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size {vocab_size} is below 257 (EOT + the 256 byte symbols)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # All 256 bytes, even those absent from the corpus, so any text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def load_tokenizer(path_or_name: str, allow_hub: bool = False) -> Tokenizer:
    """A local tokenizer.json, or (only when allow_hub, i.e. for `prepare hf`) a Hugging Face Hub name."""
    if os.path.isfile(path_or_name):
        return Tokenizer.from_file(path_or_name)
    if not allow_hub:
        raise DataError(f"{path_or_name}: tokenizer file is missing")
    return Tokenizer.from_pretrained(path_or_name)


def eot_id(tok: Tokenizer, eot: str = EOT) -> int:
    token_id = tok.token_to_id(eot)
    if token_id is None:
        raise DataError(f"tokenizer has no {eot!r} token to separate documents")
    return token_id


def save_tokenizer(tok: Tokenizer, path: str) -> str:
    """Write tokenizer.json atomically; returns its sha256 (hex)."""
    payload = tok.to_str(pretty=True).encode("utf-8")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)
    return hashlib.sha256(payload).hexdigest()
