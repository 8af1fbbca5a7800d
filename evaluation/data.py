"""Evaluation sets: held-out text for perplexity and a JSONL of chat questions.

QA lines are JSON objects: {"question": str, "answer": str} and optionally "choices": [str, ...]
(multiple choice, scored by log-likelihood as japanese-lm-fin-harness does; "answer" must be one of
the choices) and "value": str (the fact a greedy answer must contain, when "answer" is a whole
sentence; default: the answer itself). Any other keys are kept and ignored.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Optional, Tuple

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from finmerge.safety.errors import InputError


class EvalDataError(InputError):
    """An evaluation file is missing or malformed; the message names the file and line."""


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("blank")
    return text


@dataclass(frozen=True)
class QAItem:
    question: str
    answer: str
    choices: Optional[Tuple[str, ...]] = None
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def expected(self) -> str:
        """What a greedy answer must contain to count as correct."""
        return self.extra.get("value") or self.answer

    @property
    def answer_index(self) -> int:
        return self.choices.index(self.answer)


Text = Annotated[str, StringConstraints(strip_whitespace=False, min_length=1), AfterValidator(_not_blank)]


class QALine(BaseModel):
    """One line of a QA file; other keys are kept (in `extra`) and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    question: Text
    answer: Text
    choices: Optional[Annotated[List[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=2)]] = None

    @model_validator(mode="after")
    def _answer_is_a_choice(self) -> "QALine":
        if self.choices is not None and self.answer not in self.choices:
            raise ValueError(f"'answer' {self.answer!r} is not one of the choices")
        return self


_WANT = {"question": "'question' is missing or not a non-empty string",
         "answer": "'answer' is missing or not a non-empty string",
         "choices": "'choices' must be a list of at least two non-empty strings"}


def _problem(error: ValidationError) -> str:
    first = error.errors()[0]
    if first["type"] == "value_error" and not first["loc"]:
        return str(first["ctx"]["error"])
    return _WANT.get(str(first["loc"][0]), f"{first['loc'][0]}: {first['msg']}")


def load_qa(path: str) -> List[QAItem]:
    if not os.path.isfile(path):
        raise EvalDataError(f"QA file {path} does not exist")
    items = []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{where}: not valid JSON ({error.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise EvalDataError(f"{where}: expected a JSON object with 'question' and 'answer'")
        try:
            parsed = QALine.model_validate(row)
        except ValidationError as error:
            raise EvalDataError(f"{where}: {_problem(error)}") from None
        items.append(QAItem(parsed.question, parsed.answer, tuple(parsed.choices) if parsed.choices else None,
                            dict(parsed.model_extra or {})))
    if not items:
        raise EvalDataError(f"QA file {path} holds no questions")
    return items


def load_prompts(path: str) -> List[str]:
    """User prompts without answers: a .txt file (one prompt per line) or JSONL with "question".

    Only the prompt text is returned; any other key of a JSONL line ("answer" included) is never
    read, so what is computed from prompts cannot depend on labelled answers.
    """
    if not os.path.isfile(path):
        raise EvalDataError(f"prompts file {path} does not exist")
    prompts = []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{path}:{number}: not valid JSON ({error.msg}); each line must be one JSON object "
                                "with a 'question' string (or use a .txt file, one prompt per line)") from None
        question = row.get("question") if isinstance(row, dict) else None
        if not isinstance(question, str) or not question.strip():
            raise EvalDataError(f"{path}:{number}: expected a JSON object with a non-empty 'question' string")
        prompts.append(question)
    if not prompts:
        raise EvalDataError(f"prompts file {path} holds no prompts")
    return prompts


def _lines(path: str) -> List[str]:
    """The file's lines; a file that is not UTF-8 text is named with the byte offset."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().splitlines()
    except UnicodeDecodeError as error:
        raise EvalDataError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise EvalDataError(f"cannot read {path}: {error.strerror}") from None


def load_texts(path: str) -> List[str]:
    """Held-out documents: a .txt file (documents separated by blank lines) or .jsonl with "text"."""
    if not os.path.isfile(path):
        raise EvalDataError(f"text file {path} does not exist")
    lines = _lines(path)
    if path.endswith(".jsonl"):
        texts = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    text = None
                if not isinstance(text, str):
                    raise EvalDataError(f"{path}:{number}: expected a JSON object with a 'text' string")
                texts.append(text)
    else:
        texts = [doc.strip() for doc in "\n".join(lines).split("\n\n")]
    texts = [t for t in texts if t]
    if not texts:
        raise EvalDataError(f"text file {path} holds no documents")
    return texts
