"""engine.cli: the demo and `generate` run on each backend; bad options exit 2 with a
message."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from checkpoints import LLAMA_GQA, tensors_for, write_folder

from engine import load_model, load_tokenizer
from engine.cli import Progress, main


def test_demo_runs_and_both_caches_agree(backend, capsys):
    status = main(["--backend", backend.name, "--size", "tiny", "--new-tokens", "24"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "same tokens: yes, 24/24 identical" in out
    assert "tokens/s" in out and "speed ratio" in out and "MiB preallocated" in out


def test_demo_with_the_int8_cache_reports_agreement_without_failing(backend, capsys):
    status = main(
        ["--backend", backend.name, "--size", "tiny", "--new-tokens", "16", "--cache", "int8"]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "Int8KVCache" in out and "same tokens as the float32 ConcatKVCache:" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--new-tokens", "0"], "expected an integer >= 1, got '0'"),
        (["--prompt-len", "ten"], "expected an integer >= 1, got 'ten'"),
        (["--seed", "-3"], "expected an integer >= 0, got '-3'"),
        (["--size", "huge"], "invalid choice: 'huge'"),
        (["--cache", "int4"], "invalid choice: 'int4'"),
        (["--size", "tiny", "--prompt-len", "500", "--new-tokens", "100"], "covers 512"),
        (["--backend", "array_api_strict", "--cache-dtype", "float16"], "no float16"),
    ],
)
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc_info:
        main([*argv, "--no-progress"])
    assert exc_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_progress_reports_quarters_when_not_a_terminal():
    stream = io.StringIO()
    progress = Progress("KVCache", 8, stream)
    for done in range(1, 9):
        progress.update(done)
    assert stream.getvalue().splitlines() == [f"  KVCache: {n}/8 tokens" for n in (2, 4, 6, 8)]


def test_python_dash_m_engine_runs_as_a_module():
    result = subprocess.run(
        [sys.executable, "-m", "engine", "--size", "tiny", "--new-tokens", "8", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "same tokens: yes, 8/8 identical" in result.stdout


# -- python -m engine generate --------------------------------------------------------

PROMPT_TEXT = "hello world, once upon a time"
TOKENIZER_CORPUS = [
    "the quick brown fox jumps over the lazy dog.",
    "hello world, hello there!",
    "once upon a time there was a tiny model that liked to sing songs",
] * 10


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny Llama folder (vocab 96, EOS 2) with a tokenizer.json of exactly 96
    tokens, SentencePiece style (Metaspace), "</s>" at id 2 as in Llama."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder = write_folder(
        tmp_path_factory.mktemp("llama") / "tiny", LLAMA_GQA, tensors_for(LLAMA_GQA)
    )
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    assert tok.get_vocab_size() == LLAMA_GQA["vocab_size"] and tok.token_to_id("</s>") == 2
    tok.save(str(folder / "tokenizer.json"))
    return folder


def generate(folder, *options: str) -> int:
    return main(["generate", "--model", str(folder), *options])


def printed_ids(out: str) -> list[int]:
    assert out.endswith("\n")
    return [int(t) for t in out.split()]


def test_generate_streams_the_prompt_and_its_continuation(model_folder, backend, capsys):
    status = generate(
        model_folder, "--prompt", PROMPT_TEXT, "--backend", backend.name, "--max-new-tokens", "10"
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    tokenizer = load_tokenizer(model_folder)
    expected = load_model(model_folder).generate(tokenizer.encode(PROMPT_TEXT), 10)
    assert captured.out.startswith(PROMPT_TEXT)
    assert captured.out == PROMPT_TEXT + tokenizer.decode(expected) + "\n"
    header, footer = captured.err.strip().splitlines()
    assert "llama" in header and backend.name in header and "KVCache" in header
    for word in ("time to first token", "decode", "tokens/s", "cache", "weights", "MiB"):
        assert word in footer
    assert f"({len(expected)} tokens)" in footer


def test_generate_with_prompt_ids_prints_ids(model_folder, backend, capsys):
    status = generate(
        model_folder, "--prompt-ids", "5,17,33", "--backend", backend.name,
        "--ignore-eos", "--max-new-tokens", "12",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    expected = load_model(model_folder).generate([5, 17, 33], 12, eos_token_id=())
    assert printed_ids(captured.out) == expected and len(expected) == 12
    assert "prompt 3 tokens" in captured.err and "(12 tokens)" in captured.err


def test_generate_stops_at_the_models_eos_unless_told_to_ignore_it(model_folder, tmp_path, capsys):
    greedy = load_model(model_folder).generate([5, 17, 33], 12, eos_token_id=())
    eos = greedy[3]
    folder = write_folder(
        tmp_path, LLAMA_GQA, tensors_for(LLAMA_GQA), generation_config={"eos_token_id": eos}
    )
    assert generate(folder, "--prompt-ids", "5,17,33", "--max-new-tokens", "12") == 0
    assert printed_ids(capsys.readouterr().out) == greedy[: greedy.index(eos) + 1]
    assert (
        generate(folder, "--prompt-ids", "5,17,33", "--max-new-tokens", "12", "--ignore-eos") == 0
    )
    assert printed_ids(capsys.readouterr().out) == greedy


def test_generate_clips_new_tokens_to_the_context(model_folder, capsys):
    # max_position_embeddings 128: a 3-token prompt leaves room for 126 new tokens
    # (the last one is returned, never fed back)
    options = ["--prompt-ids", "5,17,33", "--ignore-eos", "--max-new-tokens", "500"]
    assert generate(model_folder, *options) == 0
    assert len(printed_ids(capsys.readouterr().out)) == 128 - 3 + 1


@pytest.mark.parametrize("cache", ["int8", "paged"])
def test_generate_runs_with_the_int8_and_paged_caches(model_folder, backend, cache, capsys):
    options = ["--prompt-ids", "5,17,33", "--ignore-eos", "--max-new-tokens", "20"]
    assert generate(model_folder, *options, "--backend", backend.name) == 0
    contiguous = printed_ids(capsys.readouterr().out)
    status = generate(model_folder, *options, "--backend", backend.name, "--cache", cache)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    tokens = printed_ids(captured.out)
    assert len(tokens) == 20 and all(0 <= t < 96 for t in tokens)
    name = {"int8": "Int8KVCache", "paged": "PagedSequence"}[cache]
    assert name in captured.err.splitlines()[0]
    if cache == "paged":  # float32 like the contiguous cache: the same tokens
        assert tokens == contiguous


def test_generate_sampling_repeats_with_its_seed(model_folder, backend, capsys):
    options = ["--prompt-ids", "5,17,33", "--ignore-eos", "--max-new-tokens", "24"]
    options += ["--backend", backend.name, "--temperature", "0.8"]
    runs = []
    for seed in ("3", "3", "4"):
        assert generate(model_folder, *options, "--seed", seed) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    expected = load_model(model_folder).generate(
        [5, 17, 33], 24, temperature=0.8, seed=3, eos_token_id=()
    )
    assert printed_ids(runs[0]) == expected


def test_generate_sampled_text_repeats_with_its_seed(model_folder, capsys):
    options = ["--prompt", PROMPT_TEXT, "--max-new-tokens", "16", "--temperature", "0.8"]
    outs = []
    for _ in range(2):
        assert (
            generate(model_folder, *options, "--seed", "3", "--top-k", "20", "--top-p", "0.9") == 0
        )
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith(PROMPT_TEXT)


def _unsupported_folder(tmp_path):
    return write_folder(tmp_path, LLAMA_GQA | {"model_type": "mamba"}, tensors_for(LLAMA_GQA))


def _folder_without_tokenizer(tmp_path):
    return write_folder(tmp_path, LLAMA_GQA, tensors_for(LLAMA_GQA))


@pytest.mark.parametrize(
    ("make_folder", "options", "message"),
    [
        (lambda p: p / "nowhere", ["--prompt-ids", "1,2"], "not a directory"),
        (lambda p: p / "nowhere", ["--prompt", "hello"], "nowhere"),
        (_folder_without_tokenizer, ["--prompt", "hello"], "no tokenizer.json"),
        (_folder_without_tokenizer, ["--prompt-ids", "1,x"], "expected comma-separated ints"),
        (_folder_without_tokenizer, ["--prompt-ids", ""], "expected comma-separated ints"),
        (_folder_without_tokenizer, ["--prompt-ids", "1,200"], "outside the vocabulary"),
        (_unsupported_folder, ["--prompt-ids", "1,2"], "model_type 'mamba' is not supported"),
        (
            _folder_without_tokenizer,
            ["--prompt-ids", "1,2", "--temperature", "0.5", "--top-p", "0"],
            "top_p must be in (0, 1]",
        ),
        (
            _folder_without_tokenizer,
            ["--prompt-ids", "1,2", "--temperature", "-1"],
            "temperature must be a finite number >= 0",
        ),
        (_folder_without_tokenizer, ["--prompt-ids", "1", "--max-new-tokens", "0"], ">= 1"),
    ],
    ids=[
        "missing folder", "missing folder, text prompt", "no tokenizer.json", "bad ids",
        "empty ids", "id outside vocab", "unsupported model_type", "bad top-p",
        "bad temperature", "zero new tokens",
    ],
)  # fmt: skip
def test_generate_errors_exit_2_with_a_message(make_folder, options, message, tmp_path, capsys):
    folder = make_folder(tmp_path)
    with pytest.raises(SystemExit) as exc_info:
        generate(folder, *options)
    assert exc_info.value.code == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and message in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_generate_refuses_a_prompt_of_no_tokens(model_folder, capsys):
    with pytest.raises(SystemExit) as exc_info:
        generate(model_folder, "--prompt", "")
    assert exc_info.value.code == 2
    assert "error: the prompt encodes to no tokens" in capsys.readouterr().err


def test_generate_needs_a_model_and_exactly_one_prompt(model_folder, capsys):
    for argv in (
        ["generate", "--prompt", "hi"],
        ["generate", "--model", str(model_folder)],
        ["generate", "--model", str(model_folder), "--prompt", "hi", "--prompt-ids", "1"],
    ):
        with pytest.raises(SystemExit) as exc_info:
            main(argv)
        assert exc_info.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_generate_keeps_the_space_between_prompt_and_continuation(model_folder, capsys):
    tokenizer = load_tokenizer(model_folder)
    model = load_model(model_folder)
    prompt = tokenizer.encode("hello world")
    vocab = json.loads((model_folder / "tokenizer.json").read_text())["model"]["vocab"]
    word_starts = {i for t, i in vocab.items() if t.startswith("▁") and len(t) > 1}
    seed = next(
        s
        for s in range(200)
        if model.generate(prompt, 1, temperature=1.0, seed=s)[0] in word_starts
    )
    new = model.generate(prompt, 6, temperature=1.0, seed=seed, eos_token_id=())
    options = ["--prompt", "hello world", "--max-new-tokens", "6", "--ignore-eos"]
    assert generate(model_folder, *options, "--temperature", "1.0", "--seed", str(seed)) == 0
    assert capsys.readouterr().out == tokenizer.decode(prompt + new) + "\n"
