"""`finmerge merge RECIPE OUT`: mergekit-yaml plus the domain_instruct safety options."""

from typing import Any, Dict

import click
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from finmerge.plugins.preflight import RecipeError


def load_recipe(path: str) -> Dict[str, Any]:
    """The recipe as a dict, or a RecipeError naming the file (and line) and what is wrong."""
    from finmerge.safety.flags import refuse_cli_only
    from finmerge.safety.yaml_files import load_yaml

    data = load_yaml(path, "recipe", RecipeError)
    if data is None:
        raise RecipeError(f"{path} is empty; a recipe needs at least `merge_method:` and `models:`")
    if not isinstance(data, dict):
        raise RecipeError(f"{path} holds a YAML {type(data).__name__}, not a mapping of settings "
                          "(`merge_method:`, `base_model:`, `models:` ...)")
    refuse_cli_only(data, path)
    return data


def parse_recipe(path: str, data: Dict[str, Any]):
    """mergekit's own MergeConfiguration; its validation errors named by field, for the user."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        return MergeConfiguration.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"`{'.'.join(str(p) for p in e['loc']) or 'recipe'}`: {e['msg']}"
                             for e in error.errors()[:5])
        raise RecipeError(f"{path} is not a valid mergekit recipe: {problems}") from None
    except (RuntimeError, ValueError, TypeError) as error:  # mergekit's model validators raise RuntimeError
        raise RecipeError(f"{path} is not a valid mergekit recipe: {' '.join(str(error).split())}") from None


@click.command("merge", cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path())  # a file here gets the preflight's message
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty (only once the new merge "
              "succeeded). Never applies to an input: OUT may not be, contain or be inside a model of the recipe.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickled .bin weights (loading a pickle can run code). Default: safetensors only.")
@click.option("--remove-stale", is_flag=True, help="Remove scratch folders (.OUT.partial-PID) that killed merges into OUT "
              "left behind (only those whose process is gone). Without it they are only reported.")
@add_merge_options
def merge(merge_options: MergeOptions, config_file: str, out_path: str, overwrite: bool, allow_pickle: bool,
          remove_stale: bool):
    """Merge CONFIG_FILE (a mergekit recipe) into OUT_PATH; accepts every mergekit-yaml option.

    For `merge_method: domain_instruct` the recipe is checked before any tensor is read, the output
    carries the instruct model's tokenizer, chat template and eos, and OUT appears only once done.
    """
    from finmerge.plugins import METHOD_NAME, register

    source_data = load_recipe(config_file)
    config = parse_recipe(config_file, source_data)
    with open(config_file, encoding="utf-8") as handle:
        source = handle.read()
    if config.merge_method != METHOD_NAME:
        from mergekit import merge as mergekit_merge

        merge_options.apply_global_options()
        mergekit_merge.run_merge(config, out_path, options=merge_options, config_source=source)
        return
    register()  # says why if domain_instruct cannot be installed into this mergekit
    from mergekit import merge as mergekit_merge

    from finmerge.plugins.input_changes import merge_faults
    from finmerge.plugins.run import run_domain_instruct

    merge_options.apply_global_options()
    original = mergekit_merge.run_merge.__finmerge_wrapped__
    try:
        with merge_faults(out_path, config):
            run_domain_instruct(original, config, out_path, merge_options, source, overwrite=overwrite,
                                allow_pickle=allow_pickle, remove_stale=remove_stale)
    except RecipeError as error:
        raise click.ClickException(f"{config_file}: {' '.join(str(error).split())}") from error
