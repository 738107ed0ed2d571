"""Every ``python main.py ...`` command shown in README.md and docs/ composes.

The commands are taken from the fenced code blocks of the Markdown files (backslash-continued
lines joined, comments dropped), split like a shell would, and composed with Hydra after the
same rewriting of the original MDLM's override names that ``main.py`` applies
(:func:`config_aliases.translate`). Composition opens no file, so checkpoint and data paths in
the commands stay as written; it does catch a misspelled key, a missing group option and an
override Hydra cannot parse (e.g. an unquoted ``[`` in a value).
"""

from __future__ import annotations

import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from config_aliases import translate

CONFIGS = ROOT / "configs"
PREFIX = ("python", "main.py")
MIN_COMMANDS = 25  # the pages show more; fewer means the extraction broke, not that the docs shrank
MODES = {"train", "ppl_eval", "sample_eval"}
# Placeholder path segments such as outputs/<job id>/..., never a valid override value.
PLACEHOLDER = re.compile(r"<[^<>=\s]+>")


@dataclass(frozen=True)
class Command:
    source: str  # "docs/data.md:42"
    text: str  # the command as shown (continuations joined)

    @property
    def overrides(self) -> list[str]:
        """The arguments after ``python main.py``, minus flags (``-m``), placeholders filled in."""
        words = shlex.split(self.text, comments=True)
        assert tuple(words[:2]) == PREFIX, self.text
        return [PLACEHOLDER.sub("X", w) for w in words[2:] if not w.startswith("-")]


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def commands_in(path: Path) -> list[Command]:
    """``python main.py`` lines of the fenced code blocks of ``path``, continuations joined."""
    found: list[Command] = []
    in_block = False
    pending: tuple[int, str] | None = None  # (first line number, text so far) of a continued command
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block, pending = not in_block, None
            continue
        if not in_block:
            continue
        if pending is not None:
            start, text = pending
            text = f"{text} {stripped}"
        elif stripped.removeprefix("$ ").startswith("python main.py"):
            start, text = number, stripped.removeprefix("$ ")
        else:
            continue
        if text.endswith("\\"):
            pending = (start, text[:-1].rstrip())
            continue
        pending = None
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        found.append(Command(f"{name}:{start}", text))
    return found


def all_commands() -> list[Command]:
    return [command for path in markdown_files() for command in commands_in(path)]


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """One override list per combination of a ``-m`` sweep (``a=1,2``); ``[overrides]`` without one."""
    choices: list[list[str]] = []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combination) for combination in itertools.product(*choices)]


def compose_command(command: Command) -> list[DictConfig]:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return [compose("config", overrides=translate(overrides)) for overrides in expand_sweeps(command.overrides)]


COMMANDS = all_commands()


def test_enough_commands_found() -> None:
    assert len(COMMANDS) >= MIN_COMMANDS, [c.source for c in COMMANDS]
    assert any(c.source.startswith("README.md:") for c in COMMANDS)
    assert any(c.source.startswith("docs/") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.source for c in COMMANDS])
def test_command_composes(command: Command) -> None:
    for cfg in compose_command(command):
        assert cfg.mode in MODES, f"{command.source}: mode={cfg.mode}"


def test_readme_shows_every_mode() -> None:
    shown = {cfg.mode for c in COMMANDS if c.source.startswith("README.md:") for cfg in compose_command(c)}
    assert shown == MODES, f"README.md shows modes {sorted(shown)}; expected one example of each of {sorted(MODES)}"


def test_extraction_joins_continuations_and_skips_other_lines(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "python main.py outside=a_block\n"
        "```bash\n"
        "bash scripts/quickstart.sh trainer.max_steps=5\n"
        "python main.py mode=ppl_eval \\\n"
        "  model=tiny   # a comment\n"
        "sbatch scripts/slurm/train_owt_mdlm.sbatch\n"
        "$ python main.py -m optim.lr=1e-4,3e-4 hydra.run.dir=outputs/<job_id>\n"
        "```\n"
    )
    found = commands_in(page)
    assert [c.source.rsplit(":", 1)[1] for c in found] == ["4", "7"]
    assert found[0].overrides == ["mode=ppl_eval", "model=tiny"]
    assert found[1].overrides == ["optim.lr=1e-4,3e-4", "hydra.run.dir=outputs/X"]
    assert expand_sweeps(found[1].overrides) == [
        ["optim.lr=0.0001", "hydra.run.dir=outputs/X"],
        ["optim.lr=0.0003", "hydra.run.dir=outputs/X"],
    ]


def test_the_bad_input_table_has_no_silent_or_unclear_row() -> None:
    """docs/bad_inputs.md is made by scripts/bad_inputs.py; every row must be CLEAR or CORRECT."""
    rows = [line for line in (ROOT / "docs" / "bad_inputs.md").read_text().splitlines() if line.startswith("| ")][1:]
    results = [row.split(" | ")[-2].strip() for row in rows]
    assert len(results) >= 15 and set(results) <= {"CLEAR", "CORRECT"}, results
