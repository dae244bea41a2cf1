"""The generated wire code must match what scripts/gen_proto.py produces from the .proto."""
from __future__ import annotations

import importlib.util

from tests.conftest import ROOT


def test_generated_code_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    written = mod.generate(tmp_path)
    assert written, "protoc produced nothing"
    for fresh in written:
        rel = fresh.relative_to(tmp_path)
        committed = ROOT / "proto" / rel
        assert committed.exists(), f"{rel} is not committed; run scripts/gen_proto.py"
        assert committed.read_bytes() == fresh.read_bytes(), f"{rel} is stale; run scripts/gen_proto.py"


def test_package_and_enum_zero_values():
    from caprouter.v1 import router_pb2 as pb

    assert pb.DESCRIPTOR.package == "caprouter.v1"
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
    # Every response carries the metadata block.
    for name in ("RouteResponse", "GenerateChunk", "FeedbackResponse", "ListBackendsResponse"):
        assert "metadata" in pb.DESCRIPTOR.message_types_by_name[name].fields_by_name, name
