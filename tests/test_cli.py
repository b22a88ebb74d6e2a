"""engine.cli: the demo runs on each backend; bad options exit 2 with a message."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

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
