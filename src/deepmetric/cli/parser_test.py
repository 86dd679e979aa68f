"""Bad input exits 2 with one line; --help and bad arguments do not import keras."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from deepmetric import cli
from deepmetric.cli import names
from deepmetric.cli.objective import Objective

SMALL = ["--epochs", "1", "--classes-per-batch", "4", "--samples-per-class", "4"]
SMALL += ["--steps-per-epoch", "3", "--embedding-dim", "8", "--quiet"]
HEADS = [
    "arcface",
    "cosface",
    "sub_center_arcface",
    "normalized_softmax",
    "proxy_nca",
    "proxy_anchor",
]


def _folder_of_junk(tmp_path):
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.png").write_bytes(b"not an image")
    return ["--data", str(tmp_path / "junk")]


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return ["--data", str(tmp_path / "empty")]


def _npz_without_x(tmp_path):
    np.savez(tmp_path / "d.npz", z=np.zeros((4, 2)), y=np.zeros(4, "int64"))
    return ["--data", str(tmp_path / "d.npz")]


BAD_INPUTS = {
    "missing path": lambda p: ["--data", str(p / "nowhere")],
    "empty folder": _empty,
    "unreadable images": _folder_of_junk,
    "npz without x": _npz_without_x,
    "unknown loss": lambda p: ["--loss", "nope"],
    "zero epochs": lambda p: ["--epochs", "0"],
    "negative epochs": lambda p: ["--epochs", "-3"],
    "bad number": lambda p: ["--learning-rate", "fast"],
    "negative margin": lambda p: ["--margin", "-1"],
    "too many classes": lambda p: ["--classes-per-batch", "11"],
    "bad test size": lambda p: ["--test-size", "1.5"],
    "unknown split": lambda p: ["--split", "folds"],
    "unknown optimizer": lambda p: ["--optimizer", "lamb"],
    "unknown schedule": lambda p: ["--schedule", "linear"],
    "resume nothing": lambda p: ["--resume"],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    out = tmp_path / "runs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(["train", *BAD_INPUTS[case](tmp_path), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("deepmetric: error: ") and err.count("\n") == 1, err
    assert not out.exists() or not any(out.iterdir())
    if case == "unknown loss":
        assert "triplet_semihard" in err and "triplet_hard" in err
        assert all(head in err for head in HEADS), err


def test_loss_names():
    assert {"triplet_semihard", "triplet_hard", "lifted_struct"} <= set(names.LOSSES)
    assert "contrastive" not in names.LOSSES and "triplet_margin" not in names.LOSSES
    for spelling in ("TripletSemiHardLoss", "triplet-semihard", "triplet_semihard_loss"):
        assert names.resolve(spelling) == ("triplet_semihard", False)


def test_head_names():
    assert set(HEADS) <= set(names.HEADS)
    for spelling in ("ArcFace", "arcface", "SubCenterArcFace", "proxy-anchor"):
        name, is_head = names.resolve(spelling)
        assert name in HEADS and is_head
    with pytest.raises(cli.CliError, match="proxy_nca"):
        Objective("no_such_loss", None)


def test_train_help_lists_the_heads(capsys):
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(head in out for head in HEADS), out


@pytest.mark.parametrize("head", ["normalized_softmax", "proxy_nca"])
def test_margin_for_a_head_without_margin_exits_2(head, tmp_path, capsys):
    args = ["train", *SMALL, "--loss", head, "--margin", "0.1", "--out", str(tmp_path / "o")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("deepmetric: error: --margin: ") and err.count("\n") == 1, err
    assert "has no margin" in err and "arcface" in err
    assert not (tmp_path / "o").exists()


def test_head_margin_out_of_range_exits_2(tmp_path, capsys):
    args = ["train", *SMALL, "--loss", "arcface", "--margin", "2.0", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--margin" in err[0] and "pi/2" in err[0]


# In a fresh Python: the console script's entry, then the modules a backend would load.
_CHILD = """
import json, sys
from deepmetric_cli import main
code = main(json.loads(sys.argv[1]))
heavy = ("keras", "jax", "tensorflow", "torch", "matplotlib", "sklearn")
print(json.dumps([code, sorted({m.split(".")[0] for m in sys.modules} & set(heavy))]))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--help"],
        ["evaluate", "--help"],
        [],
        ["train", "--epochs", "0"],
        ["train", "--loss", "nope"],
        ["train", "--loss", "proxy_nca", "--margin", "0.1"],
        ["train", "--optimizer", "lamb"],
        ["train", "--split", "folds"],
        ["train", "--data", "glyphs", "--epochs", "0"],
        ["train", "--data", "glyphs", "--split-seed", "x"],
        ["train", "--resume"],
        ["frobnicate"],
    ],
)
def test_help_and_bad_arguments_import_no_backend(argv, tmp_path):
    argv = [*argv, "--out", str(tmp_path / "runs")] if argv[:1] == ["train"] else argv
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(argv)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    code, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert heavy == [], done.stderr
    assert code == (0 if "--help" in argv else 2), done.stderr
    if code:
        assert done.stderr.startswith("deepmetric: error: ") and done.stderr.count("\n") == 1


def test_import_deepmetric_registers_every_class():
    """`import deepmetric` alone lets `keras.saving` find deepmetric's classes (and export)."""
    child = (
        "import keras, sys\n"
        "plots = 'matplotlib' in sys.modules\n"  # some backends import it themselves
        "import deepmetric\n"
        "assert 'deepmetric.export' in sys.modules and deepmetric.export.write_projector\n"
        "assert ('matplotlib' in sys.modules) == plots\n"
        "cls = keras.saving.get_registered_object('deepmetric>TripletSemiHardLoss')\n"
        "head = keras.saving.get_registered_object('deepmetric>ArcFace')\n"
        "print(cls.__name__, head.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["TripletSemiHardLoss", "ArcFace"]
