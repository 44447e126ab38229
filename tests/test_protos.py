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


def _stub_versions() -> tuple[str, str]:
    """(grpcio, protobuf) versions the committed stubs refuse to import below."""
    import re

    stubs = REPO_ROOT / "protos" / "matchmap" / "v1"
    grpc_stub = (stubs / "search_pb2_grpc.py").read_text()
    grpc_version = re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'$", grpc_stub, re.M).group(1)
    pb2 = (stubs / "search_pb2.py").read_text()
    check = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
                      pb2)
    return grpc_version, ".".join(check.groups())


def _declared_floors() -> dict[str, tuple[str, str | None]]:
    """Each runtime dependency of pyproject.toml -> (its >= floor or == pin, its < ceiling or None)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        bounds = {s.operator: s.version for s in requirement.specifier}
        floors[requirement.name] = (bounds.get(">=", bounds.get("==")), bounds.get("<"))
    return floors


def test_pyproject_floors_are_the_versions_the_stubs_require():
    grpc_version, protobuf_version = _stub_versions()
    floors = _declared_floors()
    # grpcio-tools generated the stubs; health and reflection pin grpcio and protobuf themselves:
    # all four move together with the stubs.
    for name in ("grpcio", "grpcio-tools", "grpcio-health-checking", "grpcio-reflection"):
        assert floors[name][0] == grpc_version, (
            f"pyproject.toml says {name}>={floors[name][0]}, but search_pb2_grpc.py needs grpcio>={grpc_version}"
        )
    assert floors["protobuf"][0] == protobuf_version, (
        f"pyproject.toml says protobuf>={floors['protobuf'][0]}, but search_pb2.py needs protobuf>={protobuf_version}"
    )
    major = int(protobuf_version.split(".")[0])
    assert floors["protobuf"][1] == f"{major + 1}", f"protobuf needs the ceiling <{major + 1} (the stubs' major)"


def test_the_stub_generator_is_pinned_exactly():
    """Each grpcio-tools release stamps its version into the stubs: a floor would let CI install a newer
    one from PyPI whose fresh generation differs from the committed stubs (it did, with 1.85.4)."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    tools = next(Requirement(line) for line in project["dependencies"] if line.startswith("grpcio-tools"))
    assert [s.operator for s in tools.specifier] == ["=="], f"pin grpcio-tools exactly, not {tools.specifier}"


def test_installed_grpc_and_protobuf_satisfy_the_floors():
    from importlib.metadata import version

    from packaging.version import Version

    for name, (floor, ceiling) in _declared_floors().items():
        if name.startswith("grpcio") or name == "protobuf":
            assert Version(version(name)) >= Version(floor), f"installed {name} {version(name)} < {floor}"
            assert ceiling is None or Version(version(name)) < Version(ceiling)
