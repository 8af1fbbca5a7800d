"""Choosing a merge with no labelled data: what a user with a base, its instruct sibling and domain
text has, and nothing else.

Two signals per merge, neither of which reads a labelled answer:
- knowledge: bits per byte of held-out domain text (`text`, split off the CPT corpus; lower is better),
  with the chat template's control tokens left out of each prediction: plain text never holds them,
  and a merge that keeps them likely (so that it ends its turns) must not pay for it here;
- instruction behaviour, from user prompts without answers (`prompts`): the instruct model answers
  them once (greedy); each merge is then scored on the share of its own greedy answers that end the
  turn, and on the NLL of the instruct model's answers (closeness to the instruct model's behaviour).

The rule (see `rank`): a merge qualifies when its turn-end share is at least `TURN_END_SHARE` of the
best share on the same prompts, the instruct model's or any merge's (a chat model that does not stop
answering is not one); among those, the lowest bits per byte wins, ties broken by the instruct
answers' NLL. docs/sweep.md records how this rule compares with the label-chosen best.
"""

import json
import os
from typing import Dict, List, Optional, Tuple

from finmerge.evaluation.data import load_prompts
from finmerge.evaluation.settings import EvalSettings
from finmerge.safety.errors import InputError
from finmerge.safety.outputs import atomic_write_text

# The QA set each merge is scored on: the prompts with the instruct model's own answers as references.
PROMPTS_SET = "prompts"
# A merge must end at least this share of what the instruct model itself ends.
TURN_END_SHARE = 0.9
KNOWLEDGE = "domain.plain_bits_per_byte"
TURN_END = f"{PROMPTS_SET}.ends_with_eos"
CLOSENESS = f"{PROMPTS_SET}.answer_nll"


class DataFreeError(InputError):
    """The data-free choice cannot be made from the settings given."""


def _value(result: Dict, path: str) -> Optional[float]:
    value = result
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def instruct_reference(instruct: str, prompts_file: str, settings: EvalSettings, out_jsonl: str) -> Dict:
    """The instruct model's greedy answers to the prompts, written as a QA file (prompt, its answer).

    Returns {"turn_end": the instruct model's own share of answers that end the turn, "prompts": n,
    "answered": how many answers are non-empty (only those become references), "file": out_jsonl}.
    """
    from finmerge.evaluation.run import answer_prompts

    prompts = load_prompts(prompts_file)
    answers = answer_prompts(instruct, prompts, settings)
    rows = [{"question": q, "answer": a} for q, (a, _) in zip(prompts, answers) if a.strip()]
    if not rows:
        raise DataFreeError(f"the instruct model {instruct} gave an empty answer to every prompt in {prompts_file}; "
                            "check its chat template and turn_end, or give other prompts")
    atomic_write_text(out_jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"turn_end": sum(ended for _, ended in answers) / len(answers), "prompts": len(prompts),
            "answered": len(rows), "file": out_jsonl}


def signals(result: Dict) -> Dict[str, Optional[float]]:
    """The three numbers the rule reads from one merge's evaluation."""
    knowledge = _value(result, KNOWLEDGE)
    if knowledge is None:  # no chat-control tokens to leave out: the two are the same number
        knowledge = _value(result, "domain.bits_per_byte")
    return {"bits_per_byte": knowledge, "turn_end": _value(result, TURN_END),
            "instruct_nll": _value(result, CLOSENESS)}


def choice_key(result: Dict, reference_turn_end: float) -> Tuple:
    """Larger is better, for one sweep's points given the turn-end share they are held to (see `rank`)."""
    s = signals(result)
    if s["bits_per_byte"] is None or s["turn_end"] is None:
        raise DataFreeError("a sweep point has no bits per byte or no turn-end share: the data-free choice needs "
                            "the sweep's held-out `text` and its `prompts`")
    nll = s["instruct_nll"] if s["instruct_nll"] is not None else float("inf")
    if s["turn_end"] >= TURN_END_SHARE * reference_turn_end:
        return (1, -s["bits_per_byte"], -nll)
    return (0, s["turn_end"], -s["bits_per_byte"])


def check_settings(prompts: Optional[str], text: Optional[str], qa: Dict[str, str]) -> None:
    if not prompts:
        return
    if not text:
        raise DataFreeError("the data-free choice needs held-out domain text as well as prompts: give the sweep "
                            "`text` (e.g. held-out documents split off the pretraining corpus)")
    if PROMPTS_SET in qa:
        raise DataFreeError(f"a QA set may not be named {PROMPTS_SET!r} when `prompts` are given: the data-free "
                            "scores use that name; rename the QA set")
    if not os.path.isfile(prompts):
        raise DataFreeError(f"prompts file {prompts} does not exist")


def rule_text() -> str:
    return (f"turn-end share on the prompts >= {TURN_END_SHARE} x the best share (the instruct model's or any merge's), "
            f"then the lowest plain bits/byte of the held-out domain text (chat-control tokens left out), then the lowest NLL of the instruct model's answers")


def rank(points: List[Dict], instruct_turn_end: float) -> List[Dict]:
    """The points, the data-free choice first."""
    reference = max([instruct_turn_end] + [signals(p["result"])["turn_end"] or 0.0 for p in points])
    return sorted(points, key=lambda p: choice_key(p["result"], reference), reverse=True)
