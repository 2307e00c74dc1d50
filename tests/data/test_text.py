"""Text MLM pipeline: WikiText-2 / Tiny Shakespeare splits, counts, WordPiece, blocks, masking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ntkit.data import MLMCollator, MLMData, load_dataset, mask_tokens, word_counts
from ntkit.data.text import PACKAGED_TOKENIZERS, SPECIAL_TOKENS, encode_blocks, train_wordpiece
from ntkit.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def cache_dir(ntkit_cache: Path) -> Path:
    return ntkit_cache


@pytest.fixture(scope="module")
def wikitext(data_dir_m: Path, cache_dir: Path) -> MLMData:
    return load_dataset("wikitext2", data_dir_m, cache_dir=cache_dir, block_size=128)  # type: ignore[return-value]


# --------------------------------------------------------------------------- word counts


def test_wikitext_word_counts_match_readme(wikitext: MLMData) -> None:
    """shared/data/README.md: valid 3,760 lines / 217,646 tokens / 13,777 types; test 4,358 / 245,569 / 14,143."""
    src = wikitext.source_counts
    assert (src["valid.txt"].lines, src["valid.txt"].tokens, src["valid.txt"].types) == (3760, 217646, 13777)
    assert (src["test.txt"].lines, src["test.txt"].tokens, src["test.txt"].types) == (4358, 245569, 14143)
    tc = wikitext.token_counts
    assert tc["train"].lines + tc["val"].lines == 3760
    assert tc["train"].tokens + tc["val"].tokens == 217646
    assert tc["train"].lines == 3384 and tc["test"] == src["test.txt"]


def test_offline_split_note(wikitext: MLMData) -> None:
    note = wikitext.split_note
    assert note.startswith("offline: train=valid[:90%]") and "val=valid[90%:]" in note
    assert "test=test (wiki.train.tokens absent)" in note


def test_word_counts_convention() -> None:
    c = word_counts([" = A = \n", " \n", "a b <unk> a\n"])
    assert (c.lines, c.tokens, c.types) == (
        3,
        3 + 1 + 0 + 1 + 4 + 1,
        len({"=", "A", "a", "b", "<unk>", "<eos>"}),
    )
    assert word_counts([]) == type(c)(0, 0, 0)


# --------------------------------------------------------------------------- tokenizer + blocks


def test_tokenizer_specials_and_blocks(wikitext: MLMData, data_dir: Path) -> None:
    tok = wikitext.tokenizer
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]  # type: ignore[attr-defined]
    assert wikitext.vocab_size == 8000 and wikitext.pad_id == 0 and wikitext.mask_id == 4
    for split in (wikitext.train, wikitext.val, wikitext.test):
        assert split.dtype == torch.int64 and split.ndim == 2 and split.shape[1] == 128
        assert int(split.min()) >= 0 and int(split.max()) < wikitext.vocab_size
        flat = split.flatten()
        pads = (flat == 0).nonzero().flatten()
        if len(pads):  # padding only as a suffix of the last block
            assert int(pads[0]) >= flat.numel() - 128 and bool((flat[int(pads[0]) :] == 0).all())
    for k, t in (("train", wikitext.train), ("val", wikitext.val), ("test", wikitext.test)):
        assert int((t != 0).sum()) == wikitext.subword_counts[k]
    # one [SEP] per non-blank line of the split
    valid = (data_dir / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert int((wikitext.val == 3).sum()) == sum(1 for s in valid[3384:] if s.strip())
    # <unk> stays a single [UNK] token; text decodes back to the lower-cased words
    enc = tok.encode("the <unk> of Homarus".replace("<unk>", "[UNK]"), add_special_tokens=False)  # type: ignore[attr-defined]
    assert enc.ids[1] == 1
    text = tok.decode(wikitext.train[0, :12].tolist())  # type: ignore[attr-defined]
    assert text.startswith("= homarus gammarus =")


def test_tokenizer_trained_on_train_split_only(wikitext: MLMData, data_dir: Path) -> None:
    vocab = wikitext.tokenizer.get_vocab()  # type: ignore[attr-defined]
    # frequent in test (stevens 137×, lester 109×) or val (turner 45×) but absent from train text:
    # a tokenizer that had seen them would hold them as whole words at vocab 8000
    assert "the" in vocab and "lobster" in vocab
    assert not {"stevens", "lester", "ironclads", "turner"} & set(vocab)
    # HF WordPiece training is not bit-reproducible across processes (huggingface/tokenizers#1794:
    # hash-map order breaks merge ties), hence the on-disk cache; a fresh run agrees on >99 % of tokens
    with (data_dir / "wikitext-2" / "valid.txt").open(encoding="utf-8") as f:
        valid = f.readlines()
    ref = train_wordpiece(valid[:3384], vocab_size=8000)
    assert len(set(ref.get_vocab()) & set(vocab)) > 0.99 * 8000  # type: ignore[attr-defined]
    blocks, n = encode_blocks(wikitext.tokenizer, valid[3384:], 128)
    assert torch.equal(blocks, wikitext.val) and n == wikitext.subword_counts["val"]


def test_cache_reused_and_keyed(wikitext: MLMData, data_dir: Path, cache_dir: Path) -> None:
    # the recipes' WikiText-2 tokenizers ship with ntkit: loaded, never trained into the cache
    assert not list((cache_dir / "tokenizers").glob("wikitext2-offline-*.json"))
    (shipped,) = PACKAGED_TOKENIZERS.glob("wikitext2-offline-v8000-lc-*.json")
    assert wikitext.tokenizer.to_str() == shipped.read_text(encoding="utf-8")
    blocks = sorted((cache_dir / "blocks").glob("wikitext2-offline-v8000-*-T128-*.pt"))
    assert len(blocks) == 1
    again = load_dataset("wikitext2", data_dir, cache_dir=cache_dir, limit=5)
    assert torch.equal(again.train, wikitext.train[:5]) and "first 5 blocks" in again.split_note
    blocks[0].write_bytes(b"broken")  # a damaged cache entry is rebuilt, not fatal
    rebuilt = load_dataset("wikitext2", data_dir, cache_dir=cache_dir)
    assert torch.equal(rebuilt.val, wikitext.val)


def test_shipped_tokenizers_make_fresh_machines_agree(data_dir: Path, tmp_path: Path) -> None:
    """Two empty caches (two fresh machines) get the same tokens at every shipped size; trained
    anew, the vocabularies differ (huggingface/tokenizers#1794), which is why they ship."""
    sizes = sorted(int(p.name.split("-v")[1].split("-")[0]) for p in PACKAGED_TOKENIZERS.glob("wikitext2-offline-*.json"))
    assert sizes == [600, 2000, 8000]  # the ci / quick / cpu tiers' vocabularies
    a = load_dataset("wikitext2", data_dir, vocab_size=600, block_size=16, cache_dir=tmp_path / "a")
    b = load_dataset("wikitext2", data_dir, vocab_size=600, block_size=16, cache_dir=tmp_path / "b")
    assert torch.equal(a.train, b.train) and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    with (data_dir / "wikitext-2" / "valid.txt").open(encoding="utf-8") as f:
        valid = f.readlines()
    trained = [train_wordpiece(valid[:3384], vocab_size=600).get_vocab() for _ in range(3)]
    assert any(t != a.tokenizer.get_vocab() for t in trained)


def _tiny_corpus(root: Path) -> Path:
    folder = root / "wikitext-2"
    folder.mkdir(parents=True)
    (folder / "wiki.train.tokens").write_text(" = T = \n the cat sat on the mat \n" * 50)
    (folder / "wiki.valid.tokens").write_text(" the dog sat \n" * 20)
    (folder / "wiki.test.tokens").write_text(" the <unk> sat \n" * 20)
    return root


def test_cache_keys_and_recovery(tmp_path: Path) -> None:
    root, cache = _tiny_corpus(tmp_path / "data"), tmp_path / "cache"
    a = load_dataset("wikitext2", root, vocab_size=60, block_size=8, cache_dir=cache)
    b = load_dataset("wikitext2", root, vocab_size=70, block_size=8, cache_dir=cache)
    names = sorted(p.name for p in (cache / "tokenizers").glob("*.json"))
    assert len(names) == 2 and names[0].startswith("wikitext2-standard-v60-lc-")
    assert names[1].startswith("wikitext2-standard-v70-lc-") and a.vocab_size <= 60 and b.vocab_size <= 70
    (root / "wikitext-2" / "wiki.train.tokens").write_text(" a new text \n" * 40)  # new text -> new key
    load_dataset("wikitext2", root, vocab_size=60, block_size=8, cache_dir=cache)
    assert len(list((cache / "tokenizers").glob("wikitext2-standard-v60-*.json"))) == 2
    for p in (cache / "tokenizers").glob("*.json"):
        p.write_text("{broken")
    c = load_dataset("wikitext2", root, vocab_size=60, block_size=8, cache_dir=cache)
    assert c.vocab_size <= 60 and c.train.shape[1] == 8


def test_concurrent_training_first_writer_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process writes the cache entry while we train: we must use its tokenizer."""
    from ntkit.data import text

    root, cache = _tiny_corpus(tmp_path / "data"), tmp_path / "cache"
    other = train_wordpiece(["zebra quagga okapi"] * 5, vocab_size=100)  # recognisably different
    real = text.train_wordpiece

    def racing_write(lines, vocab_size=8000, lowercase=True):  # type: ignore[no-untyped-def]
        tok = real(lines, vocab_size, lowercase)
        key = text._tokenizer_key("wikitext2", "standard", lines, vocab_size, lowercase)
        (cache / "tokenizers").mkdir(parents=True, exist_ok=True)
        (cache / "tokenizers" / f"{key}.json").write_text(other.to_str())  # the other process wins
        return tok

    monkeypatch.setattr(text, "train_wordpiece", racing_write)
    d = load_dataset("wikitext2", root, vocab_size=60, block_size=8, cache_dir=cache)
    assert d.tokenizer.get_vocab() == other.get_vocab()
    assert "zebra" in d.tokenizer.get_vocab()


def test_standard_split_when_train_present(tmp_path: Path) -> None:
    d = load_dataset(
        "wikitext2", _tiny_corpus(tmp_path), vocab_size=60, block_size=8, cache_dir=tmp_path / "c"
    )
    assert d.split_note == "standard: train=train, val=valid, test=test"
    assert d.token_counts["train"].lines == 100 and d.token_counts["val"].lines == 20
    assert set(d.source_counts) == {"wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"}
    assert d.test[0, :3].tolist() == [d.tokenizer.token_to_id("the"), 1, d.tokenizer.token_to_id("sat")]  # type: ignore[attr-defined]


def test_text_errors(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"wikitext2: no data under .*valid\.txt \+ test\.txt in .*wikitext-2"
    ) as e:
        load_dataset("wikitext2", tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="tinyshakespeare/input.txt"):
        load_dataset("tinyshakespeare", tmp_path)
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    (folder / "valid.txt").write_bytes(b"\xff\xfe bad utf8\n")
    (folder / "test.txt").write_text("ok\n")
    with pytest.raises(DataError, match="valid.txt: not UTF-8 text"):
        load_dataset("wikitext2", tmp_path)
    with pytest.raises(ConfigError, match="block_size=1"):
        load_dataset("tinyshakespeare", tmp_path / "nowhere", block_size=1)


def test_tinyshakespeare(data_dir: Path, cache_dir: Path) -> None:
    d = load_dataset("tinyshakespeare", data_dir, cache_dir=cache_dir, limit=20)
    tc = d.token_counts
    assert (tc["train"].lines, tc["val"].lines, tc["test"].lines) == (36000, 2000, 2000)
    words = sum(c.tokens - c.lines for c in tc.values())
    assert words == 202651  # README: 202,651 whitespace-separated words
    assert d.source_counts["input.txt"].lines == 40000
    assert d.train.shape == (20, 128) and "train=[:90%] (36000)" in d.split_note


# --------------------------------------------------------------------------- masking


def _ids(n: int, t: int, vocab: int, n_pad: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (n, t), generator=g)
    ids[:, t - n_pad :] = 0  # right padding
    ids[:, 0] = 3  # a [SEP]
    return ids


def test_mask_statistics() -> None:
    vocab, t, n_pad = 1000, 128, 28
    ids = _ids(2000, t, vocab, n_pad)
    g = torch.Generator().manual_seed(1)
    inputs, labels = mask_tokens(ids, mask_id=4, vocab_size=vocab, special_ids=(0, 2, 3, 4), random_low=5,
                                 generator=g)  # fmt: skip
    sel = labels != -100
    eligible = (ids != 0) & (ids != 3)
    n_el = int(eligible.sum())
    assert not bool((sel & ~eligible).any())  # pads and [SEP] never selected
    assert torch.equal(labels[sel], ids[sel])  # labels are the original ids
    assert bool((inputs[~sel] == ids[~sel]).all())  # unselected positions untouched
    rate = int(sel.sum()) / n_el
    assert abs(rate - 0.15) < 0.004  # sd ~ 0.0008 at n_el ~ 198k
    n_sel = int(sel.sum())
    masked = int((inputs[sel] == 4).sum()) / n_sel
    kept = int((inputs[sel] == ids[sel]).sum()) / n_sel
    randomised = 1 - masked - kept
    assert (
        abs(masked - 0.8) < 0.01
        and abs(kept - 0.1 - 0.1 / (vocab - 5)) < 0.01
        and abs(randomised - 0.1) < 0.01
    )
    repl = inputs[sel & (inputs != 4) & (inputs != ids)]
    assert int(repl.min()) >= 5 and int(repl.max()) < vocab  # random tokens are never specials
    # deterministic under the generator, different with another seed
    again = mask_tokens(ids, mask_id=4, vocab_size=vocab, special_ids=(0, 2, 3, 4), random_low=5,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    other = mask_tokens(ids, mask_id=4, vocab_size=vocab, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(other[1], labels)


def test_collator(wikitext: MLMData) -> None:
    col = wikitext.collator(generator=torch.Generator().manual_seed(0))
    assert isinstance(col, MLMCollator)
    last = wikitext.test[-4:]
    assert bool((last == 0).any())  # the padded final block is in this batch
    out = col(list(last))
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    assert out["input_ids"].shape == last.shape and out["labels"].dtype == torch.int64
    assert torch.equal(out["attention_mask"], (last != 0).long())
    assert bool((out["labels"][last == 0] == -100).all()) and bool((out["input_ids"][last == 0] == 0).all())
    sel = out["labels"] != -100
    assert torch.equal(out["labels"][sel], last[sel])
    loader = torch.utils.data.DataLoader(wikitext.val, batch_size=16, collate_fn=col)
    b = next(iter(loader))
    assert b["input_ids"].shape == (16, 128)
    with pytest.raises(ConfigError, match="prob=1.5"):
        mask_tokens(last, mask_id=4, vocab_size=10, prob=1.5)


def test_unigram_floor_is_the_cross_entropy_of_train_frequencies() -> None:
    """Hand-computed: train holds ids 5 (×3) and 6 (×1) beside specials; val holds 5, 6, 7 once each.
    Add-½ smoothing over the maskable ids 1, 5, 6, 7 → counts 0.5, 3.5, 1.5, 0.5."""
    import math

    from ntkit.data.text import MLMData

    train = torch.tensor([[5, 5, 5, 6, 0, 2]])
    val = torch.tensor([[5, 6, 7, 3, 0, 0]])
    data = MLMData(train=train, val=val, test=val, tokenizer=None, vocab_size=8, pad_id=0, mask_id=4,  # type: ignore[arg-type]
                   name="toy", split_note="", token_counts={}, special_ids=(0, 2, 3, 4))
    total = 3.5 + 1.5 + 0.5 + 0.5
    want = -(math.log(3.5 / total) + math.log(1.5 / total) + math.log(0.5 / total)) / 3
    assert abs(data.unigram_floor("val") - want) < 1e-12
    assert abs(data.unigram_floor("val", blocks=1) - want) < 1e-12
    # the train split against itself: its own entropy under the smoothed frequencies
    own = -(3 * math.log(3.5 / total) + math.log(1.5 / total)) / 4
    assert abs(data.unigram_floor("train") - own) < 1e-12
