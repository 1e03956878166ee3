"""The contracts: fixed service/RPC names, importable generated code, and
committed code identical to what the pinned generator produces."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from imagesearch.v1 import common_pb2, embedder_pb2, embedder_pb2_grpc, ranker_pb2, ranker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "imagesearch" / "v1"  # generated code, in the shared core

EXPECTED = {
    "EmbedderService": {
        "Embed": (False, False),
        "EmbedStream": (True, True),
        "GetModelInfo": (False, False),
    },
    "RankerService": {
        "Upsert": (True, False),
        "Delete": (False, False),
        "Search": (False, True),
        "SearchStream": (True, True),
        "GetStats": (False, False),
        "CreateCollection": (False, False),
        "DropCollection": (False, False),
        "Backup": (False, True),
        "ListItems": (False, True),
        "Rename": (False, False),
        "CreateAlias": (False, False),
        "SwitchAlias": (False, False),
        "DropAlias": (False, False),
        "ListAliases": (False, False),
    },
}


def test_services_expose_exactly_the_fixed_rpcs():
    found = {}
    for module in (embedder_pb2, ranker_pb2):
        for name, service in module.DESCRIPTOR.services_by_name.items():
            assert service.full_name == f"imagesearch.v1.{name}"
            found[name] = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert found == EXPECTED


def test_one_request_and_one_response_message_per_rpc():
    seen = set()
    for module in (embedder_pb2, ranker_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                assert m.input_type.name == f"{m.name}Request"
                assert m.output_type.name == f"{m.name}Response"
                assert m.input_type.full_name not in seen and m.output_type.full_name not in seen
                seen |= {m.input_type.full_name, m.output_type.full_name}


def test_generated_stubs_and_servicers_exist():
    for module, service in ((embedder_pb2_grpc, "EmbedderService"), (ranker_pb2_grpc, "RankerService")):
        assert hasattr(module, f"{service}Stub")
        assert hasattr(module, f"{service}Servicer")
        assert hasattr(module, f"add_{service}Servicer_to_server")


def test_stream_items_carry_ids_and_errors():
    assert {"id", "embedding", "error"} <= set(embedder_pb2.EmbedStreamResponse.DESCRIPTOR.fields_by_name)
    assert {"id", "matches", "error"} <= set(ranker_pb2.SearchStreamResponse.DESCRIPTOR.fields_by_name)
    assert embedder_pb2.EmbedStreamResponse.DESCRIPTOR.fields_by_name["error"].message_type \
        is common_pb2.ItemError.DESCRIPTOR
    info_fields = set(embedder_pb2.GetModelInfoResponse.DESCRIPTOR.fields_by_name)
    assert {"backbone", "dim", "input_size", "mean", "std", "device", "fingerprint",
            "max_image_bytes", "max_image_pixels", "max_batch", "max_message_bytes"} <= info_fields


def test_item_attributes_filters_and_listing_fields():
    def fields(message):
        return message.DESCRIPTOR.fields_by_name

    attrs = fields(ranker_pb2.UpsertRequest)["attributes"]
    assert attrs.message_type.GetOptions().map_entry and attrs.number == 5
    assert fields(ranker_pb2.Match)["attributes"].message_type.GetOptions().map_entry
    for message in (ranker_pb2.SearchRequest, ranker_pb2.SearchStreamRequest, ranker_pb2.ListItemsRequest):
        assert fields(message)["filters"].message_type is ranker_pb2.AttributeFilter.DESCRIPTOR
    assert {"with_attributes"} <= set(fields(ranker_pb2.SearchRequest)) & set(fields(ranker_pb2.SearchStreamRequest))
    assert set(fields(ranker_pb2.AttributeFilter)) == {"key", "values"}
    assert {"collection", "page_size", "start_after", "limit", "with_vectors"} <= set(fields(ranker_pb2.ListItemsRequest))
    assert {"name", "attributes", "created_at", "updated_at", "fingerprint", "vector"} == set(fields(ranker_pb2.Item))
    assert set(fields(ranker_pb2.Renaming)) == {"from_name", "to_name"}
    assert {"renamed", "not_found"} == set(fields(ranker_pb2.RenameResponse))


def test_re_ranking_fields_are_additive_and_off_when_absent():
    """New fields only (numbers after the existing ones), each
    a message whose absence means off; alpha and lambda have presence, so 0 is
    a value, not the default."""
    def numbers(message):
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    for message in (ranker_pb2.SearchRequest, ranker_pb2.SearchStreamRequest):
        assert numbers(message)["query_expansion"] == 8 and numbers(message)["k_reciprocal"] == 9
        assert not message().HasField("query_expansion") and not message().HasField("k_reciprocal")
    assert numbers(ranker_pb2.IndexOptions)["dba"] == 11 and max(
        n for name, n in numbers(ranker_pb2.IndexOptions).items() if name != "dba") == 10
    assert numbers(ranker_pb2.QueryExpansion) == {"top_n": 1, "alpha": 2}
    # DBA was removed: its field and message stay, deprecated, with their numbers.
    assert numbers(ranker_pb2.DatabaseAugmentation) == {"top_n": 1, "alpha": 2}
    assert ranker_pb2.IndexOptions.DESCRIPTOR.fields_by_name["dba"].GetOptions().deprecated
    assert ranker_pb2.DatabaseAugmentation.DESCRIPTOR.GetOptions().deprecated
    assert numbers(ranker_pb2.KReciprocalRerank) == {"k1": 1, "k2": 2, "lambda": 3, "shortlist": 4}
    for message, field in ((ranker_pb2.QueryExpansion, "alpha"), (ranker_pb2.KReciprocalRerank, "lambda")):
        assert message.DESCRIPTOR.fields_by_name[field].has_presence
        assert message(**{field: 0.0}).HasField(field)


def test_package_is_imagesearch_v1():
    for module in (common_pb2, embedder_pb2, ranker_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        assert proto.package == "imagesearch.v1"
        assert module.DESCRIPTOR.name.startswith("imagesearch/v1/")


def test_committed_generated_code_matches_the_generator(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) is needed to regenerate")
    result = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    fresh = tmp_path / "imagesearch" / "v1"
    generated = sorted(p.name for p in fresh.glob("*_pb2*.py*"))
    committed = sorted(p.name for p in V1.glob("*_pb2*.py*"))
    assert generated == committed, "generated file set differs: run python protos/generate.py"
    match, mismatch, errors = filecmp.cmpfiles(fresh, V1, generated, shallow=False)
    assert not mismatch and not errors, (
        f"committed code differs from the .proto files for {mismatch + errors}: run python protos/generate.py")


def test_protos_hold_only_contracts_and_their_generator():
    runtime = [p.relative_to(ROOT).as_posix() for p in (ROOT / "protos").rglob("*.py") if p.name != "generate.py"]
    assert not runtime, f"runtime Python under protos/: {runtime}; it belongs in imagesearch/"


def test_buf_lint_passes():
    import shutil

    buf = shutil.which("buf") or str(Path(sys.executable).with_name("buf"))
    if not Path(buf).exists():
        pytest.skip("buf is not installed (pip install buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
