"""Shared fixtures: a tiny open_clip model saved to disk, generated images, extracted features.

Nothing here touches the network: the model is built from a custom config with random weights,
saved to a safetensors file and loaded back through promptcli's real loading path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLASSES = ("red apple", "blue sky", "green grass")
COLORS = {"red apple": (200, 30, 30), "blue sky": (30, 60, 210), "green grass": (40, 180, 50)}


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny CLIP config JSON and its random weights in safetensors (seeded, so stable)."""
    from safetensors.torch import save_file

    from promptcli.models.loading import load_model

    folder = tmp_path_factory.mktemp("tiny-model")
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    torch.manual_seed(0)
    loaded = load_model("tiny-clip", None, config, device="cpu", random_weights=True, seed=0)
    weights = folder / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(weights))
    return {"config": config, "weights": weights, "dir": folder}


@pytest.fixture(scope="session")
def tiny_model(tiny_model_files):
    from promptcli.models.loading import load_model

    return load_model("tiny-clip", str(tiny_model_files["weights"]), tiny_model_files["config"], device="cpu")


def make_image_folder(root: Path, per_class: int = 6, size=(40, 48), seed: int = 0) -> Path:
    """An ImageFolder tree of coloured noise images, one folder per class (spaces -> underscores)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in CLASSES:
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array(COLORS[name], dtype=np.int16)
        for i in range(per_class):
            noise = rng.integers(-40, 40, size=(*size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "train")


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory, image_folder, tiny_model) -> Path:
    """Features (float32, 2 views) of the generated image folder, made with the tiny model."""
    from promptcli.extraction.extract import ExtractOptions, extract_features
    from promptcli.io.image_sources import read_image_source

    out = tmp_path_factory.mktemp("features") / "train.h5"
    extract_features(
        read_image_source(image_folder),
        tiny_model,
        out,
        ExtractOptions(views=2, dtype="float32", workers=0, batch_size=8),
    )
    return out


@pytest.fixture
def cli_model_args(tiny_model_files) -> list[str]:
    return [
        "--model",
        "tiny-clip",
        "--model-config",
        str(tiny_model_files["config"]),
        "--pretrained",
        str(tiny_model_files["weights"]),
        "--device",
        "cpu",
    ]


@pytest.fixture
def run_cli(capsys):
    """Run ``promptcli ARGS`` in-process; return (exit code, stdout, stderr)."""
    from promptcli.cli.app import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def unit_rows(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def write_synthetic_features(
    path: Path, loaded, classnames: list[str], per_class: int, spread: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A separable features file (2 views per image) 'made with' ``loaded``; returns (x, y, paths)."""
    from promptcli.io.features import write_features

    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.normal(size=(len(classnames), loaded.embed_dim)))
    y = np.repeat(np.arange(len(classnames)), per_class)
    x = unit_rows(centers[y] + spread * rng.normal(size=(len(y), loaded.embed_dim)))
    views = unit_rows(x[:, None, :] + 0.1 * rng.normal(size=(len(y), 2, loaded.embed_dim)))
    paths = [f"img{i:03d}.png" for i in range(len(y))]
    write_features(
        path,
        features=[x],
        n_rows=len(y),
        dim=loaded.embed_dim,
        paths=paths,
        labels=y,
        splits=["train"] * len(y),
        classnames=list(classnames),
        attrs=loaded.record(),
        n_views=2,
        views=[views],
        dtype="float32",
    )
    return x, y, paths


@pytest.fixture
def one_thread():
    """Tiny matrices: one torch thread is fastest and immune to a busy machine's oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_csv_rows(path: Path | str) -> list[dict[str, str]]:
    """A CSV file's rows as dicts (header -> value)."""
    return read_csv_table(path)[1]


def read_csv_table(path: Path | str) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV file's header and rows (as dicts)."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def read_csv_text(text: str) -> list[dict[str, str]]:
    """The rows (as dicts) of CSV text, e.g. a command's stdout."""
    import csv
    import io

    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="session")
def noisy_labels(tmp_path_factory, tiny_features) -> dict[str, Path]:
    """Symmetric noise on a third of the tiny features' labels, made by `promptcli corrupt` itself."""
    from promptcli.cli.app import main

    folder = tmp_path_factory.mktemp("noisy")
    labels = folder / "noisy.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["corrupt", str(tiny_features), "--rate", "0.34", "--seed", "1", "-o", str(labels), "-q"])
    assert exit_info.value.code == 0
    return {"features": tiny_features, "labels": labels, "sidecar": Path(f"{labels}.json")}


TWO_FLIPPED = (0, 7)  # rows of `flipped_labels` whose label moves to the next class


@pytest.fixture(scope="session")
def flipped_labels(tmp_path_factory, tiny_features) -> Path:
    """A labels CSV of the tiny features with two wrong labels (TWO_FLIPPED) and the clean columns."""
    from promptcli.io.features import read_features

    fs = read_features(tiny_features, load_views=False)
    lines = ["path,label,clean_label,is_noisy"]
    for i, (p, c) in enumerate(zip(fs.paths, fs.labels)):
        given = (c + 1) % len(CLASSES) if i in TWO_FLIPPED else c
        lines.append(f"{p},{fs.classnames[given]},{fs.classnames[c]},{int(i in TWO_FLIPPED)}")
    out = tmp_path_factory.mktemp("flipped") / "noisy.csv"
    out.write_text("\n".join(lines) + "\n")
    return out


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script: str, timeout: int = 900, **env: str):
    """Run ``examples/<script>`` with bash and extra environment variables; the installed promptcli
    (this interpreter's) comes first on PATH. Returns the CompletedProcess (text output captured)."""
    import subprocess
    import sys

    full_env = dict(
        os.environ, **env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    return subprocess.run(
        ["bash", str(EXAMPLES / script)], env=full_env, capture_output=True, text=True, timeout=timeout
    )


_CLI_CLIENT = r"""
import json, socket, sys
conn = socket.socket(socket.AF_UNIX)
conn.connect(sys.argv[1])
conn.sendall(json.dumps(sys.argv[2:]).encode() + b"\n")
data = b""
while chunk := conn.recv(1 << 16):
    data += chunk
reply = json.loads(data)
sys.stdout.write(reply["out"])
sys.stderr.write(reply["err"])
sys.exit(reply["code"])
"""


def run_served_script(
    script: Path, env: dict[str, str], run_cli, folder: Path, extra_env: dict[str, str] | None = None
) -> tuple[int, str, list[list[str]]]:
    """Run an example script whose ``$PROMPTCLI`` commands are served in this process (fast: no new
    interpreter per command); returns (exit code, its output, the commands it ran)."""
    import json
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    sock_dir = Path(tempfile.mkdtemp(prefix="cli"))  # short: a socket path is at most ~100 bytes
    sock_path = sock_dir / "cli.sock"
    client = folder / "client.py"
    client.write_text(_CLI_CLIENT)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen()
    server.settimeout(0.05)
    log = folder / f"{script.stem}.log"
    commands: list[list[str]] = []
    try:
        with open(log, "w") as handle:
            proc = subprocess.Popen(
                ["bash", str(script)],
                env={**env, **(extra_env or {}), "PROMPTCLI": f"{sys.executable} {client} {sock_path}"},
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(30)
                    data = b""
                    while not data.endswith(b"\n"):
                        data += conn.recv(1 << 16)
                    argv = json.loads(data)
                    commands.append(argv)
                    code, out, err = run_cli(*argv)
                    conn.sendall(json.dumps({"code": code, "out": out, "err": err}).encode())
            if proc.poll() is None:
                proc.kill()
            code = proc.wait()
    finally:
        server.close()
        sock_path.unlink(missing_ok=True)
        sock_dir.rmdir()
    return code, log.read_text(), commands
