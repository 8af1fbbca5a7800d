"""`finmerge merge RECIPE OUT`: mergekit-yaml plus the domain_instruct safety options."""

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from finmerge.plugins import register
from finmerge.plugins.preflight import RecipeError


@click.command("merge", cls=PrettyPrintHelp)
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty (only once the new merge succeeded).")
@click.option("--allow-pickle", is_flag=True, help="Accept pickled .bin weights (loading a pickle can run code). Default: safetensors only.")
@add_merge_options
def merge(merge_options: MergeOptions, config_file: str, out_path: str, overwrite: bool, allow_pickle: bool):
    """Merge CONFIG_FILE (a mergekit recipe) into OUT_PATH; accepts every mergekit-yaml option.

    For `merge_method: domain_instruct` the recipe is checked before any tensor is read, the output
    carries the instruct model's tokenizer, chat template and eos, and OUT appears only once done.
    """
    register()
    from mergekit import merge as mergekit_merge
    from finmerge.plugins.run import run_domain_instruct

    merge_options.apply_global_options()
    with open(config_file, encoding="utf-8") as handle:
        source = handle.read()
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    if config.merge_method == "domain_instruct":
        original = mergekit_merge.run_merge.__finmerge_wrapped__
        try:
            run_domain_instruct(original, config, out_path, merge_options, source, overwrite=overwrite, allow_pickle=allow_pickle)
        except RecipeError as error:
            raise click.ClickException(f"{config_file}: {error}") from error
    else:
        mergekit_merge.run_merge(config, out_path, options=merge_options, config_source=source)
