"""`finmerge demo`: the whole merge on three tiny models built on the spot (offline, seconds)."""

import os
import subprocess
import sys

import click


@click.command("demo")
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the tiny models, the recipe and the merged model (replaced if it exists).")
@click.option("--seed", default=0, show_default=True, help="Seed for the tiny models.")
def demo(out_dir: str, seed: int):
    """Build tiny base/instruct/domain models, merge them with plain `mergekit-yaml`, chat with the result."""
    import shutil

    from finmerge.demo.tiny_models import build_tiny_family, write_recipe

    out_dir = os.path.abspath(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    click.echo(f"building tiny base / instruct / domain models in {out_dir}/models ...")
    family = build_tiny_family(os.path.join(out_dir, "models"), seed=seed)
    recipe = write_recipe(os.path.join(out_dir, "recipe.yml"), family)
    merged = os.path.join(out_dir, "merged")
    mergekit_yaml = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    click.echo(f"$ mergekit-yaml {recipe} {merged}")
    subprocess.run([mergekit_yaml, recipe, merged, "--quiet"], check=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(merged)
    question = "What is the river of Velm?"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    answer = model.generate(**prompt, max_new_tokens=20, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    click.echo(f"\nmerged model: {merged}")
    click.echo(f"report (model card): {os.path.join(merged, 'README.md')}")
    click.echo(f"chat with it: {question!r} -> {tokenizer.decode(answer)!r}")
