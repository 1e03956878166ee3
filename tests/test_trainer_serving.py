"""A trainer checkpoint serves through the embedder: `python -m embedder_service
--checkpoint RUN_DIR/best.pt` (a real process) reports the checkpoint's model and
returns the same vectors as the model loaded in-process: the plain embedding at
fusion weight 0, else the fused unit vector (ImageNet features beside it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagesearch.model.checkpoint import load_checkpoint
from imagesearch.model.preprocessing import load_tensor
from testkit import ServiceProcess
from imagesearch.v1 import embedder_pb2, embedder_pb2_grpc
from tests.helpers import make_dataset
from tests.test_trainer import tiny_args
from trainer.__main__ import main as cli_main


@pytest.mark.slow
@pytest.mark.parametrize("weight, dim", [("0", 512), ("0.5", 1280 + 512)])
def test_best_checkpoint_serves_through_the_embedder(tmp_path, weight, dim):
    torch.set_num_threads(1)
    data = make_dataset(tmp_path / "data", bad_files=False)
    out = tmp_path / "run"
    assert cli_main(tiny_args(data, out, "--lr", "3e-3", "--fusion-weight", weight)) == 0
    best = out / "best.pt"
    loaded = load_checkpoint(best)
    loaded.model.eval()
    image = (data / "val" / "green" / "1.jpg").read_bytes()
    with torch.no_grad():
        expected = loaded.model.embed(load_tensor(image, loaded.spec).unsqueeze(0))[0].numpy()

    service = ServiceProcess("embedder_service", "--checkpoint", str(best), "--device", "cpu")
    try:
        with service.channel() as channel:
            stub = embedder_pb2_grpc.EmbedderServiceStub(channel)
            info = stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=30)
            assert info.backbone == "efficientnet_lite0" and info.dim == dim and info.input_size == 32
            assert list(info.class_names) == ["blue", "green", "red"]
            assert list(info.mean) == pytest.approx([0.5] * 3) and info.interpolation == "bicubic"
            reply = stub.Embed(embedder_pb2.EmbedRequest(image=image, name="1.jpg"), timeout=30)
            vector = np.asarray(reply.vector, dtype=np.float32)
            assert vector.shape == (dim,) and reply.fingerprint == info.fingerprint
            assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
            np.testing.assert_allclose(vector, expected, atol=2e-5)
    finally:
        service.terminate()
