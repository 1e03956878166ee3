"""Generate the Python code for the contracts in protos/imagesearch/v1/.

The one way to (re)generate `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py`:

    python protos/generate.py            # writes imagesearch/v1/ at the repository root
    python protos/generate.py --out DIR  # writes into DIR/imagesearch/v1/

The proto path mirrors the Python import path (imagesearch/v1/x.proto ->
imagesearch.v1.x_pb2), so the generated imports need no patching. The
grpcio-tools version is pinned: different versions emit different code, and
tests/test_contracts.py regenerates and diffs against what is committed.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata, resources
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.85.1"  # keep equal to the dev pin in pyproject.toml

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent  # generated code lives in the shared core, imagesearch/v1/
PROTO_FILES = sorted((PROTO_ROOT / "imagesearch" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    installed = metadata.version("grpcio-tools")
    if installed != GRPCIO_TOOLS_VERSION:
        raise SystemExit(
            f"grpcio-tools {installed} is installed but the contracts are generated with "
            f"{GRPCIO_TOOLS_VERSION}: pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}"
        )
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in PROTO_FILES),
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    return sorted((out / "imagesearch" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: the repository root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
