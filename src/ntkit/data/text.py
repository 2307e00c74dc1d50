"""Masked-language-modelling text: WikiText-2 and Tiny Shakespeare, WordPiece, blocks, masking.

Pipeline (the same for every text dataset):

1. **Splits.** Read the dataset's files as lines (``readlines``, as PyTorch's
   ``word_language_model`` does) and cut them into train / val / test. WikiText-2 uses its own
   splits when ``wiki.train.tokens`` / ``train.txt`` is present; otherwise the *offline split*
   ``train = valid[:90%]``, ``val = valid[90%:]``, ``test = test`` (by lines) — reports must carry
   :attr:`MLMData.split_note`. Tiny Shakespeare is split 90 / 5 / 5 % by lines, in order.
2. **Word counts** of each split and source file in the PyTorch convention (whitespace split
   plus one ``<eos>`` per line): :class:`WordCounts`.
3. **WordPiece** (HF ``tokenizers``), trained on the *train split only*: BERT normaliser
   (lower-casing by default, accents kept), BERT pre-tokeniser, specials
   ``[PAD] [UNK] [CLS] [SEP] [MASK]`` = ids 0..4. WikiText's ``<unk>`` is mapped to ``[UNK]``
   before training and encoding, so it stays one token. Cached as JSON under
   ``<cache_dir>/tokenizers/`` keyed by (dataset, split scheme, vocab size, lower-casing, sha256
   of the training text). HF's WordPiece trainer is *not* bit-reproducible across processes
   (huggingface/tokenizers#1794: hash-map order breaks merge ties; two runs share ~99.8 % of an
   8000-token vocabulary), so the cache is what makes runs comparable: the first process to
   write an entry wins and every later or concurrent process loads it. Copy the cache file to
   reproduce a run elsewhere. The recipes' own tokenizers (WikiText-2's offline split at 600,
   2000 and 8000 tokens) ship with ntkit (:data:`PACKAGED_TOKENIZERS`), so every machine gets
   the same ones.
4. **Blocks.** Each non-blank line is encoded (no specials) and followed by ``[SEP]``; the
   stream of a split is cut into blocks of ``block_size`` tokens, the last one right-padded
   with ``[PAD]`` (no token is dropped). Cached as a ``.pt`` under ``<cache_dir>/blocks/``.
5. **Masking** per batch by :func:`mask_tokens` / :class:`MLMCollator`: each non-special token
   is selected with probability 0.15; selected tokens become ``[MASK]`` (80 %), a random
   non-special token (10 %) or stay (10 %); labels hold the original id at selected positions
   and -100 elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ntkit.data import files
from ntkit.data.files import atomic_write_bytes, resolve_cache_dir, resolve_data_dir
from ntkit.errors import DataError, check

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "MLMCollator",
    "MLMData",
    "WordCounts",
    "encode_blocks",
    "load_tinyshakespeare",
    "load_wikitext2",
    "mask_tokens",
    "train_wordpiece",
    "word_counts",
]

#: Special tokens, in id order (``[PAD]`` = 0 … ``[MASK]`` = 4).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_FORMAT_VERSION = "1"  # bump when the tokenizer recipe or the block layout changes


@dataclass(frozen=True)
class WordCounts:
    """Word-level size of a text in the PyTorch ``word_language_model`` convention.

    Attributes:
        lines: number of lines (each contributes one ``<eos>``).
        tokens: whitespace-separated words plus one ``<eos>`` per line.
        types: distinct words including ``<eos>``.
    """

    lines: int
    tokens: int
    types: int


def word_counts(lines: Sequence[str]) -> WordCounts:
    """Count ``lines`` (as returned by ``readlines``) in the PyTorch convention."""
    vocab: set[str] = {"<eos>"} if lines else set()
    tokens = 0
    for line in lines:
        words = line.split()
        tokens += len(words) + 1
        vocab.update(words)
    return WordCounts(lines=len(lines), tokens=tokens, types=len(vocab))


@dataclass(frozen=True, eq=False)
class MLMData:
    """A tokenized MLM corpus in fixed-length blocks.

    Attributes:
        train, val, test: int64 [N_blocks, block_size] token ids; the last block of each split may
            end in ``pad_id``.
        tokenizer: the trained ``tokenizers.Tokenizer`` (WordPiece).
        vocab_size: tokenizer vocabulary size (ids are ``0 .. vocab_size-1``).
        pad_id, mask_id: ids of ``[PAD]`` and ``[MASK]``.
        name: registry name.
        split_note: how train / val / test were made, for every report that uses them.
        token_counts: word-level :class:`WordCounts` of the ``"train"``, ``"val"``, ``"test"`` text.
        source_counts: :class:`WordCounts` of each source file read, by file name.
        subword_counts: WordPiece tokens per split (including one ``[SEP]`` per line, excluding pads).
        special_ids: ids never selected for masking (``[PAD]``, ``[CLS]``, ``[SEP]``, ``[MASK]``).
        block_size: T.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    tokenizer: Tokenizer
    vocab_size: int
    pad_id: int
    mask_id: int
    name: str
    split_note: str
    token_counts: dict[str, WordCounts]
    source_counts: dict[str, WordCounts] = field(default_factory=dict)
    subword_counts: dict[str, int] = field(default_factory=dict)
    special_ids: tuple[int, ...] = (0, 2, 3, 4)
    block_size: int = 0

    def collator(self, prob: float = 0.15, generator: torch.Generator | None = None) -> MLMCollator:
        """An :class:`MLMCollator` for this vocabulary."""
        return MLMCollator(
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            special_ids=self.special_ids,
            prob=prob,
            random_low=len(SPECIAL_TOKENS),
            generator=generator,
        )

    def unigram_floor(self, split: str = "val", blocks: int = 0) -> float:
        """Cross-entropy in nats, on the maskable tokens of ``split`` (its first ``blocks``
        blocks; 0 = all), of the train split's token frequencies (add-½ smoothing over the
        maskable vocabulary): the loss of the best context-free MLM predictor. A model whose
        validation loss is not clearly below it has learned nothing beyond token frequencies."""
        check(split in ("val", "test", "train"), "split", split, "val, test or train")
        special = torch.tensor(self.special_ids)

        def tokens(t: Tensor) -> Tensor:
            t = t.reshape(-1)
            return t[~torch.isin(t, special)]

        counts = torch.bincount(tokens(self.train), minlength=self.vocab_size).double() + 0.5
        counts[special] = 0.0
        logp = (counts / counts.sum()).log()
        target = getattr(self, split)
        target = tokens(target[:blocks] if blocks else target)
        check(target.numel() > 0, "split", split, "a split with maskable tokens")
        return float(-logp[target].mean())

    def __repr__(self) -> str:
        return (
            f"MLMData(name={self.name!r}, blocks={len(self.train)}/{len(self.val)}/{len(self.test)} x "
            f"{self.block_size}, vocab_size={self.vocab_size}, split_note={self.split_note!r})"
        )


# --------------------------------------------------------------------------- masking


def mask_tokens(
    ids: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int] = (0,),
    prob: float = 0.15,
    random_low: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: select, then 80 % ``[MASK]`` / 10 % random token / 10 % unchanged.

    Args:
        ids: int64 [..., T] token ids (not modified).
        mask_id: id of ``[MASK]``.
        vocab_size: random replacements are drawn uniformly from ``[random_low, vocab_size)``.
        special_ids: ids never selected (at least the pad id).
        prob: selection probability per non-special token.
        random_low: first id eligible as a random replacement (skip the specials).
        generator: CPU generator for all draws (same generator state → same output).

    Returns:
        ``(inputs, labels)``, both int64 like ``ids``; ``labels`` is the original id at selected
        positions and -100 elsewhere.
    """
    check(0.0 <= prob <= 1.0, "prob", prob, "a probability in [0, 1]")
    check(0 <= random_low < vocab_size, "random_low", random_low, f"an id in [0, {vocab_size})")
    special = torch.isin(ids, torch.as_tensor(list(special_ids), dtype=ids.dtype, device=ids.device))
    draw = torch.rand(ids.shape, generator=generator).to(ids.device)
    selected = (draw < prob) & ~special
    how = torch.rand(ids.shape, generator=generator).to(ids.device)
    replacement = torch.randint(random_low, vocab_size, ids.shape, generator=generator).to(ids.device)
    inputs = torch.where(selected & (how < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(selected & (how >= 0.8) & (how < 0.9), replacement, inputs)
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    return inputs, labels


@dataclass
class MLMCollator:
    """Batch collator for MLM: stacks blocks and applies :func:`mask_tokens`.

    Call with a list of int64 [T] tensors (what a ``DataLoader`` over ``MLMData.train`` yields
    per sample) or with an int64 [B, T] tensor. Returns ``{"input_ids", "labels",
    "attention_mask"}``, each [B, T]; ``attention_mask`` is 1 where the token is not padding
    (pad id = ``special_ids[0]``).
    """

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = (0, 2, 3, 4)
    prob: float = 0.15
    random_low: int = len(SPECIAL_TOKENS)
    generator: torch.Generator | None = None

    def __call__(self, batch: Sequence[Tensor] | Tensor) -> dict[str, Tensor]:
        ids = batch if isinstance(batch, Tensor) else torch.stack(list(batch))
        inputs, labels = mask_tokens(
            ids,
            mask_id=self.mask_id,
            vocab_size=self.vocab_size,
            special_ids=self.special_ids,
            prob=self.prob,
            random_low=self.random_low,
            generator=self.generator,
        )
        return {"input_ids": inputs, "labels": labels, "attention_mask": (ids != self.special_ids[0]).long()}


# --------------------------------------------------------------------------- tokenizer + blocks


def _prep(line: str) -> str:
    return line.replace("<unk>", "[UNK]")


def _nonblank(lines: Sequence[str]) -> list[str]:
    return [_prep(s.strip()) for s in lines if s.strip()]


def train_wordpiece(lines: Sequence[str], vocab_size: int = 8000, lowercase: bool = True) -> Tokenizer:
    """Train a WordPiece ``tokenizers.Tokenizer`` on ``lines`` (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    check(
        vocab_size > len(SPECIAL_TOKENS) + 1, "vocab_size", vocab_size, f"an int > {len(SPECIAL_TOKENS) + 1}"
    )
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(_nonblank(lines), trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:  # the contract every consumer relies on
            raise RuntimeError(f"tokenizer put {s} at id {tok.token_to_id(s)}, expected {i}")
    return tok


def encode_blocks(tokenizer: Tokenizer, lines: Sequence[str], block_size: int) -> tuple[Tensor, int]:
    """Encode non-blank ``lines`` (+ ``[SEP]`` after each) into [N, block_size] int64 blocks.

    Returns:
        ``(blocks, n_tokens)``: blocks, the last right-padded with ``[PAD]``; and the number of
        real (non-pad) tokens.
    """
    check(block_size >= 2, "block_size", block_size, "an int >= 2")
    text = _nonblank(lines)
    sep = SPECIAL_TOKENS.index("[SEP]")
    pad = SPECIAL_TOKENS.index("[PAD]")
    encs = tokenizer.encode_batch(text, add_special_tokens=False)
    stream: list[int] = []
    for e in encs:
        stream.extend(e.ids)
        stream.append(sep)
    n = len(stream)
    n_blocks = -(-n // block_size)
    stream.extend([pad] * (n_blocks * block_size - n))
    return torch.tensor(stream, dtype=torch.long).view(n_blocks, block_size), n


def _sha(lines: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in lines:
        h.update(s.encode("utf-8"))
    return h.hexdigest()


#: Tokenizers that ship with ntkit, keyed like the cache: WikiText-2's offline split (the one the
#: recipes use where the train split is missing, as in ``../shared/data``) at the recipes' vocabulary
#: sizes of the ci / quick / cpu tiers (600, 2000, 8000), lower-cased. Written by
#: :func:`package_tokenizers`; any other key is trained and cached as usual.
PACKAGED_TOKENIZERS = Path(__file__).resolve().parent / "_embedded" / "tokenizers"


def package_tokenizers(vocab_sizes: Sequence[int] = (600, 2000, 8000),
                       data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Train WikiText-2's offline-split tokenizers at ``vocab_sizes`` anew and ship them
    (:data:`PACKAGED_TOKENIZERS`, replacing those there). Run by a maintainer, rarely: every
    machine then loads the same vocabularies, where training gives each process its own
    (huggingface/tokenizers#1794), and a fresh machine would get other numbers than the golden ones.
    Regenerate the golden numbers of the text recipes after."""
    import tempfile

    written = []
    for v in vocab_sizes:
        for old in PACKAGED_TOKENIZERS.glob(f"wikitext2-offline-v{v}-lc-*.json"):
            old.unlink()
        with tempfile.TemporaryDirectory() as tmp:  # a fresh cache: train, do not load an old entry
            data = load_wikitext2(data_dir=data_dir, vocab_size=v, block_size=8, cache_dir=tmp)
            (src,) = (Path(tmp) / "tokenizers").glob("*.json")
        if not src.name.startswith(f"wikitext2-offline-v{v}-lc-"):
            raise DataError(f"package_tokenizers: {src.name} is not WikiText-2's offline split; pass the shared data dir")
        dst = PACKAGED_TOKENIZERS / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(data.tokenizer.to_str(), encoding="utf-8")
        written.append(dst)
    return written


def _tokenizer_key(
    dataset: str, scheme: str, train_lines: Sequence[str], vocab_size: int, lowercase: bool
) -> str:
    """Cache key: (dataset, split scheme, vocab size, casing, sha256 of the training text, format)."""
    case = "lc" if lowercase else "cased"
    return f"{dataset}-{scheme}-v{vocab_size}-{case}-{_sha(train_lines)[:16]}-f{_FORMAT_VERSION}"


def _cached_tokenizer(
    cache: Path, dataset: str, scheme: str, train_lines: Sequence[str], vocab_size: int, lowercase: bool
) -> tuple[Tokenizer, str]:
    from tokenizers import Tokenizer

    key = _tokenizer_key(dataset, scheme, train_lines, vocab_size, lowercase)
    shipped = PACKAGED_TOKENIZERS / f"{key}.json"
    if shipped.is_file():  # the recipes' tokenizers, the same on every machine
        return Tokenizer.from_file(str(shipped)), key
    path = cache / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path)), key
        except Exception:  # noqa: BLE001 (a damaged cache entry is rebuilt, not fatal)
            path.unlink(missing_ok=True)
    tok = train_wordpiece(train_lines, vocab_size, lowercase)
    # WordPiece training is not bit-reproducible (huggingface/tokenizers#1794), so the first
    # process to write the cache entry wins and every other process loads that one.
    try:
        if not atomic_write_bytes(path, tok.to_str().encode("utf-8"), exclusive=True):
            tok = Tokenizer.from_file(str(path))
    except OSError:
        pass  # read-only cache: still usable, just not cached
    return tok, key


def _build(
    name: str,
    splits: dict[str, list[str]],
    sources: dict[str, list[str]],
    scheme: str,
    split_note: str,
    *,
    vocab_size: int,
    block_size: int,
    lowercase: bool,
    limit: int | None,
    cache_dir: str | os.PathLike[str] | None,
) -> MLMData:
    for k, v in splits.items():
        if not any(s.strip() for s in v):
            raise DataError(f"{name}: the {k} split is empty ({split_note})")
    cache = resolve_cache_dir(cache_dir)
    tok, key = _cached_tokenizer(cache, name, scheme, splits["train"], vocab_size, lowercase)
    tok_sha = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()
    texts_sha = hashlib.sha256("".join([tok_sha, *(_sha(v) for v in splits.values())]).encode()).hexdigest()
    bpath = cache / "blocks" / f"{key}-T{block_size}-{texts_sha[:16]}.pt"
    blocks: dict[str, Tensor] | None = None
    counts: dict[str, int] = {}
    if bpath.is_file():
        try:
            obj = torch.load(bpath, weights_only=True)
            blocks, counts = obj["blocks"], {k: int(v) for k, v in obj["counts"].items()}
        except Exception:  # noqa: BLE001 (damaged cache entry: rebuild)
            blocks = None
    if blocks is None:
        blocks, counts = {}, {}
        for k, v in splits.items():
            blocks[k], counts[k] = encode_blocks(tok, v, block_size)
        buf = io.BytesIO()
        torch.save({"blocks": blocks, "counts": counts}, buf)
        try:
            atomic_write_bytes(bpath, buf.getvalue())
        except OSError:
            pass
    return MLMData(
        train=blocks["train"][:limit],
        val=blocks["val"][:limit],
        test=blocks["test"][:limit],
        tokenizer=tok,
        vocab_size=tok.get_vocab_size(),
        pad_id=SPECIAL_TOKENS.index("[PAD]"),
        mask_id=SPECIAL_TOKENS.index("[MASK]"),
        name=name,
        split_note=split_note if limit is None else f"{split_note}; first {limit} blocks per split",
        token_counts={k: word_counts(v) for k, v in splits.items()},
        source_counts={k: word_counts(v) for k, v in sources.items()},
        subword_counts=counts,
        special_ids=tuple(SPECIAL_TOKENS.index(s) for s in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")),
        block_size=block_size,
    )


def _check_args(vocab_size: int, block_size: int, limit: int | None) -> None:
    check(
        vocab_size > len(SPECIAL_TOKENS) + 1, "vocab_size", vocab_size, f"an int > {len(SPECIAL_TOKENS) + 1}"
    )
    check(block_size >= 2, "block_size", block_size, "an int >= 2")
    check(limit is None or limit > 0, "limit", limit, "a positive int or None")


def _read_lines(path: Path) -> list[str]:
    try:
        with path.open("r", encoding="utf-8") as f:
            return f.readlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); expected a UTF-8 text file") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _first(folder: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def load_wikitext2(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    vocab_size: int = 8000,
    block_size: int = 128,
    lowercase: bool = True,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> MLMData:
    """WikiText-2 (word level) for MLM, from ``<data_dir>/wikitext-2/``.

    Files: ``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt``. Without the train
    file the offline split is used (train = first 90 % of valid lines, val = last 10 %, test =
    test) and ``split_note`` says so. ``download=True`` fetches all three splits when valid or
    test is missing.

    Args:
        vocab_size: WordPiece vocabulary size (8000 suits CPU-scale models).
        block_size: tokens per block, T.
        lowercase: lower-case before WordPiece.
        limit: keep the first ``limit`` blocks of each split (the tokenizer still sees all of train).
        cache_dir: see :func:`ntkit.data.files.resolve_cache_dir`.
    """
    _check_args(vocab_size, block_size, limit)
    root = resolve_data_dir(data_dir)
    folder = root / "wikitext-2"
    names = {s: (f"wiki.{s}.tokens", f"{s}.txt") for s in ("train", "valid", "test")}
    expected = (
        f"wiki.valid.tokens + wiki.test.tokens or valid.txt + test.txt in {folder} "
        f"(wiki.train.tokens / train.txt optional)"
    )
    paths = {s: _first(folder, n) for s, n in names.items()}
    if paths["valid"] is None or paths["test"] is None:
        if not download:
            raise DataError(f"wikitext2: no data under {root}; expected {expected} (or pass download=True)")
        files.download("wikitext2", root)
        paths = {s: _first(folder, n) for s, n in names.items()}
        if paths["valid"] is None or paths["test"] is None:
            raise DataError(f"wikitext2: download left no data under {root}; expected {expected}")
    valid, test = _read_lines(paths["valid"]), _read_lines(paths["test"])  # type: ignore[arg-type]
    sources = {paths["valid"].name: valid, paths["test"].name: test}  # type: ignore[union-attr]
    if paths["train"] is not None:
        train = _read_lines(paths["train"])
        sources[paths["train"].name] = train
        splits = {"train": train, "val": valid, "test": test}
        scheme, note = "standard", "standard: train=train, val=valid, test=test"
    else:
        cut = (9 * len(valid)) // 10
        splits = {"train": valid[:cut], "val": valid[cut:], "test": test}
        scheme = "offline"
        note = (
            f"offline: train=valid[:90%] ({cut} lines), val=valid[90%:] ({len(valid) - cut} lines), "
            f"test=test (wiki.train.tokens absent)"
        )
    return _build(
        "wikitext2",
        splits,
        sources,
        scheme,
        note,
        vocab_size=vocab_size,
        block_size=block_size,
        lowercase=lowercase,
        limit=limit,
        cache_dir=cache_dir,
    )


def load_tinyshakespeare(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    vocab_size: int = 8000,
    block_size: int = 128,
    lowercase: bool = True,
    limit: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
) -> MLMData:
    """Tiny Shakespeare (``<data_dir>/tinyshakespeare/input.txt``) for MLM.

    Split by lines, in order: train = first 90 %, val = next 5 %, test = last 5 % (40,000
    lines → 36,000 / 2,000 / 2,000). Other arguments as :func:`load_wikitext2`.
    """
    _check_args(vocab_size, block_size, limit)
    root = resolve_data_dir(data_dir)
    path = root / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        if not download:
            raise DataError(f"tinyshakespeare: no data under {root}; expected {path} (or pass download=True)")
        files.download("tinyshakespeare", root)
    lines = _read_lines(path)
    a, b = (90 * len(lines)) // 100, (95 * len(lines)) // 100
    splits = {"train": lines[:a], "val": lines[a:b], "test": lines[b:]}
    note = f"lines in order: train=[:90%] ({a}), val=[90%:95%] ({b - a}), test=[95%:] ({len(lines) - b})"
    return _build(
        "tinyshakespeare",
        splits,
        {path.name: lines},
        "90-5-5",
        note,
        vocab_size=vocab_size,
        block_size=block_size,
        lowercase=lowercase,
        limit=limit,
        cache_dir=cache_dir,
    )
