"""`finmerge diagnose`: the independence report of a merge, from the three checkpoints, without merging."""

import click

from finmerge.cli.options import Dtype
from finmerge.safety.dtypes import COMMON


@click.command("diagnose")
@click.option("--base", required=True, help="Base model: local folder or Hugging Face hub id.")
@click.option("--domain", required=True, help="Domain model (continual pretraining of the base).")
@click.option("--instruct", required=True, help="Instruct model (instruction tuning of the base).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for diagnostics.json, diagnostics.md and diagnostics.svg (created if needed).")
@click.option("--dtype", type=Dtype((*COMMON, "float64")), default=None,
              help="Cast inputs to this dtype first, like a recipe's `dtype:` (default: as stored); bfloat16 = bf16, "
                   "float16 = fp16, float32 = fp32.")
@click.option("--cache-dir", default=None, help="Hugging Face cache folder for hub ids.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def diagnose(base, domain, instruct, out_dir, dtype, cache_dir, quiet):
    """How independent are τ_d = domain − base and τ_i = instruct − base?

    Per tensor, layer, module type and overall: cosine, norms, size relative to the base, sign
    agreement where both vectors are non-zero (and how many entries that is). Reads the weights that
    model.safetensors.index.json names (else model.safetensors) chunk by chunk (memory stays
    bounded); the numbers equal those a domain_instruct merge of the same checkpoints writes into
    its output folder.
    """
    import torch

    from finmerge.diagnostics.report import JSON_NAME, MD_NAME
    from finmerge.diagnostics.standalone import DiagnoseError
    from finmerge.diagnostics.standalone import diagnose as run

    try:
        report = run({"base": base, "domain": domain, "instruct": instruct}, out_dir,
                     dtype=getattr(torch, dtype) if dtype else None, cache_dir=cache_dir, progress=not quiet)
    except DiagnoseError as error:
        raise click.ClickException(str(error)) from error
    click.echo(report.verdict)
    written = [JSON_NAME, MD_NAME] + ([report.heatmap] if report.heatmap else [])
    click.echo(f"wrote {', '.join(written)} to {out_dir}")
