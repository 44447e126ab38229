"""Generate the Python gRPC stubs from the .proto files: ``python -m protos.generate`` (``make protos``).

The stubs are committed next to their .proto files (``protos/matchmap/v1/search_pb2.py`` ...);
tests/test_protos.py regenerates them into a temporary directory and fails if they drift.
Protos are compiled with the repository root as include path, so the generated imports read
``from protos.matchmap.v1 import search_pb2`` and resolve to this package (a bare ``matchmap``
would collide with the CLI package of the same name).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent


def proto_files() -> list[Path]:
    """Every .proto under protos/, sorted, as paths relative to the repository root."""
    return sorted(path.relative_to(REPO_ROOT) for path in PROTOS_DIR.rglob("*.proto"))


def generate(out_root: str | Path = REPO_ROOT) -> list[Path]:
    """Compile every .proto into ``*_pb2.py`` and ``*_pb2_grpc.py`` under ``out_root``.

    ``out_root`` mirrors the repository layout (``out_root/protos/matchmap/v1/...``); the default
    writes the committed stubs in place. Returns the generated files; raises RuntimeError naming
    the protoc exit status if compilation fails.
    """
    out_root = Path(out_root)
    protos = proto_files()
    well_known_types = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={REPO_ROOT}",
        f"--proto_path={well_known_types}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in protos),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status} compiling {[str(p) for p in protos]}")
    generated = []
    for proto in protos:
        stem = out_root / proto.parent / proto.stem
        generated += [Path(f"{stem}_pb2.py"), Path(f"{stem}_pb2_grpc.py")]
    return generated


def main() -> None:
    for path in generate():
        print(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


if __name__ == "__main__":
    main()
