import re
from pathlib import Path

import pytest

from proxy.cli import build_parser, main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "proxy.md"


@pytest.mark.parametrize("command", ["serve", "sim"])
def test_every_flag_is_in_help_and_in_the_docs(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    parser = build_parser([command])
    sub = parser._subparsers._group_actions[0].choices[command]
    flags = [s for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert len(flags) > 10
    docs = DOCS.read_text()
    for flag in flags:
        assert flag in help_text
        assert re.search(re.escape(flag) + r"\b", docs), f"{flag} of omni-proxy {command} is not in docs/proxy.md"


@pytest.mark.parametrize("argv, message", [
    (["serve", "--mode", "pd", "--prefill", "http://a:1"], "--mode pd needs at least one --decode URL"),
    (["serve", "--mode", "collocated", "--instance", "http://a:1", "--kv-events", "http://a:1"], "URL=ENDPOINT"),
    (["serve", "--mode", "collocated", "--instance", "http://a:1", "--policy", "round_robin", "--bypass-tokens", "5"],
     "round_robin"),
    (["sim", "--port", "1", "--port", "2", "--role", "prefill", "--role", "decode", "--role", "decode"],
     "--role given 3 times for 2 --port values"),
    (["sim", "--port", "1", "--port", "2", "--kv-events-port", "5"], "once per --port"),
    (["sim", "--port", "1", "--fail-rate", "1.5"], "--fail-rate is a probability"),
    (["sim", "--port", "1", "--profile", "/nonexistent/p.json"], "does not exist"),
])
def test_bad_arguments_exit_2_naming_the_problem(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
