"""The training options of issue 15, mechanics only (quality is bench/quality.py's job):
the recipes, retrieval-aware selection, the metric-learning losses, the
embedding neck, GeM pooling, weight EMA, and flip test-time augmentation in
the embedder. Runs use a tiny real subset of clothing-small (3 classes,
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
from imagesearch.model.backbones import GeM, fingerprint
from imagesearch.model.checkpoint import load_checkpoint, load_model, save_checkpoint
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

    model = build_model("efficientnet_lite0", "none", 0, neck_dim=8, pooling="gem")
    criterion = build_criterion("arcface", 3, model.dim)
    groups = recipes.parameter_groups(model, criterion, 1e-3, 10.0, 0.05)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.body.conv_stem.weight)]["lr"] == pytest.approx(1e-3)
    assert by_id[id(model.body.conv_stem.weight)]["weight_decay"] == 0.05
    assert by_id[id(model.body.bn1.weight)]["weight_decay"] == 0.0  # no decay on norms
    assert by_id[id(model.body.global_pool.p)]["lr"] == pytest.approx(1e-2)  # GeM's p is new
    assert by_id[id(model.neck[0].weight)]["lr"] == pytest.approx(1e-2)
    assert by_id[id(criterion.loss.W)]["lr"] == pytest.approx(1e-2)  # the loss's class weights train too
    seed = recipes.RECIPES["seed"]
    plain = build_model("efficientnet_lite0", "none", 3)
    one = recipes.parameter_groups(plain, build_criterion("ce", 3, plain.dim), seed["lr"], seed["head_lr_mult"],
                                   seed["weight_decay"])
    assert len(one) == 1 and len(one[0]["params"]) == len(list(plain.parameters()))


def test_ema_is_a_decay_or_a_span_of_the_run():
    assert recipes.parse_ema("0") == 0.0 and recipes.parse_ema("0.998") == 0.998
    assert recipes.parse_ema(" 25% ") == recipes.parse_ema("25.0%") == "25%"
    # A span is a time constant in steps, whatever the run's length: 25 % of 200 steps is 50.
    assert 1 / (1 - recipes.ema_decay("25%", 200)) == pytest.approx(50)
    assert 1 / (1 - recipes.ema_decay("25%", 4000)) == pytest.approx(1000)
    assert recipes.ema_decay("1%", 10) == 0.0  # never shorter than one step: the last weights
    assert recipes.ema_decay(0.998, 10) == 0.998
    for bad in ("1", "-0.1", "0%", "150%", "fast", "x%"):
        with pytest.raises(ValueError, match="--ema"):
            recipes.parse_ema(bad)


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
    kinds = {name: [type(t) for t in train_transform(spec, name).transforms] for name in ("strong", "light", "seed")}
    assert transforms.TrivialAugmentWide in kinds["strong"]
    assert kinds["light"] == [k for k in kinds["strong"] if k is not transforms.TrivialAugmentWide]
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
    assert training_settings(["--augment", "light"]) != default
    assert training_settings(["--out", "a", "--workers", "3", "--device", "cpu"]) == default  # where, not what
    # A run saved before --augment and with None for "no neck": read as what it meant then.
    old = {k: v for k, v in ce.items() if k != "augment"} | {"embedding_dim": None, "label_smoothing": 0.0}
    assert training_settings(saved=old) == ce
    assert training_settings(saved={**old, "recipe": "seed"})["augment"] == "seed"


def test_the_input_size_is_the_backbones_own_except_in_the_seed_recipe():
    from trainer.train import training_settings

    assert training_settings([])["image_size"] == 224  # Lite0
    assert training_settings(["--backbone", "efficientnet_lite2"])["image_size"] == 260
    assert training_settings(["--backbone", "efficientnet_b4"])["image_size"] == 380
    assert training_settings(["--backbone", "efficientnet_b4", "--recipe", "seed"])["image_size"] == 224
    assert training_settings(["--backbone", "efficientnet_b4", "--image-size", "300"])["image_size"] == 300
    assert training_settings(["--image-size", "224"]) == training_settings([])


def test_subcenter_arcface_scores_a_class_by_its_nearest_centre():
    from trainer.losses import SUB_CENTERS, build_criterion

    criterion = build_criterion("subcenter_arcface", 4, 8)
    weights = criterion.class_weights()
    assert weights.shape == (4 * SUB_CENTERS, 8)
    # An embedding on class 2's last centre scores 1 for class 2, whatever its other centres are.
    x = weights[2 * SUB_CENTERS + SUB_CENTERS - 1].detach().unsqueeze(0) * 5
    scores = criterion.logits(x)
    assert scores.shape == (1, 4) and scores.argmax().item() == 2
    assert scores[0, 2].item() == pytest.approx(1.0, abs=1e-5)
    loss = criterion(torch.randn(6, 8, requires_grad=True), torch.tensor([0, 1, 2, 3, 0, 1]))
    loss.backward()
    assert criterion.loss.W.grad is not None and torch.isfinite(loss)


def test_adacos_scale_starts_from_the_number_of_classes_and_grows_as_classes_separate():
    from trainer.losses import adacos_initial_scale, adacos_scale, build_criterion

    assert adacos_initial_scale(10) == pytest.approx(2 ** 0.5 * np.log(9))
    assert adacos_initial_scale(81) > adacos_initial_scale(10)
    criterion = build_criterion("adacos", 4, 8)
    assert float(criterion.scale) == pytest.approx(adacos_initial_scale(4))
    targets = torch.tensor([0, 1, 2, 3])
    # Each embedding at 60 degrees from its class and 90 from the others: the median target
    # angle is capped at 45 degrees, B = 3 exp(0) = 3, so the scale is ln 3 / cos 45.
    cosines = torch.where(F.one_hot(targets, 4).bool(), torch.tensor(0.5), torch.tensor(0.0))
    assert adacos_scale(cosines, targets, 7.0) == pytest.approx(np.log(3) / np.cos(np.pi / 4), rel=1e-5)
    # Closer to their classes (20 degrees): the scale follows the median angle up.
    cosines = torch.where(F.one_hot(targets, 4).bool(), torch.tensor(np.cos(np.radians(20))), torch.tensor(0.0))
    assert adacos_scale(cosines, targets, 7.0) == pytest.approx(np.log(3) / np.cos(np.radians(20)), rel=1e-4)
    # A training step moves the stored scale (kept in the state dict for --resume); evaluation does not.
    x = criterion.class_weights().detach()[targets] * 3 + 0.01 * torch.randn(4, 8)
    before = float(criterion.scale)
    criterion.train()
    criterion(x, targets).backward()
    moved = float(criterion.scale)
    assert moved != pytest.approx(before) and "scale" in criterion.state_dict()
    criterion.eval()
    criterion(torch.randn(4, 8), targets)
    assert float(criterion.scale) == moved and criterion.loss.scale == pytest.approx(moved)


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


@pytest.mark.parametrize("loss", ["arcface", "subcenter_arcface", "proxy_anchor", "p2sgrad", "adacos"])
def test_imprinting_points_each_class_weight_at_its_class_mean(real_subset, loss):
    from imagesearch.model.backbones import build_model
    from imagesearch.model.preprocessing import PreprocessSpec, decode_image, eval_transform
    from trainer.data import check_layout
    from trainer.imprint import PER_CLASS, imprint, pick
    from trainer.losses import build_criterion

    layout = check_layout(str(real_subset))
    spec = PreprocessSpec(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", "none", 0, neck_dim=8).train()
    criterion = build_criterion(loss, 3, 8)
    lengths = criterion.class_weights().detach().norm(dim=1).clone()
    done = imprint(model, criterion, layout.train.samples, spec, 3, torch.device("cpu"), seed=1, per_class=4)
    assert done["images"] == 12 and done["per_class"] == 4 and 0 <= done["accuracy"] <= 1
    assert model.training, "imprinting leaves the model in the mode it found it"
    # The class means of the chosen images' served embeddings (eval mode: the neck's new statistics).
    chosen = pick(layout.train.samples, 4, seed=1)
    x = torch.stack([eval_transform(spec)(decode_image(Path(p).read_bytes(), reduce_to=spec.decode_size))
                     for p, _ in chosen])
    targets = torch.tensor([t for _, t in chosen])
    with torch.no_grad():
        unit = model.eval().embed(x)
        z = model.neck[0](model.body(x))
    torch.testing.assert_close(model.neck[1].running_mean, z.mean(0), atol=1e-5, rtol=1e-4)
    means = F.normalize(torch.stack([unit[targets == c].mean(0) for c in range(3)]), dim=1)
    weights = criterion.class_weights().detach()
    centres = weights.shape[0] // 3
    cos = F.normalize(weights, dim=1) @ means.t()
    for c in range(3):
        for k in range(centres):
            assert cos[c * centres + k, c].item() > (0.98 if centres > 1 else 0.9999)
    if centres > 1:  # sub-centres start near their mean, not on one point
        assert not torch.allclose(weights[0], weights[1])
    torch.testing.assert_close(weights.norm(dim=1), lengths, rtol=1e-4, atol=1e-5)
    assert PER_CLASS >= 4


def test_imprinting_draws_a_seeded_subset_of_each_class():
    from trainer.imprint import pick

    samples = [(f"{c}{i}", c) for c in range(3) for i in range(10 if c else 2)]
    one = pick(samples, 4, seed=3)
    assert [t for _, t in one].count(0) == 2 and [t for _, t in one].count(1) == 4
    assert one == pick(samples, 4, seed=3) and one != pick(samples, 4, seed=4)
    assert one == sorted(one, key=samples.index)


def test_imprinting_a_cross_entropy_head_is_refused(tmp_path, capsys):
    data = tmp_path / "nodata"
    data.mkdir()
    assert cli_main(args_for(data, tmp_path / "run", "--loss", "ce", "--head-init", "imprint")) == 2
    assert "--head-init imprint" in capsys.readouterr().err


def test_gem_with_p_1_is_average_pooling():
    x = torch.rand(2, 5, 4, 4)
    gem = GeM(p=1.0)
    torch.testing.assert_close(gem(x), x.mean(dim=(2, 3)))
    assert (GeM()(x) >= x.mean(dim=(2, 3)) - 1e-6).all()  # p = 3 leans to the larger values


@pytest.mark.parametrize("extra, message", [
    (["--label-smoothing", "1.5"], "--label-smoothing 1.5"),
    (["--embedding-dim", "-1"], "--embedding-dim -1"),
    (["--head-lr-mult", "0"], "--head-lr-mult 0"),
    (["--ema", "1"], "--ema 1"),
    (["--ema", "150%"], "--ema 150%"),
    (["--distill-weight", "0"], "--distill-weight 0"),
    (["--distill-weight", "nan"], "--distill-weight nan"),
])
def test_bad_recipe_numbers_are_exit_2(tmp_path, capsys, extra, message):
    data = tmp_path / "nodata"
    data.mkdir()
    assert cli_main(args_for(data, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- whole runs on real photos

@pytest.mark.parametrize("name, extra", [
    ("seed", ["--recipe", "seed"]),
    ("default", []),
    ("ce-pooled", ["--loss", "ce", "--embedding-dim", "0"]),
    ("arcface-neck", ["--loss", "arcface", "--embedding-dim", "16"]),
    ("subcenter-arcface", ["--loss", "subcenter_arcface", "--embedding-dim", "16"]),
    ("proxy-anchor-gem", ["--loss", "proxy_anchor", "--embedding-dim", "16", "--pooling", "gem"]),
    ("p2sgrad", ["--loss", "p2sgrad", "--embedding-dim", "16"]),
    ("adacos", ["--loss", "adacos", "--embedding-dim", "16"]),
    ("imprint", ["--head-init", "imprint", "--embedding-dim", "16"]),
    ("gem", ["--pooling", "gem"]),
    ("ema", ["--ema", "0.5", "--epochs", "2", "--select-by", "loss"]),
    ("ema-span", ["--ema", "50%", "--epochs", "2", "--select-by", "loss", "--sampler", "sqrt"]),
])
def test_each_option_trains_and_its_checkpoint_rebuilds_the_model(real_subset, tmp_path, monkeypatch, name, extra):
    out = tmp_path / name
    assert cli_main(args_for(real_subset, out, *extra)) == 0
    rows = summary(out)
    for r in rows:
        assert int(r["val_images"]) == 9 and 0 < float(r["val_map@10"]) <= 1
        assert 0 < float(r["val_precision@10"]) <= 0.2  # 2 relevant of 10
    saved = json.loads((out / "args.json").read_text())
    loaded = load_checkpoint(out / "best.pt")
    meta = loaded.meta
    neck = saved["embedding_dim"] or None  # 0: no neck
    metric_loss = saved["loss"] != "ce"
    assert meta["model"] == {"pooling": "gem" if "gem" in extra else "avg", "neck_dim": neck,
                             "num_classes": 0 if metric_loss else 3}
    assert meta["embedding_dim"] == loaded.model.dim == (neck or 1280)
    with torch.no_grad():
        v = loaded.model.eval().embed(torch.rand(2, 3, 32, 32))
    assert v.shape == (2, neck or 1280) and torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)
    if name == "seed":
        assert (saved["optimizer"], saved["lr"], saved["select_by"], saved["schedule"]) == (
            "adam", 1e-4, "loss", "constant")
        assert float(rows[0]["lr"]) == pytest.approx(1e-4)
    if name == "default":
        # the peak run I chose (bench/README.md): a change to it is a change of recipe, to be measured
        assert (saved["optimizer"], saved["lr"], saved["select_by"], saved["head_lr_mult"]) == (
            "adamw", 6e-4, "map", 10.0)
        assert (saved["loss"], saved["embedding_dim"], saved["augment"]) == ("p2sgrad", 512, "strong")
        best = max(rows, key=lambda r: float(r["val_map@10"]))
        assert best["best"] == "1"
    if metric_loss:
        last = torch.load(out / "last.pt", weights_only=True)
        assert last["criterion"], "the loss's class weights are kept for --resume"
    if name == "imprint":
        assert saved["head_init"] == "imprint" and saved["resolved"]["imprinted"]["images"] == 6 * 3
        # A resume keeps its trained weights (no second imprint over them) and the record of
        # how the run started.
        import trainer.train as train_module
        calls = []
        real = train_module.imprint
        monkeypatch.setattr(train_module, "imprint", lambda *a, **k: calls.append(1) or real(*a, **k))
        assert cli_main(["--resume", str(out), "--epochs", "2", "--workers", "0", "--log-level", "WARNING"]) == 0
        assert calls == [] and [r["epoch"] for r in summary(out)] == ["1", "2"]
        resumed = json.loads((out / "args.json").read_text())
        assert resumed["resolved"]["imprinted"] == saved["resolved"]["imprinted"]
    if name == "adacos":  # the scale the batches set is kept with the class weights
        last = torch.load(out / "last.pt", weights_only=True)
        assert float(last["criterion"]["scale"]) > 0
    if name == "ema-span":  # a time constant of half the run's steps
        steps = 2 * saved["resolved"]["steps_per_epoch"]
        assert saved["ema"] == "50%" and 1 / (1 - saved["resolved"]["ema_decay"]) == pytest.approx(steps / 2)
        assert saved["sampler"] == "sqrt"
    if name == "ema":
        last = torch.load(out / "last.pt", weights_only=True)
        best = torch.load(out / "best.pt", weights_only=True)
        assert "ema" in last and best["meta"]["epoch"] == int(max(rows, key=lambda r: r["best"])["epoch"])
        if best["meta"]["epoch"] == 2:  # best.pt holds the average, last.pt the raw weights
            assert any(not torch.equal(best["state_dict"][k], v) for k, v in last["state_dict"].items()
                       if k.endswith("weight"))


def test_resume_keeps_the_model_options(real_subset, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(args_for(real_subset, out, "--loss", "arcface", "--embedding-dim", "8")) == 0
    assert cli_main(["--resume", str(out), "--epochs", "2", "--workers", "0", "--log-level", "WARNING"]) == 0
    assert [r["epoch"] for r in summary(out)] == ["1", "2"]
    assert load_checkpoint(out / "last.pt").model.dim == 8
    assert cli_main(["--resume", str(out), "--epochs", "3", "--loss", "ce"]) == 2
    assert "--loss ce differs" in capsys.readouterr().err
    assert cli_main(["--resume", str(out), "--epochs", "3", "--head-init", "imprint"]) == 2
    assert "--head-init imprint differs" in capsys.readouterr().err


def test_a_checkpoint_from_before_the_options_still_loads(tmp_path):
    from imagesearch.model.backbones import EmbeddingNet
    from imagesearch.model.preprocessing import PreprocessSpec

    model = EmbeddingNet("efficientnet_lite0", num_classes=3)
    meta = {"backbone": "efficientnet_lite0", "class_names": ["a", "b", "c"], "embedding_dim": 1280, "epoch": 1,
            "preprocess": PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3).to_dict()}  # no "model" entry
    save_checkpoint(tmp_path / "old.pt", model, meta)
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded.model.dim == 1280 and loaded.model.pooling == "avg" and loaded.model.num_classes == 3


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
    assert cli_main(args_for(real_subset, out, "--loss", "proxy_anchor", "--embedding-dim", "24",
                             "--pooling", "gem")) == 0
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


# ---------------------------------------------------------------- distillation (trainer.distill)

def _teacher(path: Path, *, size: int = 40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), neck: int = 8) -> Path:
    """A checkpoint of random Lite0 weights with its own input size and normalisation."""
    from imagesearch.model.backbones import EmbeddingNet
    from imagesearch.model.preprocessing import PreprocessSpec

    torch.manual_seed(3)
    model = EmbeddingNet("efficientnet_lite0", num_classes=0, neck_dim=neck)
    meta = {"backbone": "efficientnet_lite0", "class_names": list(CLASSES), "embedding_dim": neck, "epoch": 1,
            "model": model.options(), "preprocess": PreprocessSpec(size, mean, std).to_dict()}
    save_checkpoint(path, model, meta)
    return path


def test_relational_loss_compares_cosines_not_axes_and_teaches_only_the_student():
    from trainer.distill import relational_loss

    torch.manual_seed(0)
    teacher = F.normalize(torch.randn(6, 8), dim=1)
    rotation = torch.linalg.qr(torch.randn(12, 12))[0]
    # the same cosines in another space, of another dimension and scale: nothing to learn
    same = 5 * F.pad(teacher, (0, 4)) @ rotation
    assert relational_loss(same, teacher).item() == pytest.approx(0, abs=1e-10)
    student = torch.randn(6, 12, requires_grad=True)
    teacher.requires_grad_(True)
    loss = relational_loss(student, teacher)
    assert loss.item() > 0.05
    loss.backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    s, t = F.normalize(student.detach(), dim=1), teacher.detach()
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    expected = sum(((s[i] @ s[j]) - (t[i] @ t[j])) ** 2 for i, j in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert relational_loss(student[:1], teacher[:1]).item() == 0  # one image: no pair


def test_the_teacher_sees_the_student_batch_in_its_own_preprocessing(tmp_path):
    from imagesearch.model.preprocessing import PreprocessSpec
    from trainer.distill import Teacher

    student = PreprocessSpec(32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    teacher = Teacher(_teacher(tmp_path / "t.pt", size=40), student)
    raw = torch.rand(2, 3, 32, 32)  # pixels in [0, 1]
    batch = (raw - torch.tensor(student.mean).view(1, 3, 1, 1)) / torch.tensor(student.std).view(1, 3, 1, 1)
    own = (raw - torch.tensor((0.5, 0.4, 0.3)).view(1, 3, 1, 1)) / torch.tensor((0.2, 0.25, 0.3)).view(1, 3, 1, 1)
    own = F.interpolate(own, size=(40, 40), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        expected = teacher.model.eval().embed(own)
    got = teacher(batch)
    assert got.shape == (2, 8) and not got.requires_grad
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    teacher.train()
    assert not teacher.model.training  # its BatchNorm statistics stay the trained ones
    assert not any(p.requires_grad for p in teacher.parameters())


def test_distillation_trains_and_a_resume_keeps_its_teacher(real_subset, tmp_path, monkeypatch, capsys):
    import trainer.train as train_module
    from trainer.train import training_settings

    teacher = _teacher(tmp_path / "teacher.pt")
    calls = []
    real = train_module.relational_loss
    monkeypatch.setattr(train_module, "relational_loss", lambda s, t: calls.append(t.shape) or real(s, t))
    out = tmp_path / "student"
    monkeypatch.chdir(tmp_path)
    assert cli_main(args_for(real_subset, out, "--embedding-dim", "16", "--distill-from", "teacher.pt",
                             "--distill-weight", "2")) == 0
    assert calls == [(6, 8)] * 3  # every step of 18 images in batches of 6, the teacher's 8-d vectors
    saved = json.loads((out / "args.json").read_text())
    assert saved["distill_from"] == str(teacher.resolve()) and saved["distill_weight"] == 2
    assert load_checkpoint(out / "best.pt").model.dim == 16  # the student serves alone
    # The resumed run goes on with its teacher, however the path is spelled
    calls.clear()
    assert cli_main(["--resume", str(out), "--epochs", "2", "--workers", "0", "--distill-from",
                     str(teacher), "--log-level", "WARNING"]) == 0
    assert len(calls) == 3 and [r["epoch"] for r in summary(out)] == ["1", "2"]
    assert cli_main(["--resume", str(out), "--epochs", "3", "--distill-from", str(_teacher(tmp_path / "other.pt"))]) == 2
    assert "differs from the resumed run's" in capsys.readouterr().err
    teacher.rename(tmp_path / "moved.pt")
    assert cli_main(["--resume", str(out), "--epochs", "3"]) == 2
    assert f"the resumed run was distilled from {teacher.resolve()}, which is no longer there" in (
        capsys.readouterr().err)
    # What a run trains names its teacher; a run without one has no weight for it
    with_teacher = training_settings(["--distill-from", "teacher.pt"])
    assert with_teacher["distill_from"] == str(teacher.resolve()) and with_teacher["distill_weight"] == 1.0
    assert with_teacher == training_settings(["--distill-from", str(teacher)])
    assert training_settings([])["distill_weight"] is None
    assert training_settings(["--distill-weight", "3"]) == training_settings([])


def test_distilling_into_a_cross_entropy_head_is_refused(tmp_path, capsys):
    data = tmp_path / "nodata"
    data.mkdir()
    teacher = str(_teacher(tmp_path / "t.pt"))
    assert cli_main(args_for(data, tmp_path / "run", "--distill-from", teacher, "--loss", "ce")) == 2
    assert "--loss ce trains a classifier head" in capsys.readouterr().err


def test_a_missing_teacher_is_exit_2_before_any_model_is_built(real_subset, tmp_path, capsys, monkeypatch):
    import trainer.train as train_module

    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: pytest.fail("built a model first"))
    assert cli_main(args_for(real_subset, tmp_path / "run", "--distill-from", str(tmp_path / "nope.pt"))) == 2
    assert f"--distill-from {tmp_path / 'nope.pt'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
