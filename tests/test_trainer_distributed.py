"""`torchrun --nproc_per_node=2 -m trainer ...` on CPU (gloo): DistributedDataParallel
with rank 0 writing the run folder, metrics summed over both processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagesearch.model.checkpoint import FORMAT, load_checkpoint
from tests.helpers import make_dataset
from tests.test_trainer import RUN_FILES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_write_one_run_in_the_checkpoint_format(tmp_path):
    data = make_dataset(tmp_path / "data")  # 3 classes, 18 good + 2 bad train files, 9 val
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMAGESEARCH_TORCH_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "trainer", "--data", str(data), "--out", str(out), "--backbone", "efficientnet_lite0",
         "--weights", "none", "--image-size", "32", "--batch-size", "4", "--epochs", "2", "--workers", "0",
         "--lr", "3e-3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stderr
    assert "process group: rank 0 of 2 (gloo)" in log
    assert "device cpu x2" in log
    assert log.count("INFO [rank 0] trainer.train: epoch 1/2") == 1
    assert "INFO [rank 1]" not in log, "only rank 0 reports progress"

    assert RUN_FILES <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for r in rows:
        # Summed over both processes: each holds half of the data.
        assert int(r["val_images"]) == 9 and int(r["val_skipped"]) == 0
        assert int(r["train_skipped"]) == 2 and 14 <= int(r["train_images"]) <= 18

    raw = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and raw["meta"]["epoch"] == 2
    assert raw["meta"]["args"]["backbone"] == "efficientnet_lite0"
    assert not any(k.startswith("module.") for k in raw["state_dict"]), "DDP wrapper must not leak into keys"
    loaded = load_checkpoint(out / "best.pt", fusion=False)
    assert loaded.class_names == ["blue", "green", "red"] and loaded.spec.input_size == 32
    # The fusion weights were scored on the whole validation split, gathered from both processes.
    assert json.loads((out / "fusion.json").read_text())["chosen"]["val_images"] == 9
    assert loaded.meta["embedding_dim"] == 512  # the default recipe's neck

    x = torch.rand(2, 3, 32, 32)
    loaded.model.eval()
    with torch.no_grad():
        # No classifier head (the loss's class weights live in the loss, synchronised by hand: an
        # empty batch on one process, from the bad files, must still join that all_reduce).
        assert loaded.model(x).shape == (2, 512) and loaded.model.embed(x).shape == (2, 512)
