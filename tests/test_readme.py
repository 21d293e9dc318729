"""The README's first lines are the two commands for a fresh machine, and CI runs exactly the test one."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README must open with a bash block of commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands_whose_scripts_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.index("```bash") < readme.index("\n\n", readme.index("# ")) + 3, "the commands come first"
    commands = _readme_commands()
    assert len(commands) == 2
    for command in commands:
        assert command.startswith("bash ") and (ROOT / command.split()[1]).is_file(), command


def test_ci_runs_the_readme_test_command() -> None:
    test_command = _readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
