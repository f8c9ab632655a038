"""The command line as a new user meets it: `--help` lists every subcommand, each has a working `--help`,
and the entry point prints nothing to stderr."""

import re
import sys

import pytest
from subprocess_runs import python_env, run

from lightning_flows.cli import main

SUBCOMMANDS = ("fit", "validate", "test", "sample", "benchmark")


def _help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code in (0, None), f"{' '.join(argv)} --help exited with {stop.value.code}"
    return capsys.readouterr().out


def test_top_level_help_lists_every_subcommand_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # the width of a plain terminal
    text = _help_of(capsys)
    assert text.startswith("usage: lightning-flows ")
    for name in SUBCOMMANDS:
        (line,) = [line for line in text.splitlines() if re.match(rf"^\s+{name}\s", line)]
        description = line.split(name, 1)[1].strip()
        assert description.endswith("."), f"{name}: the help line is cut or wrapped: {line!r}"
    assert "predict" not in text  # these models have no prediction step


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_each_subcommand_has_a_help(capsys, subcommand):
    text = _help_of(capsys, subcommand)
    assert re.match(rf"usage: lightning-flows (\[options\] )?{subcommand}\b", text), text[:200]


def test_sample_and_benchmark_parsed_by_lightning_cli_are_a_clear_error(capsys):
    """They are listed in LightningCLI's help but dispatched before it parses anything (cli.main)."""
    from lightning_flows.training import build_cli

    with pytest.raises(SystemExit):
        build_cli(["benchmark"])
    assert "'benchmark' takes its own options and must come first: lightning-flows benchmark --help" in \
        capsys.readouterr().err


def test_the_entry_point_prints_no_warning():
    """`lightning-flows --help` as a process: Lightning's "LightningCLI's args parameter is intended to run from
    within Python" warning (our entry point passes sys.argv itself) must not reach the user."""
    result = run([sys.executable, "-m", "lightning_flows.cli", "--help"], timeout=300, env=python_env())
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "benchmark" in result.stdout
