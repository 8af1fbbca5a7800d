"""`instruct_rows: auto`: the chat-control tokens' rows, read from the instruct model's tokenizer alone.

The rows of the token embedding and lm_head that `instruct_rows` names take only the instruction
vector. `auto` picks the tokens that the chat template itself writes around messages: a short
conversation is rendered with the template OUT will carry (the recipe's `chat_template:` when it
sets one, else the instruct model's), and of the rendered tokens those that are special or added
tokens of the instruct tokenizer are kept. Message text never contributes (it is ordinary words),
and neither does template text made of ordinary words, such as Alpaca's `### Instruction:`: those
tokens are shared with every other use of the words, and the domain vector's change to them is
domain knowledge. With an Alpaca-style template `auto` therefore keeps only the end-of-text token
the template writes after an answer: the token that ends a turn.
"""

import logging
from typing import List, Optional, Tuple

from mergekit.config import MergeConfiguration

from finmerge.plugins.preflight import MergeInputs, RecipeError

AUTO = "auto"
LOG = logging.getLogger(__name__)
CONVERSATION = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                {"role": "user", "content": "Q"}]


def rendered_control_tokens(tokenizer) -> List[Tuple[int, str]]:
    """(id, text) of the special/added tokens the tokenizer's chat template writes around messages."""
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    control = set(getattr(tokenizer, "all_special_ids", []) or [])
    control |= set((getattr(tokenizer, "added_tokens_decoder", None) or {}).keys())
    chosen = sorted({i for i in ids if i in control})
    return [(i, tokenizer.convert_ids_to_tokens(i)) for i in chosen]


def _instruct_tokenizer(config: MergeConfiguration, inputs: MergeInputs, trust_remote_code: bool):
    """The instruct tokenizer with the chat template OUT will have."""
    import transformers
    from mergekit.merge import _set_chat_template

    tokenizer = transformers.AutoTokenizer.from_pretrained(inputs.paths["instruct"], trust_remote_code=trust_remote_code)
    if config.chat_template and config.chat_template != "auto":
        _set_chat_template(tokenizer, config, trust_remote_code=trust_remote_code)  # named or Jinja, as mergekit reads it
    return tokenizer


def resolve_auto_rows(config: MergeConfiguration, inputs: MergeInputs,
                      trust_remote_code: bool = False) -> Tuple[MergeConfiguration, Optional[List[Tuple[int, str]]]]:
    """The recipe with `instruct_rows: auto` replaced by the ids; the chosen (id, token) pairs (None: not auto)."""
    value = (config.parameters or {}).get("instruct_rows")
    if not (isinstance(value, str) and value.strip().lower() == AUTO):
        return config, None
    tokenizer = _instruct_tokenizer(config, inputs, trust_remote_code)
    source = "the recipe's chat_template" if config.chat_template and config.chat_template != "auto" else \
        f"the chat template of instruct model {inputs.instruct}"
    if not tokenizer.chat_template:
        raise RecipeError(f"instruct_rows: auto reads the chat-control tokens from a chat template, but instruct model "
                          f"{inputs.instruct} has none and the recipe sets no `chat_template:`; give one, or list the "
                          "token ids (instruct_rows: \"3,4,5\")")
    rows = rendered_control_tokens(tokenizer)
    if not rows:
        raise RecipeError(f"instruct_rows: auto found no special or added token in {source} (it writes only ordinary "
                          "words), so there are no chat-control rows to protect; remove instruct_rows")
    data = config.model_dump(mode="json", exclude_defaults=True)
    data["parameters"]["instruct_rows"] = ",".join(str(i) for i, _ in rows)
    LOG.info("instruct_rows: auto -> %s (from %s)", describe(rows), source)
    return MergeConfiguration.model_validate(data), rows


def describe(rows: List[Tuple[int, str]]) -> str:
    return ", ".join(f"{i} {token!r}" for i, token in rows)
