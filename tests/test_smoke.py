import pytest


def test_version(run_cli):
    import promptcli

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"promptcli {promptcli.__version__}"


def test_tiny_features(tiny_features):
    from promptcli.io.features import read_features

    fs = read_features(tiny_features)
    assert fs.features.shape == (18, 32) and fs.views.shape == (18, 2, 32)
    assert fs.classnames == ["blue sky", "green grass", "red apple"]


@pytest.mark.parametrize(
    ("command", "usage"),
    [("tune", "tune [OPTIONS] FEATURES LABELS"), ("report", "report [OPTIONS] RESULTS...")],
)
def test_help_shows_arguments_and_flags_plainly(run_cli, command, usage):
    """Usage lines read NAME (no typer braces); flags and --help take no <bool> placeholder."""
    code, out, _ = run_cli(command, "--help")
    assert code == 0 and f"Usage: promptcli {usage}" in out
    assert "{" not in out.split("\n", 3)[1] and "<bool>" not in out
