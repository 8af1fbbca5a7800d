"""The demo's base and instruct stand-ins for seed 0, shipped with the package.

A user of the method downloads a base model and its instruct sibling; the demo has no hub, so it
trains small stand-ins for them (`finmerge pretrain` 1000 steps, TRL SFT 200 steps): two thirds of
`make demo`'s time, spent on models the method only consumes. The seed-0 stand-ins are shipped
instead, as trained by this code (each folder keeps its training_summary.json), and used only when
they were trained from exactly what this run would train them from: the same family settings, world
files and random initialisation (their sha256) and versions of the libraries that train them (the
`key` in standin.json). Anything else (another seed, other settings, another torch) trains
them as before, and so does `finmerge demo --train-standins`.

To refresh them after changing how the demo trains its family (settings, world, demo/family.py,
`finmerge pretrain`): `finmerge demo --train-standins`, then
`python -m finmerge.demo.standins demo-out` in the repository (writes demo/standins/seed-0).
"""

import hashlib
import json
import os
import shutil
import sys
from importlib import metadata, resources
from typing import Dict, List, Optional

from finmerge.safety.hashes import file_sha256

# What a stand-in folder holds: the checkpoint and tokenizer a downstream stage reads, and provenance.
FILES = {
    "base": ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "training_summary.json"],
    "instruct": ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "training_summary.json"],
}
TRAINING_LIBRARIES = ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers")
RECORD = "standin.json"
KEYS = "standin-key.json"  # in a demo's models/ folder: the key its stand-ins were made under, and how


def _version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _folder_digests(folder: str) -> List[tuple]:
    return sorted((name, file_sha256(os.path.join(folder, name))) for name in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, name)) and not name.startswith("."))


def standin_inputs(family: Dict, folders: Dict[str, str]) -> Dict:
    """What decides the trained stand-ins: the family settings, the content of `folders` (the world's
    files, the random initialisation) and the training libraries' versions; no absolute path in it
    (unlike a stage key), so it is the same in any output folder on any machine that draws the same."""
    return {"family": family, "files": {label: _folder_digests(folder) for label, folder in sorted(folders.items())},
            "libraries": {name: _version(name) for name in TRAINING_LIBRARIES}}


def standin_key(inputs: Dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def init_probe(init_folder: str) -> Dict[str, List[float]]:
    """Sum and sum of squares of each initial tensor (float64): what tells "another machine's random
    draw, equal up to rounding" (torch's vectorised normal_ differs by CPU) from "other init code"."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(init_folder, "model.safetensors"))
    return {name: [float(t.double().sum()), float(t.double().square().sum())] for name, t in sorted(tensors.items())}


def _shipped(seed: int):
    return resources.files("finmerge.demo") / "standins" / f"seed-{seed}"


def shipped_standin(role: str, seed: int, key: str) -> Optional[Dict]:
    """The shipped record for `role` if its key is `key` (so copying it equals training it), else None."""
    record = _shipped(seed) / role / RECORD
    if not record.is_file():
        return None
    data = json.loads(record.read_text(encoding="utf-8"))
    return data if data.get("key") == key else None


def copy_standin(role: str, seed: int, output: str) -> None:
    """Copy the shipped stand-in into `output` (already claimed by the stage), checking every file's sha256."""
    source = _shipped(seed) / role
    record = json.loads((source / RECORD).read_text(encoding="utf-8"))
    for name in FILES[role]:
        target = os.path.join(output, name)
        with resources.as_file(source / name) as path:
            shutil.copyfile(path, target)
        if file_sha256(target) != record["sha256"][name]:
            raise RuntimeError(f"shipped demo stand-in {role}/{name} does not match its recorded sha256: the "
                               "installation is damaged; reinstall finmerge or run `finmerge demo --train-standins`")


def write_standins(demo_out: str, repository: str, seed: int = 0) -> List[str]:
    """Developer tool: ship demo_out's trained base and instruct, with the key they were trained under."""
    with open(os.path.join(demo_out, "models", KEYS), encoding="utf-8") as handle:
        made = json.load(handle)
    if not made["trained"]:
        raise SystemExit(f"{demo_out}: its stand-ins were copied from the shipped ones, not trained; "
                         "run `finmerge demo --train-standins` first")
    written = []
    for role, names in FILES.items():
        source, target = os.path.join(demo_out, "models", role), os.path.join(repository, "demo", "standins", f"seed-{seed}", role)
        os.makedirs(target, exist_ok=True)
        for name in names:
            shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
        record = {"role": role, "seed": seed, "key": made["key"], "inputs": made["inputs"],
                  "init_probe": init_probe(os.path.join(demo_out, "models", "init")),
                  "sha256": {name: file_sha256(os.path.join(target, name)) for name in names}}
        with open(os.path.join(target, RECORD), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
            handle.write("\n")
        written.append(target)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m finmerge.demo.standins DEMO_OUT   (run from the repository root)")
    for folder in write_standins(sys.argv[1], os.getcwd()):
        print(f"wrote {folder}")
