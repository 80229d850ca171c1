"""Every `urda-fast` command in the README, bench/README.md and docs/ parses with the CLI as written: a renamed or
removed flag fails here, not in a user's terminal. Only fenced code blocks count (prose may show placeholders)."""

import pathlib
import re
import shlex

import pytest

from urda_fast.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def documented_commands():
    """(document, argv after `urda-fast`) for each urda-fast command in a fenced block, continuation lines joined."""
    for path in DOCUMENTS:
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", path.read_text(), flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"&&|;|\|", line):
                    tokens = shlex.split(part, comments=True)
                    if "urda-fast" in tokens:
                        yield path.relative_to(ROOT).as_posix(), tokens[tokens.index("urda-fast") + 1:]


COMMANDS = list(documented_commands())


def test_the_documents_show_commands():
    assert len(COMMANDS) >= 10, COMMANDS  # the extraction itself works


@pytest.mark.parametrize("document, argv", COMMANDS, ids=[f"{d}:{' '.join(a[:2])}" for d, a in COMMANDS])
def test_documented_command_parses(document, argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exit_:
        if exit_.code:  # --help exits 0
            pytest.fail(f"{document}: `urda-fast {' '.join(argv)}` does not parse: {capsys.readouterr().err}")
