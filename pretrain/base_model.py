"""The base model: where its files are, what it is (by content), its dtype, and the checks made before training.

Identity by content: the run fingerprint holds the sha256 of every weight file and of config.json, so a
different checkpoint of the same shape (same file names and sizes) is a different run. Full hashes, not
a header and a sample: a sample can miss a fine-tune that changed few values. Hashing a 14B checkpoint
(~28 GB) means reading all of it (minutes; docs/pretrain.md), so the digests are cached in
OUT/run.json with each file's (size, mtime_ns, ctime_ns, inode), and shared in the process with
`finmerge reproduce`'s stage keys (finmerge.safety.hashes): a file is read once per version. For a hub
model, the files are the local Hugging Face cache snapshot, whose LFS blobs are named by their sha256:
that name is the digest, and the file is not read.
"""

import glob
import os
from typing import Any, Dict, List, Optional

from finmerge.safety.hashes import file_sha256, stat_key

from .config import PretrainConfig, PretrainError

POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
HEADER_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def local_folder(config: PretrainConfig) -> str:
    """The base model's folder on this machine: the path itself, or the hub model's cache snapshot (downloaded
    here if needed: from_pretrained would download the same files next)."""
    if os.path.isdir(config.model):
        return config.model
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
    if config.allow_pickle:
        patterns += ["*.bin", "*.bin.index.json"]
    try:
        return snapshot_download(config.model, allow_patterns=patterns)
    except Exception as error:  # offline without a cached copy, unknown repo, no access
        raise PretrainError(f"model {config.model}: not a local folder, and its files could not be found in or "
                            f"downloaded to the Hugging Face cache ({type(error).__name__}: {error}).") from None


def weight_files(folder: str) -> List[str]:
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")) + glob.glob(os.path.join(folder, "*.bin")))


def model_identity(folder: str, cached: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """{"identity": content digests (fingerprinted), "stat": the cache key of each digest (not fingerprinted)}.

    `cached` is the record of an earlier run in the same OUT: a file whose stat is unchanged keeps its digest."""
    cached = cached or {}
    known = {name: (stat, digest) for name, stat, digest in cached.get("stat", [])}
    files = weight_files(folder)
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        files.append(config_path)
    identity, stats = [], []
    for path in files:
        name, stat = os.path.basename(path), stat_key(path)
        previous = known.get(name)
        digest = previous[1] if previous and previous[0] == stat else file_sha256(path, stat)
        identity.append({"file": name, "size": stat[0], "sha256": digest})
        stats.append([name, stat, digest])
    return {"identity": identity, "stat": stats}


def load_model_config(config: PretrainConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise PretrainError(f"model {config.model} ships its own code; rerun with --trust-remote-code if you trust "
                                f"it (a config file cannot turn this on).") from None
        raise PretrainError(f"model {config.model}: {error}") from None
    except OSError as error:
        raise PretrainError(f"model {config.model}: cannot load its config.json ({error}).") from None


def check_weights_format(config: PretrainConfig, folder: str) -> None:
    """Refuse a base stored only as pickles before any data is read (unpickling can run code)."""
    if config.allow_pickle:
        return
    if not glob.glob(os.path.join(folder, "*.safetensors")):
        raise PretrainError(f"model {config.model} has no *.safetensors weights; pickled .bin weights are read only "
                            "with --allow-pickle (unpickling can run code). Or convert the checkpoint to safetensors.")


def check_seq_len(config: PretrainConfig, model_config) -> None:
    for name in POSITION_LIMITS:
        limit = getattr(model_config, name, None)
        if isinstance(limit, int) and limit > 0:
            if config.seq_len > limit:
                raise PretrainError(f"--seq-len {config.seq_len} is beyond the model's maximum: {config.model} has "
                                    f"{name}={limit}. Use --seq-len {limit} or less.")
            return


def checkpoint_dtype(folder: str, model_config) -> Optional[str]:
    """The base checkpoint's own dtype: its floating tensors' (safetensors header, no data read), else config.json's."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if files:
        from safetensors import safe_open

        with safe_open(files[0], framework="pt") as handle:
            for key in handle.keys():
                dtype = HEADER_DTYPES.get(str(handle.get_slice(key).get_dtype()))
                if dtype:
                    return dtype
    declared = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    name = str(declared).replace("torch.", "") if declared is not None else None
    return name if name in HEADER_DTYPES.values() else None
