"""The training options, mechanics only (quality is bench/quality.py's job):
the recipes, retrieval-aware selection, the metric-learning losses, the
embedding neck, the samplers, the options that were removed, and flip
test-time augmentation in the embedder. Runs use a tiny real subset of clothing-small (3 classes,
32 px, --weights none, 1 epoch); tests that need it skip without it."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clients import metrics as client_metrics
from embedder_service.embedder import Embedder
from imagesearch import errors
from imagesearch.model.backbones import fingerprint
from imagesearch.model.checkpoint import load_checkpoint, load_model
from imagesearch.model.preprocessing import load_tensor
from imagesearch.retrieval_metrics import leave_one_out, top_k_others
from testkit import ServiceProcess
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc
from trainer import recipe as recipes
from trainer.__main__ import main as cli_main

CLASSES = ("hat", "pants", "shoes")


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real_subset(clothing_dir, tmp_path_factory) -> Path:
    """Symlinks to 6 train and 3 val photos of 3 classes (never a copy)."""
    root = tmp_path_factory.mktemp("clothing-tiny")
    for split, n in (("train", 6), ("val", 3)):
        for c in CLASSES:
            out = root / split / c
            out.mkdir(parents=True)
            for f in sorted((clothing_dir / split / c).iterdir())[:n]:
                os.symlink(f.resolve(), out / f.name)
    return root


def args_for(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--backbone", "efficientnet_lite0", "--weights", "none",
            "--image-size", "32", "--batch-size", "6", "--epochs", "1", "--workers", "0", "--seed", "1",
            "--log-level", "WARNING", *extra]


def summary(run: Path) -> list[dict]:
    with open(run / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- retrieval metrics

def test_leave_one_out_scores_each_vector_against_the_others():
    # Two classes on two axes; item 2 (class 0) sits nearer class 1.
    vectors = np.array([[1, 0], [0.9, 0.1], [0.2, 0.8], [0, 1], [0.1, 0.9]], np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [0, 0, 0, 1, 1]
    ranked = top_k_others(vectors, k=10)
    assert ranked.shape == (5, 4) and all(i not in row for i, row in enumerate(ranked.tolist()))
    assert ranked[0].tolist()[:2] == [1, 2]
    scores = leave_one_out(vectors, labels, k=2)
    # The same figures as the CLI's scoring of the same rankings (one definition).
    expected = [client_metrics.average_precision(ranked[i][:2].tolist(),
                                                 {j for j, c in enumerate(labels) if c == labels[i] and j != i}, 2)
                for i in range(5)]
    assert scores["map"] == pytest.approx(np.mean(expected)) and scores["queries"] == 5
    assert scores["top1"] == pytest.approx(4 / 5)  # item 2's nearest is class 1
    assert leave_one_out(vectors[:2], [0, 1])["queries"] == 0  # no query has a relevant item


def test_ties_are_broken_by_index():
    vectors = np.ones((4, 3), np.float32) / np.sqrt(3)
    assert top_k_others(vectors, 3).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


# ---------------------------------------------------------------- recipe parts

def test_schedule_warms_up_then_decays_to_the_floor():
    s = recipes.Schedule("cosine", total=100, warmup=10)
    factors = [s.factor(i) for i in range(100)]
    assert factors[0] < factors[5] < factors[9] < 1.0 and factors[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert s.factor(100) == pytest.approx(recipes.MIN_LR_FACTOR)
    assert recipes.Schedule("constant", 100, 0).factor(77) == 1.0


def test_new_parts_learn_faster_and_the_seed_recipe_keeps_one_group():
    from imagesearch.model.backbones import build_model
    from trainer.losses import build_criterion

    model = build_model("efficientnet_lite0", "none", 0, neck_dim=8)
    criterion = build_criterion("arcface", 3, model.dim)
    groups = recipes.parameter_groups(model, criterion, 1e-3, 10.0, 0.05)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.body.conv_stem.weight)]["lr"] == pytest.approx(1e-3)
    assert by_id[id(model.body.conv_stem.weight)]["weight_decay"] == 0.05
    assert by_id[id(model.body.bn1.weight)]["weight_decay"] == 0.0  # no decay on norms
    assert by_id[id(model.neck[0].weight)]["lr"] == pytest.approx(1e-2)
    assert by_id[id(criterion.loss.W)]["lr"] == pytest.approx(1e-2)  # the loss's class weights train too
    seed = recipes.RECIPES["seed"]
    plain = build_model("efficientnet_lite0", "none", 3)
    one = recipes.parameter_groups(plain, build_criterion("ce", 3, plain.dim), seed["lr"], seed["head_lr_mult"],
                                   seed["weight_decay"])
    assert len(one) == 1 and len(one[0]["params"]) == len(list(plain.parameters()))


def test_class_balanced_sampler_draws_small_classes_more_often():
    from trainer.distributed import SAMPLER_POWERS, ClassBalancedSampler

    targets = [0] * 900 + [1] * 100  # 9:1
    shares = {}
    for name, power in SAMPLER_POWERS.items():
        sampler = ClassBalancedSampler(targets, power, seed=3)
        sampler.set_epoch(1)
        drawn = list(sampler)
        assert len(drawn) == len(sampler) == len(targets)  # as many steps an epoch as a shuffle
        shares[name] = sum(targets[i] for i in drawn) / len(drawn)
        again = ClassBalancedSampler(targets, power, seed=3)
        again.set_epoch(1)
        assert list(again) == drawn  # seeded: a resumed epoch draws the same images
        again.set_epoch(2)
        assert list(again) != drawn
    assert shares["balanced"] == pytest.approx(0.5, abs=0.05)
    assert shares["sqrt"] == pytest.approx(1 / (1 + 3), abs=0.05)  # sqrt(100) : sqrt(900) = 1 : 3
    # Ranks split one draw between them, equal in length.
    ranks = [ClassBalancedSampler(targets[:999], 0.0, rank=r, world_size=2, seed=3) for r in range(2)]
    parts = [list(r) for r in ranks]
    assert len(parts[0]) == len(parts[1]) == 500  # 999 images, padded to an equal share
    assert parts[0] != parts[1]


def test_the_sampler_flag_picks_the_training_order(real_subset):
    from torch.utils.data import DistributedSampler

    from imagesearch.model.preprocessing import PreprocessSpec
    from trainer import distributed
    from trainer.data import check_layout
    from trainer.train import _loaders, _resolve_args, get_args_parser

    layout = check_layout(real_subset)
    spec = PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3)
    for name, kind, power in (("shuffle", DistributedSampler, None), ("sqrt", distributed.ClassBalancedSampler, 0.5),
                              ("balanced", distributed.ClassBalancedSampler, 0.0)):
        args = _resolve_args(get_args_parser().parse_args(["--sampler", name, "--workers", "0"]), None)
        _, _, sampler = _loaders(layout, spec, args, distributed.from_env(), torch.device("cpu"))
        assert type(sampler) is kind and len(sampler) == len(layout.train.samples)
        if power is not None:  # the class shares follow the flag's power (3 classes of 6 images: equal weights)
            assert torch.allclose(sampler.weights, torch.full((18,), 6.0 ** (power - 1), dtype=torch.float64))


def test_augmentations_differ_only_where_they_say():
    from torchvision import transforms

    from imagesearch.model.preprocessing import PreprocessSpec, train_transform

    spec = PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3)
    kinds = {name: [type(t) for t in train_transform(spec, name).transforms] for name in ("strong", "seed")}
    assert transforms.TrivialAugmentWide in kinds["strong"] and transforms.RandomResizedCrop in kinds["strong"]
    assert transforms.RandomResizedCrop not in kinds["seed"] and transforms.RandomRotation in kinds["seed"]
    with pytest.raises(Exception, match="unknown augmentation 'heavy'"):
        train_transform(spec, "heavy")


def test_training_settings_name_what_a_run_trains_whatever_the_spelling():
    from trainer.train import training_settings

    default = training_settings([])
    assert (default["loss"], default["embedding_dim"], default["augment"]) == ("p2sgrad", 512, "strong")
    assert training_settings(["--loss", "p2sgrad", "--embedding-dim", "512"]) == default
    assert training_settings(["--label-smoothing", "0.1"]) == default  # a metric loss has no use for it
    assert training_settings(["--loss", "arcface"]) != default
    ce = training_settings(["--loss", "ce", "--embedding-dim", "0"])
    assert ce != default and ce != training_settings(["--loss", "ce", "--embedding-dim", "0", "--label-smoothing", "0.1"])
    assert training_settings(["--augment", "seed"]) != default
    assert training_settings(["--out", "a", "--workers", "3", "--device", "cpu"]) == default  # where, not what


def test_the_input_size_is_the_backbones_own_except_in_the_seed_recipe():
    from trainer.train import training_settings

    assert training_settings([])["image_size"] == 224  # Lite0
    assert training_settings(["--backbone", "efficientnet_lite2"])["image_size"] == 260
    assert training_settings(["--backbone", "efficientnet_b4"])["image_size"] == 380
    assert training_settings(["--backbone", "efficientnet_b4", "--recipe", "seed"])["image_size"] == 224
    assert training_settings(["--backbone", "efficientnet_b4", "--image-size", "300"])["image_size"] == 300
    assert training_settings(["--image-size", "224"]) == training_settings([])


def test_p2sgrad_scores_classes_by_cosine_and_its_weights_learn():
    from trainer.losses import build_criterion

    criterion = build_criterion("p2sgrad", 3, 8)
    weights = criterion.class_weights()
    assert weights.shape == (3, 8)
    scores = criterion.logits(weights[1].detach().unsqueeze(0) * 4)
    assert scores.argmax().item() == 1 and scores[0, 1].item() == pytest.approx(1.0, abs=1e-5)
    loss = criterion(torch.randn(5, 8, requires_grad=True), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and criterion.loss.weight.grad.abs().sum() > 0
    # After an optimiser step the weights are unit again on every process, whether or not
    # its forward ran (a process with an empty batch skips it): the copies stay equal.
    with torch.no_grad():
        criterion.loss.weight.add_(0.3 * torch.randn_like(criterion.loss.weight))
    stepped = criterion.loss.weight.detach().clone()
    criterion.after_step()
    torch.testing.assert_close(criterion.loss.weight.norm(dim=0), torch.ones(3))
    torch.testing.assert_close(criterion.loss.weight.detach(), stepped / stepped.norm(dim=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--label-smoothing", "1.5"], "--label-smoothing 1.5"),
    (["--embedding-dim", "-1"], "--embedding-dim -1"),
    (["--head-lr-mult", "0"], "--head-lr-mult 0"),
    (["--lr", "nan"], "--lr nan"),
])
def test_bad_recipe_numbers_are_exit_2(tmp_path, capsys, extra, message):
    data = tmp_path / "nodata"
    data.mkdir()
    assert cli_main(args_for(data, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--ema", "25%"], ["--pooling", "gem"], ["--head-init", "imprint"],
                                  ["--distill-from", "t.pt"], ["--distill-weight", "1"], ["--loss", "adacos"],
                                  ["--loss", "subcenter_arcface"], ["--loss", "proxy_anchor"], ["--augment", "light"]])
def test_removed_options_are_argparse_errors(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        cli_main(args_for(tmp_path, tmp_path / "run", *flag))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err or "invalid choice" in err


# ---------------------------------------------------------------- whole runs on real photos

@pytest.mark.parametrize("name, extra", [
    ("seed", ["--recipe", "seed"]),
    ("default", []),
    ("ce-pooled", ["--loss", "ce", "--embedding-dim", "0"]),
    ("arcface-neck", ["--loss", "arcface", "--embedding-dim", "16"]),
    ("p2sgrad-sqrt", ["--loss", "p2sgrad", "--embedding-dim", "16", "--sampler", "sqrt"]),
])
def test_each_option_trains_and_its_checkpoint_rebuilds_the_model(real_subset, tmp_path, name, extra):
    out = tmp_path / name
    assert cli_main(args_for(real_subset, out, *extra)) == 0
    rows = summary(out)
    for r in rows:
        assert int(r["val_images"]) == 9 and 0 < float(r["val_map@10"]) <= 1
        assert 0 < float(r["val_precision@10"]) <= 0.2  # 2 relevant of 10
    saved = json.loads((out / "args.json").read_text())
    loaded = load_checkpoint(out / "best.pt", fusion=False)
    meta = loaded.meta
    neck = saved["embedding_dim"] or None  # 0: no neck
    metric_loss = saved["loss"] != "ce"
    assert meta["model"] == {"neck_dim": neck, "num_classes": 0 if metric_loss else 3}
    assert meta["embedding_dim"] == loaded.model.dim == (neck or 1280)
    with torch.no_grad():
        v = loaded.model.eval().embed(torch.rand(2, 3, 32, 32))
    assert v.shape == (2, neck or 1280) and torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)
    if name == "seed":
        assert (saved["optimizer"], saved["lr"], saved["select_by"], saved["schedule"]) == (
            "adam", 1e-4, "loss", "constant")
        assert float(rows[0]["lr"]) == pytest.approx(1e-4)
    if name == "default":
        # the recipe measured in bench/results/quality.md: a change to it is a change of recipe, to be measured
        assert (saved["optimizer"], saved["lr"], saved["select_by"], saved["head_lr_mult"]) == (
            "adamw", 6e-4, "map", 10.0)
        assert (saved["loss"], saved["embedding_dim"], saved["augment"]) == ("p2sgrad", 512, "strong")
        best = max(rows, key=lambda r: float(r["val_map@10"]))
        assert best["best"] == "1"
    if metric_loss:
        last = torch.load(out / "last.pt", weights_only=True)
        assert last["criterion"], "the loss's class weights are kept for --resume"
    if name == "p2sgrad-sqrt":
        assert saved["sampler"] == "sqrt"

def test_resume_keeps_the_model_options(real_subset, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(args_for(real_subset, out, "--loss", "arcface", "--embedding-dim", "8")) == 0
    assert cli_main(["--resume", str(out), "--epochs", "2", "--workers", "0", "--log-level", "WARNING"]) == 0
    assert [r["epoch"] for r in summary(out)] == ["1", "2"]
    assert load_checkpoint(out / "last.pt").model.dim == 8
    assert cli_main(["--resume", str(out), "--epochs", "3", "--loss", "ce"]) == 2
    assert "--loss ce differs" in capsys.readouterr().err
    assert cli_main(["--resume", str(out), "--epochs", "3", "--embedding-dim", "16"]) == 2
    assert "--embedding-dim 16 differs" in capsys.readouterr().err


# ---------------------------------------------------------------- serving what the checkpoint says

def test_flip_tta_averages_the_mirror_and_changes_the_fingerprint(clothing_dir):
    image = sorted((clothing_dir / "val" / "hat").iterdir())[0].read_bytes()
    torch.manual_seed(0)
    loaded = load_model(backbone="efficientnet_lite0", weights="none")
    torch.manual_seed(0)  # the same random weights
    plain = Embedder(load_model(backbone="efficientnet_lite0", weights="none"), device="cpu", engine="torch")
    torch.manual_seed(0)
    flip = Embedder(load_model(backbone="efficientnet_lite0", weights="none"), device="cpu", engine="torch",
                    tta="flip")
    x = torch.stack([plain.decode(image)])
    with torch.no_grad():
        model = loaded.model.eval()
        expected = F.normalize(model.embed(x) + model.embed(x.flip(3)), dim=1)[0].numpy()
    np.testing.assert_allclose(flip.embed_images([image])[0], expected, atol=1e-5)
    assert flip.info.fingerprint != plain.info.fingerprint and flip.info.tta == "flip"
    assert plain.info.fingerprint == fingerprint(model, loaded.spec, "efficientnet_lite0")
    with pytest.raises(errors.InvalidArgument, match="test-time"):
        Embedder(load_model(backbone="efficientnet_lite0", weights="none"), device="cpu", tta="crop")


@pytest.mark.slow
def test_the_embedder_serves_a_neck_checkpoint_at_its_dimension(real_subset, tmp_path):
    out = tmp_path / "run"
    assert cli_main(args_for(real_subset, out, "--loss", "arcface", "--embedding-dim", "24",
                             "--fusion-weight", "0")) == 0  # the plain embedding
    best = out / "best.pt"
    loaded = load_checkpoint(best)
    image = sorted((real_subset / "val" / "shoes").iterdir())[0].read_bytes()
    with torch.no_grad():
        expected = loaded.model.eval().embed(load_tensor(image, loaded.spec).unsqueeze(0))[0].numpy()
    fingerprints = []
    for tta in ("none", "flip"):
        service = ServiceProcess("embedder_service", "--checkpoint", str(best), "--device", "cpu", "--tta", tta)
        try:
            with service.channel() as channel:
                stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
                info = stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=30)
                assert info.dim == 24 and info.input_size == 32
                vector = np.asarray(stub.Embed(embedder_pb2.EmbedRequest(image=image, name="s.jpg"),
                                               timeout=30).vector, np.float32)
                assert vector.shape == (24,)
                if tta == "none":
                    np.testing.assert_allclose(vector, expected, atol=2e-5)
                    assert info.fingerprint == fingerprint(loaded.model, loaded.spec, loaded.backbone)
                fingerprints.append(info.fingerprint)
        finally:
            service.terminate()
    assert fingerprints[0] != fingerprints[1]
