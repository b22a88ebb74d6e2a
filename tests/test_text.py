"""engine.text: tokenizer.json through the tokenizers package, and streaming
detokenization that holds back incomplete multi-byte characters."""

from __future__ import annotations

import functools
import itertools
import json

import pytest

tokenizers = pytest.importorskip("tokenizers")

from engine import CheckpointError  # noqa: E402
from engine.text import TextStream, Tokenizer, load_tokenizer  # noqa: E402

CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "héllo wörld ✓ naïve café 日本",
    "the café is naïve; the world is wide. 日本語のテキスト",
    "streaming text one token at a time",
] * 20
SAMPLES = [
    "hello world",
    "héllo wörld ✓ naïve café 日本",
    "日本語 ✓✓ — ünïcödé, emoji 🙂 and 𝄞 music",
    "  leading and  double  spaces ",
]


@functools.cache
def _vocab(path) -> dict[str, int]:
    return json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]


def vocab(tokenizer: Tokenizer) -> dict[str, int]:
    """token -> id, read from the tokenizer.json file itself."""
    return _vocab(tokenizer.path)


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The UTF-8 bytes a byte-level token stands for."""
    token = {i: t for t, i in vocab(tokenizer).items()}[token_id]
    to_byte = {c: b for b, c in enumerate(_bytes_to_unicode())}
    return bytes(to_byte[c] for c in token)


def _at_char_boundary(data: bytes, end: int) -> bool:
    return end == len(data) or (data[end] & 0xC0) != 0x80


def stream_all(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    stream = tokenizer.stream()
    pieces = [stream.push(i) for i in ids]
    return pieces, stream.flush()


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    folder = tmp_path_factory.mktemp("byte_level")
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory) -> Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    folder = tmp_path_factory.mktemp("metaspace")
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder / "tokenizer.json")


def test_a_folder_or_the_file_loads_the_same_tokenizer(byte_level):
    by_file = load_tokenizer(byte_level.path)
    by_folder = load_tokenizer(byte_level.path.parent)
    assert by_file.path == by_folder.path == byte_level.path
    assert by_file.vocab_size == by_folder.vocab_size == 300
    text = "héllo wörld"
    assert by_file.encode(text) == by_folder.encode(text) == byte_level.encode(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_decode_round_trip(byte_level, text):
    ids = byte_level.encode(text)
    assert ids and all(isinstance(i, int) and 0 <= i < byte_level.vocab_size for i in ids)
    assert byte_level.decode(ids) == text


def test_special_tokens_are_skipped_unless_asked_for(byte_level):
    eos = vocab(byte_level)["<eos>"]
    ids = [*byte_level.encode("hello"), eos]
    assert byte_level.decode(ids) == "hello"
    assert byte_level.decode(ids, skip_special_tokens=False) == "hello<eos>"
    assert byte_level.encode("hello<eos>", add_special_tokens=False)[-1] == eos


def test_the_trained_tokenizer_merges_frequent_words(byte_level):
    # (so streaming below sees multi-character tokens, not only single bytes)
    assert len(byte_level.encode("hello world")) < len("hello world")


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_token_by_token_equals_decoding_all(byte_level, text):
    ids = byte_level.encode(text)
    pieces, tail = stream_all(byte_level, ids)
    assert "".join(pieces) + tail == byte_level.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("text", ["日本", "ok 日", "naïve café", "日本語のテキスト 🙂 ✓"])
def test_a_push_inside_a_multibyte_character_returns_nothing(byte_level, text):
    ids = byte_level.encode(text)
    pieces, tail = stream_all(byte_level, ids)
    data = text.encode()
    ends = list(itertools.accumulate(len(token_bytes(byte_level, i)) for i in ids))
    assert ends[-1] == len(data)
    mid_character = [not _at_char_boundary(data, end) for end in ends]
    # the trained merges do cut characters: some pushes end inside one
    assert any(mid_character), [token_bytes(byte_level, i) for i in ids]
    for n, (end, inside) in enumerate(zip(ends, mid_character, strict=True)):
        so_far = "".join(pieces[: n + 1])
        if inside:
            assert pieces[n] == "", (n, pieces)
        else:  # at a character boundary everything so far is out
            assert so_far == data[:end].decode(), (n, pieces)
    assert tail == ""


def test_single_byte_tokens_stream_a_character_only_once_complete(byte_level):
    # byte-level tokens, one per UTF-8 byte, built directly from the byte alphabet
    from tokenizers import pre_tokenizers

    to_char = _bytes_to_unicode()
    assert set(to_char) == set(pre_tokenizers.ByteLevel.alphabet())
    ids = [vocab(byte_level)[to_char[b]] for b in "a✓日🙂b".encode()]
    pieces, tail = stream_all(byte_level, ids)
    assert pieces == ["a", "", "", "✓", "", "", "日", "", "", "", "🙂", "b"]
    assert tail == ""


def test_flush_returns_an_incomplete_character_at_the_end(byte_level):
    to_char = _bytes_to_unicode()
    ids = [*byte_level.encode("ok "), *(vocab(byte_level)[to_char[b]] for b in "日".encode()[:2])]
    stream = byte_level.stream()
    emitted = "".join(stream.push(i) for i in ids)  # the last byte of 日 is missing
    tail = stream.flush()
    assert emitted + tail == byte_level.decode(ids)
    assert emitted == "ok " and tail.startswith("\ufffd")
    assert stream.flush() == ""  # nothing left after a flush


def test_a_stream_keeps_going_after_a_flush(byte_level):
    stream = byte_level.stream()
    first = byte_level.encode("hello")
    second = byte_level.encode(" wörld")
    out = "".join(stream.push(i) for i in first) + stream.flush()
    out += "".join(stream.push(i) for i in second) + stream.flush()
    assert out == "hello wörld"


def test_special_tokens_in_a_stream_produce_no_text(byte_level):
    eos = vocab(byte_level)["<eos>"]
    ids = [*byte_level.encode("café"), eos, *byte_level.encode(" 日本")]
    pieces, tail = stream_all(byte_level, ids)
    assert "".join(pieces) + tail == byte_level.decode(ids) == "café 日本"


def test_a_stream_is_a_text_stream(byte_level):
    assert isinstance(byte_level.stream(), TextStream)


def test_a_stream_decodes_short_windows_not_the_whole_sequence(byte_level):
    class Spy:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids, **kwargs):
            self.longest = max(self.longest, len(ids))
            return byte_level.decode(ids, **kwargs)

    spy = Spy()
    stream = TextStream(spy)
    text = "the quick brown fox jumps over the lazy dog. 日本 " * 12
    ids = byte_level.encode(text)
    out = "".join(stream.push(i) for i in ids) + stream.flush()
    assert out == text and len(ids) > 100
    assert spy.longest <= 8


@pytest.mark.parametrize("text", ["hello world", "the quick  brown fox", "naïve café ✓ 日本 ok"])
def test_metaspace_streaming_keeps_the_spaces(metaspace, text):
    # SentencePiece style: a word token carries its space as a leading "▁", which the
    # decoder drops at the very start of what it decodes: a stream decoding each
    # token alone would lose every space, one decoding a window must keep them
    ids = metaspace.encode(text)
    assert len(ids) > 2
    pieces, tail = stream_all(metaspace, ids)
    assert "".join(pieces) + tail == metaspace.decode(ids) == text
    assert "".join(metaspace.decode([i]) for i in ids) != text


def test_metaspace_word_tokens_stream_with_their_leading_space(metaspace):
    ids = metaspace.encode("hello world")
    pieces, _ = stream_all(metaspace, ids)
    nonempty = [p for p in pieces if p]
    assert nonempty[0].startswith("h")
    assert any(p.startswith(" w") for p in nonempty[1:]), nonempty


def test_a_folder_without_tokenizer_json_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match=r"no tokenizer\.json"):
        Tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="missing-folder"):
        load_tokenizer(tmp_path / "missing-folder")


@pytest.mark.parametrize(
    "content", ["{not json", '{"version": "1.0"}', "", '{"model": {"type": "Nope"}}']
)
def test_a_corrupt_tokenizer_json_is_a_checkpoint_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match="not a tokenizer the tokenizers package reads"):
        load_tokenizer(tmp_path)
    assert issubclass(CheckpointError, ValueError)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the ByteLevel alphabet), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
