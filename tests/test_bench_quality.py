"""bench/quality.py's bookkeeping (the measuring itself is the bench's job):
options parse, seeds name their runs, cached runs are found by what they
train, and the per-option means over seeds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench import quality


def args_for(tmp_path: Path, data: Path, **kw) -> argparse.Namespace:
    return quality.get_args_parser().parse_args(
        ["--data", str(data), "--runs", str(tmp_path / "runs"), *sum(([f"--{k}", v] for k, v in kw.items()), [])])


def fake_run(folder: Path, argv: list[str], data: Path, epochs_done: int) -> None:
    """A finished-looking run folder whose args.json says it trained `argv`."""
    from trainer.train import _args_dict, _resolve_args, get_args_parser

    folder.mkdir(parents=True)
    resolved = _resolve_args(get_args_parser().parse_args(["--data", str(data), *argv]), None)
    (folder / "args.json").write_text(json.dumps(_args_dict(resolved)))
    (folder / "best.pt").write_bytes(b"")
    rows = "".join(f"{e},1,1,1,1,0.5,0.5,0.5,0,60,0,0,1,1,{int(e == 1)}\n" for e in range(1, epochs_done + 1))
    (folder / "summary.csv").write_text(
        "epoch,train_loss,train_accuracy,val_loss,val_accuracy,val_map@10,val_precision@10,val_top1,lr,seconds,"
        "train_skipped,val_skipped,train_images,val_images,best\n" + rows)


def test_options_are_a_base_and_distinct_modifiers():
    assert quality.parse_option("default+tta+qe") == ("default", ["tta", "qe"])
    assert quality.parse_option("lite2") == ("lite2", [])
    for bad in ("nope", "default+tta+tta", "default+fast"):
        with pytest.raises(SystemExit, match="unknown option"):
            quality.parse_option(bad)
    for row in quality.DEFAULT_ROWS:
        quality.parse_option(row)


def test_seeds_parse_and_refuse_nonsense():
    assert quality.parse_seeds("42,7") == [42, 7]
    for bad in ("", "4a", "7,7"):
        with pytest.raises(argparse.ArgumentTypeError):
            quality.parse_seeds(bad)


def test_a_run_is_found_by_what_it_trained_and_its_seed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    args = args_for(tmp_path, data)
    common = ["--backbone", "efficientnet_lite0", "--weights", "imagenet", "--epochs", "3"]
    fake_run(tmp_path / "runs" / "whatever-name", common, data, 3)  # the default recipe, seed 42
    fake_run(tmp_path / "runs" / "other", [*common, "--seed", "7", "--sampler", "sqrt"], data, 3)
    fake_run(tmp_path / "runs" / "half", [*common, "--seed", "7"], data, 2)  # not finished
    assert quality.run_dir(args, "default", 42) == tmp_path / "runs" / "whatever-name"
    assert quality.run_dir(args, "sqrt", 7) == tmp_path / "runs" / "other"
    fresh = quality.run_dir(args, "default", 7)  # only an unfinished one: a new folder named by seed
    assert fresh.parent == tmp_path / "runs" and fresh.name.startswith("default-seed7-")
    assert quality.run_dir(args, "sqrt", 42).name.startswith("sqrt-") and "seed" not in quality.run_dir(
        args, "sqrt", 42).name
    lite2 = quality.trainer_args(args, "lite2", 42)
    assert lite2[-2:] == ["--backbone", "efficientnet_lite2"]  # the base's backbone comes last and wins


def test_means_over_seeds_per_option():
    def row(option, seed, p):
        return {"base_option": option, "seed": seed, "precision@10": p, "map@10": p - 0.1, "top1": 0.9}

    rows = [row("default", 42, 0.82), row("default", 7, 0.84), row("sqrt", 42, 0.80),
            {"base_option": "off-the-shelf", "seed": None, "precision@10": 0.6, "map@10": 0.5, "top1": 0.7}]
    [m] = quality.seed_means(rows, 10)
    assert m["option"] == "default" and m["runs"] == 2
    assert (m["precision"], m["precision_min"], m["precision_max"]) == pytest.approx((0.83, 0.82, 0.84))
