"""Make a merge's output folder a working instruct model.

mergekit copies tokenizer, chat template, generation config and the eos id from the BASE model: the
result would not know how to format a chat or when an assistant turn ends. This puts the instruct
model's back, after mergekit has written the weights.
"""

import glob
import json
import logging
import os
import shutil
from typing import Any, Dict, List, Optional

from mergekit.config import MergeConfiguration

from finmerge.plugins.preflight import MergeInputs

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


def _remote_code_files(config: Dict[str, Any], folder: str) -> List[str]:
    """Python files a trust_remote_code model names in auto_map (copied, never run, here).

    The model's classes are listed in config.json, the tokenizer's in tokenizer_config.json.
    """
    maps = [config.get("auto_map") or {}]
    tokenizer_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tokenizer_config):
        maps.append(_read_json(tokenizer_config).get("auto_map") or {})
    modules = set()
    for auto_map in maps:
        for target in auto_map.values():
            for ref in target if isinstance(target, list) else [target]:
                if ref and "--" not in ref:  # "repo--module.Class" points to another repository
                    modules.add(ref.split(".")[0] + ".py")
    return sorted(m for m in modules if os.path.isfile(os.path.join(folder, m)))


def _read_json(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: str, data: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


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
    names = _tokenizer_files(instruct) + _remote_code_files(inputs.configs["instruct"], instruct)
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
    tokenizer_rebuilt = bool(config.tokenizer or config.tokenizer_source)
    if tokenizer_rebuilt:
        ids = _rebuilt_tokenizer_ids(out_path, inputs, trust_remote_code)
    else:
        _copy_instruct_tokenizer(out_path, inputs)
        if config.chat_template and config.chat_template != "auto":
            _apply_recipe_chat_template(out_path, config, trust_remote_code)
        elif config.chat_template == "auto":
            LOG.info("chat_template: auto means the instruct model's template for %s", "domain_instruct")
        ids = _instruct_special_ids(inputs)

    config_path = os.path.join(out_path, "config.json")
    out_config = _read_json(config_path)
    out_config.update({k: v[0] if isinstance(v, list) and k != "eos_token_id" else v for k, v in ids.items()})
    _write_json(config_path, out_config)

    gen_path = os.path.join(out_path, "generation_config.json")
    if tokenizer_rebuilt or not os.path.isfile(gen_path):
        gen = _read_json(gen_path) if os.path.isfile(gen_path) else {}
        gen.update(ids)
        _write_json(gen_path, gen)
    return ids


def card_section(inputs: MergeInputs, ids: Dict[str, Any], extra: Optional[str] = None) -> str:
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
        "Tokenizer, chat template and generation config come from the instruct model; special token ids "
        f"in config.json: {json.dumps(ids, sort_keys=True)}.",
    ]
    if extra:
        lines += ["", extra]
    return "\n".join(lines) + "\n"
