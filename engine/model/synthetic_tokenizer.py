"""An offline OPT-style tokenizer: byte-level BPE trained on text that ships with Python.

No tokenizer can be downloaded here, so `make-model` trains one with the `tokenizers` library on
the Python standard library's source. It mirrors OPT's conventions: <s>=0, <pad>=1, </s>=2,
<unk>=3, and every encoded text starts with </s> (OPT's BOS), so ids and padding behave like the
real GPT-2-based OPT tokenizer.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
CORPUS_BYTES = 40_000_000  # the whole stdlib: about 50k merges in ~15 s


def stdlib_corpus(max_bytes: int = CORPUS_BYTES) -> list[str]:
    """Source files of the standard library, in a fixed order so training is reproducible."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def train_tokenizer(vocab_size: int, bos_token: str = "</s>"):
    """A transformers PreTrainedTokenizerFast with OPT's special tokens, every text starting with
    `bos_token` (OPT's </s>; the Llama family's <s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A </s> $B",
        special_tokens=list({bos_token: SPECIAL_TOKENS.index(bos_token), "</s>": 2}.items()))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos_token, eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", model_max_length=2048)


def write_tokenizer(out_dir: Path, vocab_size: int, bos_token: str = "</s>") -> None:
    # OPT pads its embedding matrix to a multiple of 8 (50272) over 50265 real tokens.
    train_tokenizer(min(vocab_size, 50265), bos_token).save_pretrained(str(out_dir))
