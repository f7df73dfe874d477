"""Training data: real corpora, the 90/10 split, bad input as one line, seeded resumable batches."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from testbed.apps.training import data
from testbed.model.loading import load_tokenizer
from testbed.model.tiny import make_tiny_model_dir
from testbed.spec.errors import SpecError

needs_corpora = pytest.mark.skipif(not (data.FORTUNES_DIR / "tao").is_file(),
                                   reason="Debian's fortunes package is not installed (vagrant/provision.sh)")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "ckpt", n_layers=1))


def text_file(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


@needs_corpora
def test_builtin_corpora_are_real_text_in_different_styles() -> None:
    found = data.builtin_corpora()
    assert set(data.DEFAULT_CORPORA) <= set(found)
    assert not any(n.endswith((".dat", ".u8")) for n in found)
    poems, licence = found["fortunes:songs-poems"].text(), found["licenses:GPL-3"].text()
    assert "\n%\n" not in poems and "%" not in poems.splitlines()  # the separators are gone
    assert len(poems) > 100_000 and "GNU GENERAL PUBLIC LICENSE" in licence
    # non-IID: the two texts share few of their common words
    def top(t: str) -> set[str]:
        words = [w.lower() for w in t.split() if w.isalpha()]
        return {w for w, _ in Counter(words).most_common(300)}
    assert len(top(poems) & top(licence)) / 300 < 0.6
    srcs = data.default_sources(3)
    assert [s.name for s in srcs] == list(data.DEFAULT_CORPORA[:3])


def test_fortune_text_drops_separators() -> None:
    raw = "First line\n  -- someone\n%\nSecond\n\nparagraph\n%\n%\nThird\n"
    assert data.fortune_text(raw) == "First line\n  -- someone\n\nSecond\n\nparagraph\n\nThird\n"


def test_parse_data_files_and_counts(tmp_path: Path) -> None:
    a, b = text_file(tmp_path, "a.txt", "alpha"), text_file(tmp_path, "b.txt", "beta")
    srcs = data.parse_data(f"{a},{b}", clients=2)
    assert [s.path for s in srcs] == [a, b] and all(s.kind == "text" for s in srcs)
    assert len(data.parse_data(str(a), clients=3)) == 1  # one file shared out among three clients
    with pytest.raises(SpecError, match=r"^--data: data: 2 files for 3 clients.*\(got '"):
        data.parse_data(f"{a},{b}", clients=3)
    with pytest.raises(SpecError, match=r"^--data: data: an empty entry"):
        data.parse_data(f"{a},", clients=2)
    with pytest.raises(SpecError, match=r"^fortunes:no-such: data: no such file or built-in corpus"):
        data.parse_data("fortunes:no-such", clients=1)


def test_bad_files_give_one_line(tmp_path: Path, tok) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(SpecError) as e:
        data.load_clients(data.parse_data(str(missing)), tok, clients=1, batch=4, seq=64)
    assert str(e.value) == f"{missing}: data: no such file (got '{missing}')"

    with pytest.raises(SpecError, match=r"^.*: data: is a directory, not a text file \(got '"):
        data.read_text(tmp_path)

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait ".encode("latin-1") * 10)
    with pytest.raises(SpecError) as e:
        data.load_clients(data.parse_data(str(latin)), tok, clients=1, batch=4, seq=64)
    assert str(e.value) == f"{latin}: data: not UTF-8 text: byte 0xe9 at offset 3 (got '{latin}')"
    assert "\n" not in str(e.value)

    short = text_file(tmp_path, "short.txt", "a short text of a few words only. " * 5)
    with pytest.raises(SpecError) as e:
        data.load_clients(data.parse_data(str(short)), tok, clients=1, batch=4, seq=64)
    msg = str(e.value)
    assert msg.startswith(f"{short}: data: too short for one batch of 4 x 65 tokens: ") and "needs 257" in msg
    assert msg.endswith(" tokens)") and "\n" not in msg


def test_holdout_is_the_last_tenth(tmp_path: Path, tok) -> None:
    text = " ".join(f"word{i % 97}" for i in range(3000))
    f = text_file(tmp_path, "mine.txt", text)
    (c,) = data.load_clients(data.parse_data(str(f)), tok, clients=1, batch=4, seq=16)
    whole = data.tokenize(tok, text)
    assert torch.equal(torch.cat([c.train, c.heldout]), whole)
    assert abs(len(c.heldout) - 0.1 * len(whole)) <= 1

    # one file, three clients: disjoint equal contiguous training parts, the same held-out part
    parts = data.load_clients(data.parse_data(str(f), clients=3), tok, clients=3, batch=4, seq=16)
    assert [p.name for p in parts] == [f"{f}#0", f"{f}#1", f"{f}#2"]
    assert len({len(p.train) for p in parts}) == 1
    assert torch.equal(torch.cat([p.train for p in parts]), c.train[: 3 * len(parts[0].train)])
    assert all(torch.equal(p.heldout, c.heldout) for p in parts)


def test_batches_cover_every_window_once_per_epoch_and_are_seeded() -> None:
    tokens = torch.arange(1000)
    b = data.Batches(tokens, batch=4, seq=10, seed=7)
    assert b.samples == 99
    seen: list[tuple[int, int]] = []
    for _ in range(60):  # 240 windows: two full epochs and part of a third, batches spanning epochs
        batch = b.next()
        assert batch.tokens.shape == (4, 11)
        for row, sid in zip(batch.tokens, batch.sample_ids, strict=True):
            assert torch.equal(row, torch.arange(sid * 10, sid * 10 + 11))  # window = its id's tokens
        assert torch.equal(batch.inputs, batch.tokens[:, :-1])
        assert torch.equal(batch.targets, batch.tokens[:, 1:])
        seen += list(zip(batch.epochs, batch.sample_ids, strict=True))
    for e in (0, 1):
        assert sorted(s for ep, s in seen if ep == e) == list(range(99))
    assert [s for ep, s in seen if ep == 0] != [s for ep, s in seen if ep == 1]  # a fresh order each epoch

    again = data.Batches(tokens, batch=4, seq=10, seed=7)
    assert [again.next().sample_ids for _ in range(60)] == [tuple(s for _, s in seen[i:i + 4])
                                                            for i in range(0, 240, 4)]
    other = data.Batches(tokens, batch=4, seq=10, seed=8)
    assert other.next().sample_ids != data.Batches(tokens, batch=4, seq=10, seed=7).next().sample_ids
    stream = data.Batches(tokens, batch=4, seq=10, seed=7, stream=1)
    assert stream.next().sample_ids != data.Batches(tokens, batch=4, seq=10, seed=7).next().sample_ids


def test_cursor_save_and_restore() -> None:
    tokens = torch.arange(500)
    a = data.Batches(tokens, batch=3, seq=8, seed=1)
    for _ in range(25):
        a.next()
    saved = a.state()
    assert saved["position"] == 75 and a.epoch == 1
    expect = [a.next() for _ in range(10)]
    b = data.Batches(tokens, batch=3, seq=8, seed=1)
    b.load_state(json.loads(json.dumps(saved)))
    got_ = [b.next() for _ in range(10)]
    for x, y in zip(expect, got_, strict=True):
        assert torch.equal(x.tokens, y.tokens) and x.epochs == y.epochs
    with pytest.raises(ValueError, match="seed"):
        data.Batches(tokens, batch=3, seq=8, seed=2).load_state(saved)
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.Batches(torch.arange(20), batch=3, seq=8)


@pytest.mark.model
@needs_corpora
def test_default_corpora_fill_batches_with_smollm2_tokens() -> None:
    from testbed.model.loading import default_model_dir

    tok = load_tokenizer(default_model_dir())
    clients = data.load_clients(data.default_sources(4), tok, clients=4, batch=4, seq=64)
    assert [c.name for c in clients] == list(data.DEFAULT_CORPORA[:4])
    for c in clients:
        assert len(c.train) > 20 * 4 * 64 and len(c.heldout) > 2 * 64  # dozens of steps, a few eval windows
        assert int(c.train.max()) < len(tok)
    assert tok.decode(clients[2].heldout[:200].tolist()) in data.builtin_corpora()["licenses:GPL-3"].text()


def test_text_is_checked_in_chunks_with_true_offsets(tmp_path: Path, monkeypatch) -> None:
    """Files are read in chunks: a character cut by a chunk's end still decodes, and a bad byte's
    offset counts from the file's start whichever chunk holds it."""
    from testbed.spec import corpora

    monkeypatch.setattr(corpora, "CHUNK", 4)
    text = "na\u00efve caf\u00e9 \u2014 \u00fcber\n"  # 2- and 3-byte characters across 4-byte chunks
    good = text_file(tmp_path, "good.txt", text)
    assert data.read_text(good) == text
    raw = text.encode("utf-8")
    for at in range(len(raw) + 1):  # a stray byte anywhere (in a character too), or a cut last character
        bad = tmp_path / f"bad{at}.txt"
        body = raw[:at] + b"\x80" + raw[at:] if at < len(raw) else raw + b"\xe2\x80"
        bad.write_bytes(body)
        try:  # the oracle: decoding the whole file at once
            body.decode("utf-8")
            raise AssertionError("the bad file decodes")
        except UnicodeDecodeError as e:
            want, byte = e.start, body[e.start : e.start + 1].hex()
        with pytest.raises(SpecError, match=rf"^{bad}: data: not UTF-8 text: byte 0x{byte} at offset "
                                            rf"{want} \(got "):
            data.read_text(bad)
