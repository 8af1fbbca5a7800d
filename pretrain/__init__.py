"""Continual pretraining of the base on domain text: the `domain` checkpoint of a recipe.

    config.py   PretrainConfig: every setting, its docs (= `finmerge pretrain --help`), YAML + overrides
    corpus.py   sources (.txt/.jsonl/.parquet, datasets), cleaning, exact and MinHash near-dedup
    packing.py  tokenize + EOS, fixed-length blocks, collator, document-isolation check
    data.py     the streaming pass corpus -> packed Arrow blocks + data report
    train.py    run_pretraining: output folder and resume, transformers Trainer, summary, plot

Importing this package costs no torch; `finmerge.pretrain.train.run_pretraining(config)` runs a job.
See docs/pretrain.md.
"""
