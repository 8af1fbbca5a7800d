"""Checks a `domain_instruct` recipe and its three checkpoints before any tensor is merged.

Everything here reads configs and safetensors headers only, so a wrong recipe fails in seconds with
a message that names the model, field or tensor, instead of an hour into a 14B merge.
"""

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

from finmerge.plugins import METHOD_NAME
from finmerge.plugins.input_changes import FileState, file_states
from finmerge.safety.errors import InputError
from finmerge.safety.hub import is_hub_id
from finmerge.safety.outputs import check_output_location

LOG = logging.getLogger(__name__)
ROLES = ("domain", "instruct")
DTYPES = ("bfloat16", "float16", "float32", "float64")


class RecipeError(InputError):
    """The recipe or one of its models cannot be merged as written; the message says what to do."""


@dataclass(frozen=True)
class MergeInputs:
    """The three checkpoints of a `domain_instruct` merge, resolved to local folders."""

    base: ModelReference
    domain: ModelReference
    instruct: ModelReference
    paths: Dict[str, str]  # role ("base", "domain", "instruct") -> local folder
    configs: Dict[str, Dict[str, Any]]  # role -> config.json contents
    parameters: Dict[str, Dict[str, Any]]  # role -> the recipe's parameters for that model
    files: Dict[str, FileState] = field(default_factory=dict)  # weight file -> its identity when checked

    def role_of(self, model: ModelReference) -> str:
        return {self.base: "base", self.domain: "domain", self.instruct: "instruct"}[model]


def _model_entries(config: MergeConfiguration) -> List[Tuple[ModelReference, Dict[str, Any]]]:
    if config.modules:
        raise RecipeError(f"{METHOD_NAME}: recipes with `modules:` are not supported; use `models:` or `slices:`")
    if config.models:
        return [(m.model, dict(m.parameters or {})) for m in config.models]
    return [(src.model, dict(src.parameters or {})) for s in config.slices or [] for src in s.sources]


def resolve_roles(config: MergeConfiguration) -> Tuple[ModelReference, Dict[str, ModelReference], Dict[str, Dict]]:
    """Return (base, {role: model}, {role: parameters}) or raise RecipeError naming the models."""
    if config.base_model is None:
        raise RecipeError(f"{METHOD_NAME} needs `base_model:` (the pretrained model both others were trained from)")
    if config.parameters and "role" in config.parameters:
        raise RecipeError("`role` is set per model (under each model's `parameters:`), not in the top-level `parameters:`")
    base = config.base_model
    roles: Dict[str, List[ModelReference]] = {r: [] for r in ROLES}
    params: Dict[str, Dict] = {"base": {}}
    seen = set()
    for model, parameters in _model_entries(config):
        role = parameters.get("role")
        if model == base:
            if role is not None:
                raise RecipeError(
                    f"the base model {base} has `role: {role}`; the base has no role. Give `role: domain` to "
                    "the continually pretrained model and `role: instruct` to the instruction-tuned one"
                )
            params["base"] = parameters
            continue
        if model in seen:
            continue  # the same model in several slices
        seen.add(model)
        if role is None:
            raise RecipeError(f"model {model} has no `role`; set `parameters: {{role: domain}}` or `{{role: instruct}}`")
        if role not in ROLES:
            raise RecipeError(f"model {model} has `role: {role!r}`; it must be 'domain' or 'instruct'")
        roles[role].append(model)
        params[role] = parameters
    for role in ROLES:
        if len(roles[role]) != 1:
            given = ", ".join(str(m) for m in roles[role]) or "none"
            raise RecipeError(f"{METHOD_NAME} needs exactly one model with `role: {role}`; got {given}")
    return base, {r: roles[r][0] for r in ROLES}, params


def _check_value(spec, value, where: str) -> None:
    """A parameter value, or mergekit's per-module form [{filter, value}, ...] / per-depth list."""
    values = value if isinstance(value, list) else [value]
    for item in values:
        item = getattr(item, "value", item)  # mergekit parsed {filter, value} into a ConditionalParameter
        try:
            spec.validate(item)
        except Exception as error:
            message = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
            raise RecipeError(f"{where}: invalid value {item!r} ({message})") from None


def check_parameters(config: MergeConfiguration) -> None:
    """Every parameter name and value in the recipe against the method's own parameter specs.

    mergekit ignores parameter names a method does not declare, so `wieght: 0.5` would silently
    merge at weight 1.0; here it is an error.
    """
    from finmerge.plugins.method import domain_instruct_merge

    specs = {p.name: p for p in domain_instruct_merge.spec.parameters}
    sources = [("top-level parameters", config.parameters or {})]
    sources += [(f"parameters of {model}", params) for model, params in _model_entries(config)]
    for where, params in sources:
        for name, value in params.items():
            if name not in specs:
                raise RecipeError(f"{where}: unknown parameter `{name}` for {METHOD_NAME} (known: {', '.join(specs)})")
            if name == "role":  # its value is checked by resolve_roles, which names the model
                if not isinstance(value, str):
                    raise RecipeError(f"{where}: `role` is one string per model ('domain' or 'instruct'), not {value!r}")
                continue
            _check_value(specs[name], value, f"{where}: `{name}`")


def local_folder(model: ModelReference, role: str, cache_dir: Optional[str] = None) -> str:
    path = model.model.path
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise RecipeError(f"{role} model {path} is a file; a model is a folder with config.json and weights")
    if os.path.islink(path):
        raise RecipeError(f"{role} model path {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    if not is_hub_id(path):
        raise RecipeError(f"{role} model path {path} does not exist (relative paths are read from {os.getcwd()})")
    try:  # a hub id: the same download mergekit itself would do
        return model.local_path(cache_dir=cache_dir, ignore_lora=True)
    except Exception as error:
        raise RecipeError(
            f"{role} model {path} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Download it first or give a local path"
        ) from error


def read_config(folder: str, role: str) -> Dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise RecipeError(f"{role} model {folder} has no config.json; a model folder holds config.json and "
                          "its weights (what save_pretrained writes)")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except UnicodeDecodeError as error:
        raise RecipeError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); "
                          "re-save the model's config.json") from None
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                          "re-save the model's config.json") from None
    if not isinstance(config, dict):
        raise RecipeError(f"{path} holds a JSON {type(config).__name__}, not an object of model settings; "
                          "re-save the model's config.json")
    if not config.get("architectures"):
        raise RecipeError(
            f"{path} has no `architectures` field; mergekit cannot plan the merge without it. Add e.g. "
            '"architectures": ["LlamaForCausalLM"] (save_pretrained of the model, not of the bare config, writes it)'
        )
    return config


def weight_files(folder: str, role: str, allow_pickle: bool) -> List[str]:
    safetensors = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if safetensors:
        return safetensors
    pickles = sorted(glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt")))
    if pickles and not allow_pickle:
        raise RecipeError(
            f"{role} model {folder} has only pickled weights ({os.path.basename(pickles[0])}); loading a pickle can "
            "run arbitrary code. Convert it to safetensors, or allow it explicitly with --allow-pickle "
            "(finmerge merge) or FINMERGE_ALLOW_PICKLE=1 (mergekit-yaml)"
        )
    if not pickles:
        raise RecipeError(f"{role} model {folder} has no weights (*.safetensors)")
    return []  # pickles allowed: mergekit reads them, shapes are checked per tensor while merging


def tensor_shapes(files: List[str]) -> Dict[str, Tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open  # header only: no tensor data is read

    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as error:
            # truncated download, a header that lies about its length, not a safetensors file at all
            target = f" (a link to {os.path.realpath(file)})" if os.path.islink(file) else ""
            raise RecipeError(
                f"{file}{target} is not a readable safetensors file ({' '.join(str(error).split())}); the file is "
                "damaged or incomplete: download or save the checkpoint again") from None
    return shapes


def _check_configs(configs: Dict[str, Dict], paths: Dict[str, str], tokenizer_configured: bool) -> None:
    archs = {role: tuple(c["architectures"]) for role, c in configs.items()}
    if len(set(archs.values())) > 1:
        raise RecipeError(
            "the three models have different architectures: "
            + ", ".join(f"{role} {paths[role]}: {list(a)}" for role, a in archs.items())
            + ". Task vectors only exist between checkpoints of the same architecture"
        )
    vocab = {role: c.get("vocab_size") for role, c in configs.items()}
    if len(set(vocab.values())) > 1:
        listed = ", ".join(f"{role} {v}" for role, v in vocab.items())
        if not tokenizer_configured:
            raise RecipeError(
                f"vocabulary sizes differ ({listed}): embed_tokens and lm_head cannot be subtracted row by row. "
                "Instruct models often add chat tokens. Tell mergekit how to align the vocabularies: add "
                "`tokenizer: {source: <instruct model path>}` (or `tokenizer_source:`) to the recipe so it rebuilds "
                "the embeddings for one vocabulary, or pass --unsafe-truncate-embeddings if the extra rows are padding"
            )
        LOG.warning("vocabulary sizes differ (%s); mergekit's tokenizer settings will align them", listed)
    tied = {role: bool(c.get("tie_word_embeddings", False)) for role, c in configs.items()}
    if len(set(tied.values())) > 1:
        LOG.warning(
            "tie_word_embeddings differs (%s); the output takes the base's config, check lm_head in the result",
            ", ".join(f"{role} {t}" for role, t in tied.items()),
        )


def _check_shapes(shapes: Dict[str, Dict[str, Tuple[int, ...]]], paths: Dict[str, str], vocab_sizes: set) -> None:
    for name, base_shape in shapes["base"].items():
        others = {role: shapes[role].get(name) for role in ROLES}
        for role, shape in others.items():
            if shape is None or shape == base_shape:
                continue
            only_vocab = len(shape) == len(base_shape) and all(
                a == b or (a in vocab_sizes and b in vocab_sizes) for a, b in zip(shape, base_shape)
            )
            if not only_vocab:
                raise RecipeError(
                    f"tensor {name} has shape {list(base_shape)} in the base ({paths['base']}) but "
                    f"{list(shape)} in the {role} model ({paths[role]}); these checkpoints are not the same model size"
                )


def check_dtypes(config: MergeConfiguration) -> None:
    """mergekit turns an unknown dtype into a RuntimeError mid-plan; name the field instead."""
    for key in ("dtype", "out_dtype"):
        value = getattr(config, key)
        if value is not None and value.removeprefix("torch.") not in DTYPES:
            raise RecipeError(f"`{key}: {value}` is not a dtype mergekit can use; choose one of {', '.join(DTYPES)}")


def input_paths(config: MergeConfiguration) -> List[str]:
    """Every local path the recipe reads: models of every role and any tokenizer source."""
    paths = [model.model.path for model in config.referenced_models()]
    sources = [config.tokenizer_source, config.tokenizer.source if config.tokenizer else None]
    paths += [source.model.path for source in sources if isinstance(source, ModelReference)]
    return paths


def check_tokenizer_source(config: MergeConfiguration) -> None:
    sources = [config.tokenizer_source, config.tokenizer.source if config.tokenizer else None]
    for source in sources:
        if isinstance(source, ModelReference) and not os.path.isdir(source.model.path) \
                and not is_hub_id(source.model.path):
            raise RecipeError(f"tokenizer source {source.model.path} does not exist (relative paths are read from "
                              f"{os.getcwd()}); give the folder of the model whose tokenizer the output should use")


def check_output_path(out_path: str, overwrite: bool, inputs: List[str] = ()) -> None:
    """OUT is never an input (nor inside or around one), whatever --overwrite says; a user's folder only on request."""
    check_output_location(out_path, inputs, what="output folder")
    if os.path.islink(out_path):
        raise RecipeError(f"output path {out_path} is a symbolic link; give the folder itself")
    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise RecipeError(f"output path {out_path} is a file; give a folder")
    if os.path.isdir(out_path) and os.listdir(out_path) and not overwrite:
        raise RecipeError(
            f"output folder {out_path} exists and is not empty; choose another folder, or replace it with "
            "--overwrite (finmerge merge) or FINMERGE_OVERWRITE=1 (mergekit-yaml)"
        )


def preflight(
    config: MergeConfiguration,
    out_path: str,
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    cache_dir: Optional[str] = None,
    unsafe_truncate_embeddings: bool = False,
) -> MergeInputs:
    """Validate a `domain_instruct` merge; return its resolved inputs or raise RecipeError."""
    check_output_path(out_path, overwrite, input_paths(config))
    check_parameters(config)  # first: a misspelt `role` key is named as such, not as a missing role
    base, roles, parameters = resolve_roles(config)
    check_dtypes(config)
    check_tokenizer_source(config)
    models = {"base": base, **roles}
    paths = {role: local_folder(model, role, cache_dir) for role, model in models.items()}
    configs = {role: read_config(folder, role) for role, folder in paths.items()}
    tokenizer_configured = bool(config.tokenizer or config.tokenizer_source or unsafe_truncate_embeddings)
    _check_configs(configs, paths, tokenizer_configured)
    files = {role: weight_files(folder, role, allow_pickle) for role, folder in paths.items()}
    if all(files.values()):
        vocab_sizes = {c.get("vocab_size") for c in configs.values()} if tokenizer_configured else set()
        _check_shapes({role: tensor_shapes(f) for role, f in files.items()}, paths, vocab_sizes)
    return MergeInputs(
        base=base, domain=roles["domain"], instruct=roles["instruct"],
        paths=paths, configs=configs, parameters=parameters, files=file_states(paths),
    )
