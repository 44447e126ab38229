"""The committed gRPC stubs are exactly what the .proto files generate (no drift)."""

from __future__ import annotations

from protos.generate import REPO_ROOT, generate, proto_files


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "no stubs were generated: protos/ holds no .proto files"
    for path in fresh:
        committed = REPO_ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `python -m protos.generate` and commit it"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.relative_to(REPO_ROOT)} differs from what its .proto generates: "
            "run `python -m protos.generate` (or `make protos`) and commit the result"
        )


def test_search_service_exposes_the_four_rpcs():
    from protos.matchmap.v1 import search_pb2

    assert [p.as_posix() for p in proto_files()] == ["protos/matchmap/v1/search.proto"]
    service = search_pb2.DESCRIPTOR.services_by_name["SpokenImageSearch"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "Search": (False, False),
        "Localize": (False, False),
        "Highlight": (True, True),
        "ListCollections": (False, False),
    }
    assert search_pb2.DESCRIPTOR.package == "matchmap.v1"
