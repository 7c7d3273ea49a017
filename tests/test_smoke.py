def test_version(run_cli):
    import promptcli

    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"promptcli {promptcli.__version__}"


def test_tiny_features(tiny_features):
    from promptcli.io.features import read_features

    fs = read_features(tiny_features)
    assert fs.features.shape == (18, 32) and fs.views.shape == (18, 2, 32)
    assert fs.classnames == ["blue sky", "green grass", "red apple"]
