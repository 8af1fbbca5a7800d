"""One digest cache for stage keys and the pretrain fingerprint: each version of a file is read once."""

import builtins
import os
import shutil

import pytest


@pytest.fixture
def count_reads(monkeypatch):
    """{real path: times opened for reading bytes}, for every file opened from now on."""
    reads = {}
    real_open = builtins.open

    def counting(file, mode="r", *args, **kwargs):
        if "b" in mode and "r" in mode and isinstance(file, (str, os.PathLike)):
            path = os.path.realpath(file)
            reads[path] = reads.get(path, 0) + 1
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting)
    return reads


def test_reproduce_reads_the_base_weights_once_for_its_stage_key_and_the_pretrain_fingerprint(tiny_family, tmp_path,
                                                                                              count_reads):
    """What a first `finmerge reproduce` with a pretrain stage does: the stage key hashes the base, then the
    pretraining fingerprints the same base (pretrain.train calls model_identity)."""
    from finmerge.pretrain.base_model import model_identity
    from finmerge.reproduce.stages import Stages

    base = tmp_path / "base"
    shutil.copytree(tiny_family.base, base)  # a version of the weights no earlier test hashed
    weights = os.path.realpath(base / "model.safetensors")
    Stages(str(tmp_path / "work"), log=lambda m: None).key({"pretrain": {}}, [str(base)])
    identity = model_identity(str(base))
    assert count_reads[weights] == 1
    assert {row["file"] for row in identity["identity"]} == {"model.safetensors", "config.json"}


def test_a_new_version_of_the_weights_is_read_again(tiny_family, tmp_path, count_reads):
    from finmerge.pretrain.base_model import model_identity

    base = tmp_path / "base"
    shutil.copytree(tiny_family.base, base)
    weights = base / "model.safetensors"
    first = model_identity(str(base))["identity"]
    data = weights.read_bytes()
    stat = os.stat(weights)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, same mtime, new content
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = model_identity(str(base))["identity"]
    assert count_reads[os.path.realpath(weights)] == 2
    assert [r["sha256"] for r in first if r["file"] == "model.safetensors"] != \
           [r["sha256"] for r in second if r["file"] == "model.safetensors"]


def test_the_digest_is_the_sha256_of_the_content(tmp_path):
    import hashlib

    from finmerge.safety.hashes import file_sha256

    path = tmp_path / "f.bin"
    path.write_bytes(b"finmerge" * 1000)
    assert file_sha256(str(path)) == hashlib.sha256(b"finmerge" * 1000).hexdigest()
