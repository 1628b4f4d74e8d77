"""The `studio` command line's top level: `studio --help` lists every command at once, and each command registers
itself under its name and summary."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from studio.cli import COMMANDS, build_parser, main


def test_help_lists_every_command_without_importing_torch() -> None:
    code = ("import sys; from studio.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print('torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-2:] == ["exit 0", "False False"]  # a fraction of a second, not torch's import
    listed = [line.split()[0] for line in out.splitlines() if re.match(r"    \S", line)]  # not wrapped summaries
    assert listed == [m.rsplit(".", 1)[1] for m in COMMANDS]


def test_each_command_registers_its_name_and_summary() -> None:
    for module, summary in COMMANDS.items():
        name = module.rsplit(".", 1)[1]
        parser = build_parser([name, "--help"])
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        assert list(action.choices) == [name]  # only the named command's module was asked for
        assert [a.help for a in action._choices_actions] == [summary]


def test_a_mistyped_command_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generat", "--prompt", "a red star"])
    assert exit_.value.code == 2
    assert "invalid choice: 'generat'" in capsys.readouterr().err
    assert main([]) == 2 and "generate" in capsys.readouterr().out  # no command: the list, and a usage error
