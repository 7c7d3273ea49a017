"""Shell completions in completions/ are generated from the CLI and must not go stale."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from promptcli.completions import GENERATORS, SHELLS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_completions_up_to_date(shell):
    committed = (ROOT / "completions" / SHELLS[shell]).read_text(encoding="utf-8")
    assert committed == GENERATORS[shell](), (
        f"completions/{SHELLS[shell]} is out of date with the CLI: run `python -m promptcli.completions`"
    )


def test_completions_cover_every_command_and_option():
    import typer

    from promptcli.cli.app import app

    script = GENERATORS["bash"]()
    root = typer.main.get_command(app)
    for name, cmd in root.commands.items():
        assert f"        {name})" in script
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert opt in script, (name, opt)


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_syntax(shell, tmp_path):
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} not installed")
    path = ROOT / "completions" / SHELLS[shell]
    flag = ["--no-execute"] if shell == "fish" else ["-n"]
    subprocess.run([exe, *flag, str(path)], check=True)


def test_bash_completion_completes_subcommands(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    script = (
        f"source {ROOT / 'completions' / 'promptcli.bash'}; "
        "COMP_WORDS=(promptcli ex); COMP_CWORD=1; _promptcli; echo ${COMPREPLY[@]}; "
        "COMP_WORDS=(promptcli extract --dev); COMP_CWORD=2; _promptcli; echo ${COMPREPLY[@]}; "
        "COMP_WORDS=(promptcli extract --device ''); COMP_CWORD=3; _promptcli; echo ${COMPREPLY[@]}"
    )
    out = subprocess.run([bash, "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["extract", "--device", "auto cpu cuda"]


def test_every_choice_set_is_offered_by_the_completions():
    """Each fixed set of choices (promptcli.choices) reaches the CLI and, through it, the completions."""
    from promptcli import choices
    from promptcli.completions import command_tree

    sets = [
        c
        for c in vars(choices).values()
        if isinstance(c, type) and issubclass(c, choices.Choice) and c is not choices.Choice
    ]
    offered = {o.choices for _, (_, opts, _) in command_tree()[1].items() for o in opts}
    script = GENERATORS["bash"]()
    for enum in sets:
        values = " ".join(enum.values())
        assert values in offered, f"{enum.__name__} is not the type of any option"
        assert values in script, f"{enum.__name__}'s values are missing from the bash completions"
