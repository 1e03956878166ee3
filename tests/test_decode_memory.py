"""Decoding memory at the pixel limit: a float32 TIFF of 7070x7070 (50 Mpx,
a few hundred KB deflated; issue 11 found it cost 1.5 GB through float64
copies) must peak at no more than 8 bytes a pixel above the process before
the call: the decoded 4-byte-a-pixel image plus one such copy
(docs/embedder.md). Measured in a child process by its peak resident
anonymous memory, sampled every millisecond (here: about 5.5 bytes a pixel;
26.8 before the fix)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imagesearch.defaults import MAX_IMAGE_PIXELS
from testkit import ROOT

SIDE = int(MAX_IMAGE_PIXELS ** 0.5)  # 7071 -> 49,999,041 pixels: at the limit
BYTES_PER_PIXEL = 8
SLACK = 64 * 1024 * 1024  # allocator and library noise

MAKE = """
import sys, numpy as np
from PIL import Image
side = int(sys.argv[2])
a = np.zeros((side, side), np.float32)
a[::50] = 0.75  # a grid: about 1 MB deflated
a[:, ::50] = 0.25
Image.fromarray(a, "F").save(sys.argv[1], "TIFF", compression="tiff_deflate")
"""

MEASURE = """
import sys, threading, time
from imagesearch.model.backbones import BACKBONES
from imagesearch.model.preprocessing import load_tensor
spec = BACKBONES["efficientnet_lite0"].preprocess
data = open(sys.argv[1], "rb").read()

def anon():  # resident anonymous memory: file-backed library pages that a busy machine reclaims do not count
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak = before = anon()
done = False

def sample():
    global peak
    while not done:
        peak = max(peak, anon())
        time.sleep(0.001)

sys.setswitchinterval(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
tensor = load_tensor(data, spec)
done = True
sampler.join()
print(len(data), before, peak, tuple(tensor.shape))
"""


@pytest.mark.slow
def test_a_float32_tiff_at_the_pixel_limit_costs_at_most_8_bytes_a_pixel(tmp_path):
    path = tmp_path / "float.tif"
    subprocess.run([sys.executable, "-c", MAKE, str(path), str(SIDE)], check=True, timeout=300)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], cwd=ROOT, check=True, timeout=300,
                         capture_output=True, text=True).stdout.split()
    size, before, peak = int(out[0]), int(out[1]), int(out[2])
    pixels = SIDE * SIDE
    assert pixels <= MAX_IMAGE_PIXELS and size < 2_000_000
    growth = peak - before
    assert growth <= BYTES_PER_PIXEL * pixels + SLACK, (
        f"decoding {pixels:,} float32 pixels grew RSS by {growth / 2**20:.0f} MB "
        f"({growth / pixels:.1f} bytes a pixel; the limit is {BYTES_PER_PIXEL})")
    assert growth >= 4 * pixels  # the measurement sees at least the decoded image itself
