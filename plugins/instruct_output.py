"""Make a merge's output folder a working instruct model.

mergekit copies tokenizer, chat template, generation config and the eos id from the BASE model: the
result would not know how to format a chat or when an assistant turn ends. This puts the instruct
model's back, after mergekit has written the weights.
"""

import filecmp
import glob
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mergekit.config import MergeConfiguration

from finmerge.plugins.input_changes import check_unchanged
from finmerge.plugins.preflight import MergeInputs
from finmerge.safety.outputs import atomic_write_json

LOG = logging.getLogger(__name__)

# What an HF tokenizer (fast, slow or remote-code) and its chat template are made of.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)
TOKENIZER_PATTERNS = ("*.tiktoken", "additional_chat_templates/*.jinja")
SPECIAL_TOKEN_FIELDS = ("eos_token_id", "pad_token_id", "bos_token_id")


def _tokenizer_files(folder: str) -> List[str]:
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
    for pattern in TOKENIZER_PATTERNS:
        names += [os.path.relpath(p, folder) for p in glob.glob(os.path.join(folder, pattern))]
    return names


# Files a model's own code never needs copied beside it: weights (big, and written by mergekit).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".index.json")


def _auto_map_modules(auto_map: Dict[str, Any]) -> List[str]:
    """`module.py` of each class an auto_map names ("repo--module.Class" lives in another repository)."""
    modules = set()
    for target in auto_map.values():
        for ref in target if isinstance(target, list) else [target]:
            if isinstance(ref, str) and ref and "--" not in ref:
                modules.add(ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return sorted(modules)


def _string_constants(path: str) -> List[str]:
    """String literals of a Python file, found by parsing it (never importing it)."""
    import ast

    try:
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def remote_code_files(folder: str, auto_map: Dict[str, Any]) -> List[str]:
    """Every file the code named in `auto_map` needs from `folder`, as names relative to it.

    The auto_map modules; recursively, the files they import relatively (`from .x import y`), found
    by transformers' own parser, the one its loader uses; and files beside them that the code refers
    to by name (kernel sources such as Qwen-v1's cache_autogptq_cuda_256.cpp, which cpp_kernels.py
    looks for next to itself): a non-Python, non-weight file at the top of `folder` whose name is a
    path component of a string literal in one of those Python files. Nothing is imported or run.
    """
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = os.path.abspath(folder)
    python = []
    for module in _auto_map_modules(auto_map):
        path = os.path.join(folder, module)
        if not _inside(path, folder):
            LOG.warning("%s names %s in auto_map, which is not a file in the folder; it is not copied", folder, module)
            continue
        if not os.path.isfile(path):
            LOG.warning("%s names %s in auto_map, which is not in the folder; it is not copied", folder, module)
            continue
        python.append(path)
        for needed in get_relative_import_files(path):
            if os.path.isfile(needed) and _inside(needed, folder):
                python.append(needed)
            else:
                LOG.warning("%s imports %s, which is not in %s; it is not copied", module, os.path.basename(needed), folder)
    names = {os.path.relpath(p, folder) for p in python}
    referenced = {part for p in python for text in _string_constants(p) for part in re.split(r"[\\/]", text)}
    for entry in os.listdir(folder):
        if (entry in referenced and os.path.isfile(os.path.join(folder, entry)) and not entry.endswith(".py")
                and not entry.endswith(WEIGHT_SUFFIXES)):
            names.add(entry)
    return sorted(names)


def _inside(path: str, folder: str) -> bool:
    """`path` lies under `folder` by its name (a name with `..` or an absolute one does not); links are
    followed only when read, as in a Hugging Face cache snapshot, whose files link to its blobs."""
    return Path(os.path.normpath(path)).is_relative_to(os.path.normpath(folder))


def _copy_code_files(out_path: str, folder: str, names: List[str], what: str, keep: Dict[str, str]) -> None:
    """Copy `names` from `folder` into OUT; a name already copied from another model (`keep`) stays."""
    for name in names:
        source, target = os.path.join(folder, name), os.path.join(out_path, name)
        if name in keep:
            if not filecmp.cmp(source, os.path.join(keep[name], name), shallow=False):
                LOG.warning("%s's %s differs from the one of %s, which OUT keeps (the model's code comes from the "
                            "base); check that OUT's tokenizer loads", what, name, keep[name])
            continue
        if name.endswith(".py") or not os.path.exists(target):  # never replace a config or tokenizer file
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy(source, target)
            keep[name] = folder


def copy_remote_code(out_path: str, inputs: MergeInputs, tokenizer: bool = True) -> List[str]:
    """Give OUT the code its config.json and tokenizer_config.json name, so that it loads with
    trust_remote_code: the model's code from the base (OUT's config.json is the base's), the
    tokenizer's from the instruct model (OUT's tokenizer is the instruct's). Copied, never run.
    """
    keep: Dict[str, str] = {}
    base = inputs.paths["base"]
    _copy_code_files(out_path, base, remote_code_files(base, inputs.configs["base"].get("auto_map") or {}),
                     "the base model", keep)
    instruct_tokenizer_config = os.path.join(inputs.paths["instruct"], "tokenizer_config.json")
    if tokenizer and os.path.isfile(instruct_tokenizer_config):
        auto_map = _read_json(instruct_tokenizer_config).get("auto_map") or {}
        _copy_code_files(out_path, inputs.paths["instruct"], remote_code_files(inputs.paths["instruct"], auto_map),
                         "the instruct model", keep)
    return sorted(keep)


def _read_json(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _instruct_special_ids(inputs: MergeInputs) -> Dict[str, Any]:
    """eos/pad/bos of the instruct model: generation_config first (it is what `generate` uses)."""
    folder, config = inputs.paths["instruct"], inputs.configs["instruct"]
    ids = {k: config[k] for k in SPECIAL_TOKEN_FIELDS if config.get(k) is not None}
    gen_path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(gen_path):
        gen = _read_json(gen_path)
        ids.update({k: gen[k] for k in SPECIAL_TOKEN_FIELDS if gen.get(k) is not None})
    return ids


def _copy_instruct_tokenizer(out_path: str, inputs: MergeInputs) -> None:
    for name in _tokenizer_files(out_path):  # the base's, copied by mergekit: would shadow the instruct's
        os.remove(os.path.join(out_path, name))
    instruct = inputs.paths["instruct"]
    names = _tokenizer_files(instruct)
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(out_path, name)) or out_path, exist_ok=True)
        shutil.copy2(os.path.join(instruct, name), os.path.join(out_path, name))
    if not any(n.startswith("tokenizer") for n in names):
        LOG.warning("instruct model %s has no tokenizer files; the output has none either", instruct)


def _apply_recipe_chat_template(out_path: str, config: MergeConfiguration, trust_remote_code: bool) -> None:
    """A recipe's explicit `chat_template:` wins over the instruct model's (mergekit resolves it)."""
    import transformers
    from mergekit.merge import _set_chat_template

    tokenizer = transformers.AutoTokenizer.from_pretrained(out_path, trust_remote_code=trust_remote_code)
    _set_chat_template(tokenizer, config, trust_remote_code=trust_remote_code)
    tokenizer.save_pretrained(out_path)


def _rebuilt_tokenizer_ids(out_path: str, inputs: MergeInputs, trust_remote_code: bool) -> Dict[str, Any]:
    """mergekit built its own vocabulary: find the instruct special tokens in it by their text."""
    import transformers

    instruct = transformers.AutoTokenizer.from_pretrained(inputs.paths["instruct"], trust_remote_code=trust_remote_code)
    merged = transformers.AutoTokenizer.from_pretrained(out_path, trust_remote_code=trust_remote_code)
    if instruct.chat_template and not merged.chat_template:
        merged.chat_template = instruct.chat_template
        merged.save_pretrained(out_path)
    ids = {}
    for field in ("eos", "pad", "bos"):
        token = getattr(instruct, f"{field}_token", None)
        if token is not None and token in merged.get_vocab():
            ids[f"{field}_token_id"] = merged.convert_tokens_to_ids(token)
    return ids


def finish_instruct_output(
    out_path: str,
    inputs: MergeInputs,
    config: MergeConfiguration,
    *,
    trust_remote_code: bool = False,
) -> Dict[str, Any]:
    """Give OUT the instruct model's tokenizer, chat template, generation config and special ids.

    Returns the special token ids written into config.json.
    """
    check_unchanged(inputs.files)  # mergekit has read every weight: were they the files the preflight checked?
    tokenizer_rebuilt = bool(config.tokenizer or config.tokenizer_source)
    if tokenizer_rebuilt:
        copy_remote_code(out_path, inputs, tokenizer=False)  # mergekit saved the tokenizer it built
        ids = _rebuilt_tokenizer_ids(out_path, inputs, trust_remote_code)
    else:
        _copy_instruct_tokenizer(out_path, inputs)
        copy_remote_code(out_path, inputs)
        if config.chat_template and config.chat_template != "auto":
            _apply_recipe_chat_template(out_path, config, trust_remote_code)
        elif config.chat_template == "auto":
            LOG.info("chat_template: auto means the instruct model's template for %s", "domain_instruct")
        ids = _instruct_special_ids(inputs)

    config_path = os.path.join(out_path, "config.json")
    out_config = _read_json(config_path)
    out_config.update({k: v[0] if isinstance(v, list) and k != "eos_token_id" else v for k, v in ids.items()})
    atomic_write_json(config_path, out_config)

    gen_path = os.path.join(out_path, "generation_config.json")
    if tokenizer_rebuilt or not os.path.isfile(gen_path):
        gen = _read_json(gen_path) if os.path.isfile(gen_path) else {}
        gen.update(ids)
        atomic_write_json(gen_path, gen)
    return ids


def card_section(inputs: MergeInputs, ids: Dict[str, Any], extra: Optional[str] = None,
                 auto_rows: Optional[List[Tuple[int, str]]] = None) -> str:
    weights = {role: inputs.parameters[role].get("weight", 1.0) for role in ("domain", "instruct")}
    lines = [
        "",
        "## finmerge: domain_instruct",
        "",
        "merged = base + w_d·(domain − base) + w_i·(instruct − base) "
        "([arXiv 2409.19854](https://arxiv.org/abs/2409.19854)), merged by finmerge.",
        "",
        "| role | model | weight |",
        "|---|---|---|",
        f"| base | {inputs.base} | |",
        f"| domain | {inputs.domain} | {weights['domain']} |",
        f"| instruct | {inputs.instruct} | {weights['instruct']} |",
        "",
        "Tokenizer, generation config and chat template come from the instruct model (the chat template from "
        "the recipe when it sets `chat_template:`); code files for trust_remote_code: the model's from the base, "
        f"the tokenizer's from the instruct model. Special token ids in config.json: {json.dumps(ids, sort_keys=True)}.",
    ]
    if auto_rows:
        lines += ["", "Chat-control rows (`instruct_rows: auto`, from the instruct tokenizer's chat template) took only the "
                  "instruction vector: " + ", ".join(f"{i} `{t}`" for i, t in auto_rows) + "."]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"
