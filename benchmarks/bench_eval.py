"""Speed of `finmerge eval` scoring against lm-evaluation-harness's own `hf` model (CPU).

The same locally built ~100M-parameter Llama (random weights: speed does not depend on them) and
the same multiple-choice requests (context + each choice) go through
  - finmerge: finmerge.evaluation.metrics._token_logprobs (what chat_likelihood and perplexity use),
  - lm-eval:  lm_eval.models.huggingface.HFLM.loglikelihood,
with the same batch size, alternating runs (the machine is shared). Reported: scored tokens per
second (tokens of context + continuation) of each, and the ratio. Then greedy generation, batched vs
one prompt at a time.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_eval.py --rounds 3 --threads 2
"""

import argparse
import os
import random
import statistics
import tempfile
import time


def build_model(folder: str, hidden: int, layers: int) -> str:
    import torch
    from transformers import LlamaForCausalLM

    from finmerge.demo.tiny_models import tiny_config, train_tokenizer

    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    tokenizer = train_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(len(tokenizer), tokenizer, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def requests(count: int, seed: int = 0):
    from finmerge.demo.tiny_models import CORPUS

    rng = random.Random(seed)
    choices = ["ARB.", "Tane.", "Oskar.", "A coupon."]
    out = []
    for _ in range(count):
        context = " ".join(rng.choice(CORPUS) for _ in range(rng.randint(2, 6))) + "\nAnswer:"
        out += [(context, " " + c) for c in choices]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(tempfile.gettempdir(), "finmerge-bench-eval-model"))
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generate", type=int, default=16, help="questions for the generation comparison")
    parser.add_argument("--only-generation", action="store_true", help="skip the scoring comparison")
    args = parser.parse_args()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from finmerge.evaluation import metrics
    from finmerge.evaluation.run import load_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(build_model(args.model, args.hidden, args.layers))
    params = sum(p.numel() for p in model.parameters())
    reqs = requests(args.questions)
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + tokenizer(x, add_special_tokens=False)["input_ids"] for c, x in reqs]
    tokens = sum(len(r) for r in rows)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu")
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(reqs)]

    times = {"finmerge": [], "lm-eval": []}
    for _ in range(0 if args.only_generation else args.rounds):  # alternate: load from other processes hits both alike
        start = time.perf_counter()
        ours = metrics._token_logprobs(model, rows, args.batch_size)
        times["finmerge"].append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = lm.loglikelihood(instances, disable_tqdm=True)
        times["lm-eval"].append(time.perf_counter() - start)
    if args.only_generation:
        print(f"model: {params / 1e6:.0f}M parameters, {args.threads} threads")
    else:
        _report_scoring(args, params, reqs, tokens, tokenizer, ours, theirs, times)
    if args.generate:
        _generation(args, model, tokenizer, reqs)


def _report_scoring(args, params, reqs, tokens, tokenizer, ours, theirs, times) -> None:
    import statistics

    # same numbers, not just the same speed: continuation log-likelihoods agree
    cont = [len(tokenizer(x, add_special_tokens=False)["input_ids"]) for _, x in reqs]
    worst = max(abs(o[-n:].sum().item() - t[0]) for o, n, t in zip(ours, cont, theirs))
    print(f"model: {params / 1e6:.0f}M parameters, {len(reqs)} requests, {tokens} tokens, batch {args.batch_size}, "
          f"{args.threads} threads; largest |loglik difference| {worst:.2e}")
    for name, values in times.items():
        print(f"{name:9s} runs {', '.join(f'{v:.2f}s' for v in values)}  median {tokens / statistics.median(values):.0f} tokens/s")
    ratios = [t / f for f, t in zip(times["finmerge"], times["lm-eval"])]
    print(f"speed ratio finmerge / lm-eval per round: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x")



def _generation(args, model, tokenizer, reqs) -> None:
    from finmerge.evaluation import metrics
    from finmerge.evaluation.data import QAItem

    items = [QAItem(c.split("\n")[0][:120] + "?", "ARB.") for c, _ in reqs[::4][:args.generate]]
    gen = {"batched": [], "one at a time": []}
    for _ in range(args.rounds):
        for name, size in (("batched", args.batch_size), ("one at a time", 1)):
            start = time.perf_counter()
            metrics.chat_generation(model, tokenizer, items, chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
                                    max_new_tokens=16, batch_size=size)
            gen[name].append(time.perf_counter() - start)
    for name, values in gen.items():
        print(f"generation {name:13s} runs {', '.join(f'{v:.2f}s' for v in values)}  median {len(items) / statistics.median(values):.2f} questions/s")
    print(f"generation speed-up batched / one at a time: median {statistics.median(gen['one at a time']) / statistics.median(gen['batched']):.2f}x")


if __name__ == "__main__":
    main()
