"""Continual pretraining of the base on domain text: the `domain` checkpoint of a recipe.

    config.py         PretrainConfig (a TrainingArguments subclass): every setting and its help; build_config
    sources.py        where the corpus comes from (.txt/.jsonl/.parquet, datasets) and its identity
    readers.py        streamed reading, bounded pieces however long a document
    cleaning.py       normalization + exact dedup (streamed)
    dedup.py          near-duplicates: datasketch MinHash + MinHashLSH
    corpus.py         the corpus entry points (resolve_sources, source_identity) in one import
    packing.py        tokenize + EOS, fixed-length blocks, collator, document-isolation check
    data.py           the streaming pass corpus -> packed Arrow blocks + data report
    base_model.py     the base: local files, identity by content, dtype, checks
    output_folder.py  OUT: run.json, fresh/resume/complete, refusal of a foreign folder
    checkpoint.py     resumable checkpoints, the final domain checkpoint (config, dtype)
    distributed.py    FSDP wrap-class check
    summary.py        perplexity, loss curve, plot
    train.py          run_pretraining: the steps above, in order
    remote_code.py    loading models that bring their own code (attention, dtype, generate under transformers 5)
    options_doc.py    writes the options table of docs/pretrain.md from PretrainConfig

Entry points: `build_config(config_file=None, overrides=None, *, trust_remote_code=False, allow_pickle=False)`
(finmerge.pretrain.config) and `run_pretraining(config, callbacks=None)` (finmerge.pretrain.train).
See docs/pretrain.md.
"""
