"""The demo's model family, trained from scratch on the generated world.

- tokenizer: byte-level BPE trained on all world text, with chat special tokens;
- base: a small Llama pretrained on the general text with `finmerge pretrain` (from random init);
- instruct: the base fine-tuned on general chats with TRL's SFTTrainer (loss on the answers only),
  with its own chat template and `<|end|>` as eos: the stand-in for a public instruct sibling;
- domain: the base continually pretrained on the financial text (with general replay) by
  `finmerge pretrain`: the step the paper adds.
"""

import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

BASE_EOS, PAD, USER, ASSISTANT, END = "<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class FamilySettings:
    vocab_size: int = 1024
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384
    seq_len: int = 128
    batch_size: int = 32
    base_steps: int = 1000
    base_lr: float = 3e-3
    instruct_steps: int = 200
    instruct_lr: float = 3e-4
    domain_steps: int = 400
    domain_lr: float = 1e-3
    replay_ratio: float = 0.25
    seed: int = 0


QUICK_FAMILY = FamilySettings(vocab_size=512, hidden_size=64, layers=2, heads=4, intermediate_size=192, seq_len=96,
                              batch_size=16, base_steps=150, instruct_steps=40, domain_steps=60, base_lr=5e-3, domain_lr=2e-3)


def build_tokenizer(texts: List[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BASE_EOS, USER, ASSISTANT, END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=BASE_EOS, pad_token=PAD)


def write_random_init(folder: str, tokenizer, settings: FamilySettings) -> str:
    """The untrained starting point of the base model (a checkpoint, so `finmerge pretrain` can start from it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads, num_key_value_heads=settings.heads,
        max_position_embeddings=max(256, settings.seq_len), tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(BASE_EOS), pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pretrain(model: str, output: str, data: List[str], steps: int, lr: float, settings: FamilySettings,
             threads: Optional[int], replay: Optional[List[str]] = None) -> Dict:
    """One `finmerge pretrain` run (the same code path as the command)."""
    from finmerge.pretrain.config import build_config
    from finmerge.pretrain.train import run_pretraining

    overrides = dict(
        model=model, output=output, data=data, txt_document="paragraph", seq_len=settings.seq_len,
        per_device_train_batch_size=settings.batch_size, max_steps=steps, learning_rate=lr, warmup_steps=0.05,
        weight_decay=0.0, near_dedup=False, min_chars=10, eval_fraction=0.02, save_steps=max(steps // 2, 1),
        logging_steps=max(steps // 50, 1), seed=settings.seed, num_threads=threads,
    )
    if replay:
        overrides.update(replay_data=replay, replay_ratio=settings.replay_ratio)
    return run_pretraining(build_config(None, overrides))


def instruct_tokenizer(base_folder: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    tokenizer.eos_token = END
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def fine_tune_instruct(base: str, output: str, chats: List[Dict], settings: FamilySettings,
                       threads: Optional[int]) -> Dict:
    """Supervised fine-tuning on chats with TRL (prompt/completion: loss on the answer and its <|end|>)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = instruct_tokenizer(base)
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": c["question"]}], "completion": [{"role": "assistant", "content": c["answer"]}]}
        for c in chats
    ])
    args = SFTConfig(
        output_dir=os.path.join(output, "sft-run"), max_steps=settings.instruct_steps, learning_rate=settings.instruct_lr,
        per_device_train_batch_size=settings.batch_size, lr_scheduler_type="cosine", warmup_steps=max(1, settings.instruct_steps // 10), weight_decay=0.0,
        max_length=settings.seq_len, packing=False, completion_only_loss=True, gradient_checkpointing=False,
        save_strategy="no", report_to=[], logging_steps=10, seed=settings.seed, use_cpu=True, bf16=False,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    end_id = tokenizer.convert_tokens_to_ids(END)
    model.config.eos_token_id = end_id
    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    summary = {"steps": result.global_step, "train_loss": result.training_loss,
               "loss_curve": [{"step": r["step"], "loss": r["loss"]} for r in trainer.state.log_history if "loss" in r]}
    with open(os.path.join(output, "training_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def settings_dict(settings: FamilySettings) -> Dict:
    return asdict(settings)
