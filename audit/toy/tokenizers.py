"""Tokenizers built offline, of the same classes the real models use.

- CLIP: a byte-level BPE ``CLIPTokenizer`` made from the original CLIP merges that open_clip ships
  (``bpe_simple_vocab_16e6.txt.gz``), trimmed to the merges that the toy vocabulary uses (or whole, for the
  full-size models of ``audit.testing.fullsize``). BPE applies merges in
  rank order, so keeping the used merges in their original order tokenises every toy word exactly as the full
  tokenizer would, while the embedding tables stay small (a few hundred rows instead of 49,408).
- BLIP: a WordPiece ``BertTokenizerFast`` trained on the captions, with BLIP's ``[DEC]`` bos token.
"""

from __future__ import annotations

import gzip
import tempfile
import importlib.util
from pathlib import Path

from ..errors import ModelNotFoundError
from . import scenes

CLIP_MAX_LENGTH = 77


def toy_words() -> list[str]:
    words = {"a", "at", "the", "and", "on", "background"}
    for group in (scenes.COLOURS, scenes.BACKGROUNDS, scenes.SHAPES, scenes.SIZES, scenes.POSITIONS):
        for name in group:
            words.update(name.split())
    return sorted(words)


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2/CLIP reversible byte -> printable unicode map.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _clip_merges() -> list[tuple[str, str]]:
    # find_spec locates the package without importing it (open_clip's import pulls in torchvision and timm).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("open_clip_torch is not installed; it ships the CLIP BPE merges the toy tokenizer needs")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """Apply BPE to one word; return the merges used, in order."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(parts) > 1:
        pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def build_clip_tokenizer(out: Path, words: list[str] | None = None, full: bool = False):
    """Save a CLIP BPE tokenizer to ``out`` and return it loaded back with ``from_pretrained``: trimmed to the
    merges ``words`` use, or with ``full`` all 48,894 merges (OpenAI CLIP's 49,408-token vocabulary and ids)."""
    from transformers import CLIPTokenizer

    merges = _clip_merges()
    if full:
        kept = merges
    else:
        ranks = {m: i for i, m in enumerate(merges)}
        used: set[tuple[str, str]] = set()
        for w in words or toy_words():
            used.update(_bpe(w, ranks))
        kept = [m for m in merges if m in used]
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in kept]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # transformers 5 builds CLIPTokenizer on the `tokenizers` backend from the vocab and merges themselves.
    tok = CLIPTokenizer(vocab=vocab, merges=list(kept), model_max_length=CLIP_MAX_LENGTH)
    tok.save_pretrained(out)
    return CLIPTokenizer.from_pretrained(out)


def build_blip_tokenizer(out: Path, captions: list[str], vocab_size: int = 256):
    """Train a WordPiece vocabulary on the captions; save a BERT tokenizer with BLIP's [DEC] bos token."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(
        captions,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wp.save_model(tmp)
        lines = (Path(tmp) / "vocab.txt").read_text(encoding="utf-8").splitlines()
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(lines)}, do_lower_case=True, model_max_length=32)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.save_pretrained(out)
    return BertTokenizerFast.from_pretrained(out)
