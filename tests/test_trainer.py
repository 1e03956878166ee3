"""The trainer: data checks, bad files, early stopping, mixed precision seam,
run folder and checkpoint format, --resume, and the offline-weights error.

Training runs here use tiny generated images (32 px, --weights none) so each
takes seconds; tests/test_trainer_clothing.py fine-tunes on real photos and
tests/test_trainer_distributed.py runs torchrun with two processes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagesearch import errors
from imagesearch.model.backbones import EmbeddingNet
from imagesearch.model.checkpoint import FORMAT, load_checkpoint
from imagesearch.model.preprocessing import PreprocessSpec, eval_transform
from tests.helpers import make_dataset
from trainer import amp
from trainer import train as train_mod
from trainer.__main__ import main as cli_main
from trainer.data import Collate, ImageFiles, check_layout
from trainer.early_stopping import EarlyStopping
from trainer.losses import CrossEntropy

ROOT = Path(__file__).resolve().parents[1]
RUN_FILES = {"args.json", "summary.csv", "accuracy.png", "loss.png", "retrieval.png", "best.pt", "last.pt",
             "fusion.json", "fusion.md"}


@pytest.fixture(autouse=True)
def _threads():
    # One thread: with other work on the machine, OpenMP threads that spin at
    # barriers waiting for a descheduled sibling make small steps 10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"))


def tiny_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--backbone", "efficientnet_lite0", "--weights", "none",
            "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--seed", "1",
            "--log-level", "WARNING", *extra]


def run_in_process(argv: list[str]) -> train_mod.TrainResult:
    return train_mod.main(train_mod.get_args_parser().parse_args(argv))


def read_summary(run_dir: Path) -> list[dict]:
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- data layout

@pytest.mark.parametrize("breakage, expect", [
    ("no_val", ["val/", "missing"]),
    ("no_train", ["train/", "missing"]),
    ("val_split_with_val", ["val/ folder", "drop --val-split"]),
    ("val_split_out_of_range", ["--val-split 1.5", "fraction"]),
    ("class_only_in_val", ["purple", "not in train/"]),
    ("empty_class", ["val/green/", "empty"]),
    ("one_class", ["at least 2"]),
])
def test_bad_layout_is_exit_2_with_what_to_fix(tmp_path, capsys, breakage, expect):
    import shutil

    data = make_dataset(tmp_path / "data", n_train=2, n_val=1, bad_files=False)
    if breakage == "no_val":
        shutil.rmtree(data / "val")
    elif breakage == "no_train":
        shutil.rmtree(data / "train")
    extra = []
    if breakage == "val_split_with_val":
        extra = ["--val-split", "0.2"]
    elif breakage == "val_split_out_of_range":
        shutil.rmtree(data / "val")
        extra = ["--val-split", "1.5"]
    elif breakage == "class_only_in_val":
        (data / "val" / "purple").mkdir()
        (data / "val" / "purple" / "a.jpg").write_bytes((data / "val" / "red" / "0.png").read_bytes())
    elif breakage == "empty_class":
        for f in (data / "val" / "green").iterdir():
            f.unlink()
        (data / "val" / "green" / "notes.txt").write_text("not an image")
    elif breakage == "one_class":
        for split in ("train", "val"):
            shutil.rmtree(data / split / "green")
            shutil.rmtree(data / split / "blue")
    out = tmp_path / "run"
    assert cli_main(tiny_args(data, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("imagesearch-train: error: --")
    for word in expect:
        assert word in err
    assert not out.exists() or not any(out.iterdir()), "nothing may be written before the data is fixed"


def test_missing_data_dir_and_flags(tmp_path, capsys):
    assert cli_main(tiny_args(tmp_path / "nowhere", tmp_path / "run")) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli_main(["--out", str(tmp_path / "run")]) == 2
    assert "--data DIR is required" in capsys.readouterr().err
    data = make_dataset(tmp_path / "d", 2, 1, bad_files=False)
    assert cli_main(tiny_args(data, tmp_path / "run", "--batch-size", "0")) == 2
    assert "--batch-size 0" in capsys.readouterr().err
    assert cli_main(tiny_args(data, tmp_path / "run", "--weights", str(tmp_path / "missing.pt"))) == 2
    assert "no such file" in capsys.readouterr().err


def test_layout_counts_classes_in_sorted_order(tiny_data):
    layout = check_layout(tiny_data)
    assert layout.class_names == ("blue", "green", "red")
    assert layout.train.counts() == {"blue": 6, "green": 6, "red": 8}  # + corrupt + truncated
    assert layout.val.counts() == {"blue": 3, "green": 3, "red": 3}


def test_val_may_hold_a_subset_of_the_train_classes(tmp_path):
    import shutil

    data = make_dataset(tmp_path / "data", n_train=3, n_val=2, bad_files=False)
    shutil.rmtree(data / "val" / "green")
    layout = check_layout(data)
    assert layout.class_names == ("blue", "green", "red")  # indices always from train/
    assert layout.val.counts() == {"blue": 2, "green": 0, "red": 2}
    assert {t for _, t in layout.val.samples} == {0, 2}
    result = run_in_process(tiny_args(data, tmp_path / "run"))
    assert load_checkpoint(result.run_dir / "best.pt").class_names == ["blue", "green", "red"]


def test_val_split_is_stratified_seeded_and_kept_for_resume(tmp_path):
    import shutil

    data = make_dataset(tmp_path / "data", n_train=10, n_val=1, bad_files=False)
    shutil.rmtree(data / "val")
    first = check_layout(data, val_split=0.2, seed=7)
    assert first.val.counts() == {"blue": 2, "green": 2, "red": 2}
    assert first.train.counts() == {"blue": 8, "green": 8, "red": 8}
    assert not set(first.val.samples) & set(first.train.samples)
    assert check_layout(data, val_split=0.2, seed=7).val.samples == first.val.samples  # seeded
    assert check_layout(data, val_split=0.2, seed=8).val.samples != first.val.samples

    out = tmp_path / "run"
    run_in_process(tiny_args(data, out, "--val-split", "0.2", "--seed", "7"))
    saved = json.loads((out / "val_split.json").read_text())
    assert saved["seed"] == 7 and len(saved["val"]) == 6
    assert sorted(saved["val"]) == sorted(Path(p).relative_to(data / "train").as_posix()
                                          for p, _ in first.val.samples)
    # A new file in train/ must not move the recorded split on resume.
    (data / "train" / "blue" / "new.png").write_bytes((data / "train" / "blue" / "0.png").read_bytes())
    run_in_process(["--resume", str(out), "--epochs", "2", "--workers", "0", "--log-level", "WARNING"])
    assert json.loads((out / "val_split.json").read_text()) == saved
    resolved = json.loads((out / "args.json").read_text())["resolved"]
    assert resolved["val_images"] == 6 and resolved["train_images"] == 25


def test_val_split_that_lost_its_files_is_an_error(tmp_path):
    import shutil

    data = make_dataset(tmp_path / "data", n_train=4, n_val=1, bad_files=False)
    shutil.rmtree(data / "val")
    carved = check_layout(data, val_split=0.25, seed=1).carved
    (data / "train" / carved["val"][0]).unlink()
    with pytest.raises(errors.InvalidArgument, match="no longer in train/"):
        check_layout(data, carved=carved)


# ---------------------------------------------------------------- bad files

def test_bad_files_are_skipped_records_not_exceptions(tiny_data, tmp_path):
    spec = PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3)
    vanished = tmp_path / "gone.jpg"
    samples = [(str(tiny_data / "train/red/corrupt.jpg"), 2), (str(tiny_data / "train/red/truncated.jpg"), 2),
               (str(vanished), 0), (str(tiny_data / "train/red/0.png"), 2)]
    ds = ImageFiles(samples, eval_transform(spec))
    items = [ds[i] for i in range(len(ds))]
    assert [type(it).__name__ for it in items] == ["Skipped", "Skipped", "Skipped", "tuple"]
    assert "corrupt.jpg" in items[0].reason and "not a recognised image" in items[0].reason
    assert "truncated" in items[1].reason
    assert "cannot read" in items[2].reason
    batch = Collate(32)(items)
    assert batch.images.shape == (1, 3, 32, 32) and batch.targets.tolist() == [2]
    assert len(batch.skipped) == 3
    empty = Collate(32)(items[:3])
    assert empty.images.shape == (0, 3, 32, 32) and empty.targets.shape == (0,)


# ---------------------------------------------------------------- early stopping

def test_early_stopping_compares_with_the_best_not_the_previous_epoch():
    s = EarlyStopping(patience=3)
    losses = [1.0, 0.5, 0.6, 0.55, 0.58, 0.4]
    improved = []
    for epoch, loss in enumerate(losses, 1):
        improved.append(s.step(epoch, loss))
        if s.should_stop:
            break
    # 0.55 beats the previous epoch (0.6) but not the best (0.5): it is no improvement.
    assert improved == [True, True, False, False, False]
    assert (s.best_epoch, s.best_value, s.bad_epochs) == (2, 0.5, 3)
    restored = EarlyStopping(patience=5)
    restored.load_state_dict(s.state_dict())
    assert not restored.should_stop and restored.best_epoch == 2
    nan = EarlyStopping(patience=1)
    assert nan.step(1, math.nan) is False and nan.should_stop
    scores = EarlyStopping(patience=2, mode="max")  # mAP@10: higher is better
    assert [scores.step(e, v) for e, v in enumerate([0.5, 0.7, 0.6, 0.65], 1)] == [True, True, False, False]
    assert scores.best_epoch == 2 and scores.should_stop


@pytest.mark.parametrize("select_by, figure, scripted", [
    ("loss", "loss", [0.9, 0.7, 0.8, 0.75, 0.72, 0.1]),  # best at epoch 2; 3 epochs worse than it
    ("map", "map", [0.3, 0.6, 0.5, 0.55, 0.58, 0.9]),
])
def test_training_stops_early_and_restores_the_best_epoch(tiny_data, tmp_path, monkeypatch, select_by, figure,
                                                          scripted):
    values = iter(scripted)
    real_evaluate = train_mod.evaluate

    def evaluate(*a, **kw):
        metrics = real_evaluate(*a, **kw)
        return {**metrics, figure: next(values)}

    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    out = tmp_path / "run"
    result = run_in_process(tiny_args(tiny_data, out, "--epochs", "10", "--patience", "3", "--lr", "1e-2",
                                      "--select-by", select_by))
    rows = read_summary(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [int(r["best"]) for r in rows] == [1, 1, 0, 0, 0]
    assert result.stopped_early and result.best_epoch == 2
    best = torch.load(out / "best.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert best["meta"]["epoch"] == 2 and last["meta"]["epoch"] == 5
    assert last["early_stopping"] == {"best_value": scripted[1], "best_epoch": 2, "bad_epochs": 3,
                                      "mode": "min" if select_by == "loss" else "max"}
    assert float(rows[1][train_mod.SELECT_BY[select_by]]) == pytest.approx(scripted[1])
    weights = {k: v.cpu() for k, v in result.model.state_dict().items()}
    assert all(torch.equal(weights[k], best["state_dict"][k]) for k in weights), "returned model is the best epoch"
    assert any(not torch.equal(weights[k], last["state_dict"][k]) for k in weights if k.endswith("weight"))


# ---------------------------------------------------------------- mixed precision seam

@pytest.mark.parametrize("device, bf16, mode, scales", [
    ("cuda", True, "bf16", False),
    ("cuda", False, "fp16", True),
    ("cpu", False, "off", False),
])
def test_precision_choice(device, bf16, mode, scales):
    p = amp.resolve_precision(device, bf16)
    assert (p.mode, p.scales_loss, p.device_type) == (mode, scales, device)


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_mixed_precision_training_runs_the_cuda_code_path_on_cpu(tiny_data, mode):
    """train_one_epoch with autocast + GradScaler exactly as on CUDA, with
    device_type cpu. (A small convnet: float16 convolutions on CPU are slow.)"""
    layout = check_layout(tiny_data)
    spec = PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3)
    loader = torch.utils.data.DataLoader(ImageFiles(layout.train.samples, eval_transform(spec)),
                                         batch_size=4, shuffle=True, collate_fn=Collate(32))
    torch.manual_seed(0)
    model = SmallNet()
    precision = amp.Precision("cpu", mode)
    scaler = precision.grad_scaler()
    assert scaler.is_enabled() == (mode == "fp16")
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    criterion = CrossEntropy()
    history = [train_mod.train_one_epoch(model, criterion, opt, loader, torch.device("cpu"), epoch, precision,
                                         scaler, progress=False) for epoch in range(1, 9)]
    for metrics in history:
        assert metrics["skipped"] == 2 and 14 <= metrics["images"] <= 18  # a lone last image sits out
        assert math.isfinite(metrics["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert history[-1]["loss"] < history[0]["loss"], "the scaled steps must learn something"
    evaluated = train_mod.evaluate(model, criterion, loader, torch.device("cpu"), precision, progress=False)
    assert evaluated["images"] == 18 and math.isfinite(evaluated["loss"])
    assert 0 <= evaluated["map"] <= 1 and 0 <= evaluated["precision"] <= 1


class SmallNet(torch.nn.Module):
    """EmbeddingNet's interface (features, head, dim) around a small convnet."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(8, 3)
        self.dim = 8

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------- a whole run

def test_run_folder_and_checkpoint_format(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert cli_main(tiny_args(tiny_data, out, "--epochs", "2", "--lr", "3e-3", "--schedule", "constant",
                              "--warmup-epochs", "0")) == 0
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary files left"
    umask = os.umask(0o022)
    os.umask(umask)
    for name in RUN_FILES:  # as open() would create them, not mkstemp's 0600
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name

    args = json.loads((out / "args.json").read_text())
    assert args["backbone"] == "efficientnet_lite0" and args["epochs"] == 2 and args["batch_size"] == 4
    assert args["resolved"]["class_names"] == ["blue", "green", "red"] and args["resolved"]["world_size"] == 1

    rows = read_summary(out)
    assert list(rows[0]) == list(train_mod.SUMMARY_FIELDS)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        assert int(r["train_skipped"]) == 2 and int(r["val_skipped"]) == 0  # counted every epoch
        assert int(r["val_images"]) == 9
        assert 0 <= float(r["val_accuracy"]) <= 1 and float(r["val_loss"]) > 0
        # 9 val images, 3 a class: each query has 2 relevant images, so P@10 is at most 0.2.
        assert 0 < float(r["val_map@10"]) <= 1 and 0 < float(r["val_precision@10"]) <= 0.2
        assert 0 <= float(r["val_top1"]) <= 1
        assert float(r["lr"]) == pytest.approx(3e-3) and float(r["seconds"]) >= 0

    for png in ("accuracy.png", "loss.png", "retrieval.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size == (640, 420)

    raw = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and "optimizer" not in raw
    meta = raw["meta"]
    assert meta["backbone"] == "efficientnet_lite0" and meta["class_names"] == ["blue", "green", "red"]
    # Lite0's own normalisation and interpolation, at --image-size.
    assert PreprocessSpec.from_dict(meta["preprocess"]) == PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3, "bicubic")
    # The default recipe: P2SGrad on a 512-d neck; the loss holds the class weights, so no classifier head.
    assert meta["embedding_dim"] == 512 and meta["weights"] == "none"
    assert meta["model"] == {"neck_dim": 512, "num_classes": 0}
    assert meta["recipe"] == "default" and meta["loss"] == "p2sgrad"
    assert set(meta["metrics"]) >= {"val_loss", "val_accuracy", "train_loss", "train_accuracy"}
    assert not any(k.startswith("module.") for k in raw["state_dict"])

    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["meta"]["epoch"] == 2 and last["optimizer"]["state"] and len(last["history"]) == 2

    loaded = load_checkpoint(out / "best.pt", fusion=False)  # the trained model (served: fused, below)
    assert loaded.backbone == "efficientnet_lite0" and loaded.class_names == ["blue", "green", "red"]
    assert loaded.spec == PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3, "bicubic")
    loaded.model.eval()
    with Image.open(tiny_data / "val" / "red" / "0.png") as im:
        x = eval_transform(loaded.spec)(im.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        v = loaded.model.embed(x)
    assert v.shape == (1, 512) and torch.linalg.vector_norm(v, dim=1).item() == pytest.approx(1.0, abs=1e-5)


def test_the_fusion_weight_is_chosen_on_val_and_the_flag_or_fuse_sets_it(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(tiny_args(tiny_data, out)) == 0
    table = json.loads((out / "fusion.json").read_text())
    rows = table["table"]
    assert [r["weight"] for r in rows] == list(train_mod.FUSION_WEIGHTS)
    # Weight 0 is the plain embedding: the best epoch's own val mAP@10.
    best_epoch = max(read_summary(out), key=lambda r: float(r["val_map@10"]))
    assert rows[0]["map@10"] == pytest.approx(float(best_epoch["val_map@10"]), abs=1e-4)
    fusion = torch.load(out / "best.pt", weights_only=True)["meta"]["fusion"]
    top = max(r["map@10"] for r in rows)
    assert fusion == table["chosen"] and fusion["chosen_by"] == "validation mAP@10" and fusion["val_images"] == 9
    assert fusion["weight"] == min(r["weight"] for r in rows if r["map@10"] == top)
    assert fusion["source"] == "pooled" and f"| {fusion['weight']:g} | " in (out / "fusion.md").read_text()
    served = load_checkpoint(out / "best.pt").model
    assert served.dim == (512 if fusion["weight"] == 0 else 1280 + 512)

    fixed = tmp_path / "fixed"
    assert cli_main(tiny_args(tiny_data, fixed, "--fusion-weight", "0.3")) == 0
    fusion = torch.load(fixed / "best.pt", weights_only=True)["meta"]["fusion"]
    assert fusion["weight"] == 0.3 and fusion["chosen_by"] == "--fusion-weight"
    assert load_checkpoint(fixed / "best.pt").model.dim == 1280 + 512
    # Re-chosen without training: weight 0 serves the plain model, and the table says so.
    before = (fixed / "best.pt").read_bytes()
    assert cli_main(["fuse", str(fixed), "--fusion-weight", "0", "--workers", "0"]) == 0
    assert type(load_checkpoint(fixed / "best.pt").model) is EmbeddingNet
    assert json.loads((fixed / "fusion.json").read_text())["chosen"]["weight"] == 0
    assert cli_main(["fuse", str(fixed), "--workers", "0"]) == 0
    assert torch.load(fixed / "best.pt", weights_only=True)["meta"]["fusion"]["chosen_by"] == "validation mAP@10"
    assert len((fixed / "best.pt").read_bytes()) == pytest.approx(len(before), rel=0.01)  # meta only
    for argv, message in ((["fuse", str(fixed), "--fusion-weight", "1.5"], "between 0 and 1"),
                          (["fuse", str(tmp_path)], "no best.pt"),
                          (tiny_args(tiny_data, tmp_path / "bad", "--fusion-weight", "-1"), "between 0 and 1"),
                          (tiny_args(tiny_data, tmp_path / "bad", "--fusion-weight", "0.5", "--embedding-dim", "0"),
                           "needs a neck")):
        assert cli_main(argv) == 2 and message in capsys.readouterr().err


def test_out_holding_a_run_is_not_overwritten(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(tiny_args(tiny_data, out)) == 0
    before = (out / "best.pt").read_bytes()
    assert cli_main(tiny_args(tiny_data, out)) == 2
    assert f"--resume {out}" in capsys.readouterr().err
    assert (out / "best.pt").read_bytes() == before


def test_resume_continues_exactly_where_the_run_left_off(tiny_data, tmp_path, capsys):
    # A constant schedule after warm-up: a cosine spans --epochs, so a run of 1 epoch resumed to 2
    # follows another curve than a straight run of 2.
    straight = tmp_path / "straight"
    assert cli_main(tiny_args(tiny_data, straight, "--epochs", "2", "--schedule", "constant")) == 0
    resumed = tmp_path / "resumed"
    assert cli_main(tiny_args(tiny_data, resumed, "--epochs", "1", "--schedule", "constant")) == 0
    # Only --resume and --epochs: everything else comes from the run's own record.
    assert cli_main(["--resume", str(resumed), "--epochs", "2", "--workers", "0", "--log-level", "WARNING"]) == 0

    rows = read_summary(resumed)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for column in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_images"):
        assert [float(r[column]) for r in rows] == pytest.approx(
            [float(r[column]) for r in read_summary(straight)], rel=1e-4), column
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert b["meta"]["epoch"] == 2
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((resumed / "args.json").read_text())["resolved"]["resumed_at_epoch"] == 1

    # A resumed run keeps its model.
    assert cli_main(["--resume", str(resumed), "--epochs", "3", "--image-size", "64"]) == 2
    assert "--image-size 64 differs" in capsys.readouterr().err
    assert cli_main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "no last.pt" in capsys.readouterr().err


# ---------------------------------------------------------------- weights that cannot be had

def test_b4_imagenet_weights_unavailable_offline_fails_before_training(tiny_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "torch_home")}
    env.update(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               TORCH_HOME=str(tmp_path / "torch-home"), OMP_NUM_THREADS="1", IMAGESEARCH_TORCH_THREADS="1")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "--data", str(tiny_data), "--out", str(out), "--backbone",
         "efficientnet_b4", "--image-size", "32", "--epochs", "1", "--workers", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "imagesearch-train: error:" in err and "efficientnet_b4" in err
    for way_out in ("--weights PATH", "--weights none", "efficientnet_lite0"):
        assert way_out in err
    assert "epoch 1" not in err and not (out / "summary.csv").exists()


def test_the_trainer_never_imports_grpc():
    code = ("import sys, trainer.__main__, trainer.train, imagesearch.model.checkpoint; "
            "bad = sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'grpc_'))); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
