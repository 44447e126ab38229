"""Fixtures shared by the whole test suite."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from encoders import create_model, save_checkpoint
from training.synth import synthesize_corpus

TINY_TRAIN_PAIRS = 24
TINY_VAL_PAIRS = 12


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spoken-scenes corpus of 24 train + 12 val pairs (seed 0), generated once per test session.

    Returns the directory holding train.json, val.json, images/ and audio/. Treat it as read-only:
    other tests share it.
    """
    out = tmp_path_factory.mktemp("tiny_corpus")
    synthesize_corpus(out, pairs=TINY_TRAIN_PAIRS, val_pairs=TINY_VAL_PAIRS, seed=0, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialized ``tiny`` model (seed 0) saved as a checkpoint: real files, random weights.

    Tests of plumbing (indexing, serving, streaming) use it so they never depend on the shipped model.
    """
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, create_model("tiny"))
    return path


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """(certificate, private key): a self-signed PEM pair for ``localhost``, made with openssl."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of two nodes, a head and a worker with one CPU each (ray.cluster_utils.Cluster),
    shared by the Ray tests (tests/test_ray_*.py): Ray work placed one per CPU lands on both nodes."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    object_store = 150 * 1024 * 1024
    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": object_store, "include_dashboard": False},
    )
    nodes.add_node(num_cpus=1, object_store_memory=object_store)
    nodes.wait_for_nodes()
    try:
        yield nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        nodes.shutdown()


SCENES = "scenes"  # the collection scenes_data_dir holds


@pytest.fixture(scope="session")
def scene_files(tiny_corpus) -> tuple[list[str], list[Path]]:
    """The tiny corpus's images (train and val, sorted paths) and its val captions' wavs."""
    from training.manifest import load_manifest

    manifests = [load_manifest(tiny_corpus / name) for name in ("train.json", "val.json")]
    return (sorted({str(m.image_path(e)) for m in manifests for e in m.entries}),
            [manifests[1].audio_path(e) for e in manifests[1].entries])


@pytest.fixture(scope="session")
def scenes_data_dir(scene_files, checkpoint, tmp_path_factory) -> Path:
    """A data dir whose collection SCENES holds scene_files' images, indexed with ``checkpoint``. Read-only."""
    from indexer import Library

    folder = tmp_path_factory.mktemp("scenes-library")
    with Library.open(folder, create=True) as library:
        library.index(SCENES, scene_files[0], create_model(checkpoint), progress=False)
    return folder
