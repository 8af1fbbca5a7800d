"""What an evaluation is asked to do: the data, the generation knobs, and where the models run.

`EvalData` and `EvalKnobs` are also the fields of a recipe's `finmerge.eval:` and `finmerge.sweep:`
sections (finmerge.reproduce.settings), so each setting, its default and its description are written
once, here.
"""

from typing import Annotated, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from finmerge.safety.dtypes import COMMON, dtype_name


class Want(str):
    """What a field's value must be, in the words an error message and the docs use."""


Count = Annotated[int, Field(ge=1), Want("a positive integer")]
FilePath = Annotated[str, Field(min_length=1)]
OptionalFile = Annotated[Optional[FilePath], Want("a file path (string)")]  # None: not given
Switch = Annotated[bool, Want("true or false")]
OptionalWord = Annotated[Optional[str], Want("a string")]
QASets = Annotated[Dict[str, FilePath], Want("a mapping of set name to JSONL file path")]


class EvalData(BaseModel):
    """The files an evaluation reads."""

    model_config = ConfigDict(extra="forbid")

    text: OptionalFile = Field(None, description="Held-out domain text for perplexity: .txt (documents separated by "
                                             "blank lines) or .jsonl with `text`.")
    qa: QASets = Field(default_factory=dict, description="Chat question sets: set name -> JSONL file of "
                                                         "{question, answer[, choices]}.")


class EvalKnobs(BaseModel):
    """How the answers are produced and scored."""

    model_config = ConfigDict(extra="forbid")

    max_len: Count = Field(512, description="Window length (tokens) for perplexity.")
    max_new_tokens: Count = Field(32, description="Answer length limit for greedy chat answers.")
    batch_size: Count = Field(16, description="Sequences per forward pass.")
    generate: Switch = Field(True, description="Also generate greedy answers (false: likelihood metrics only).")
    turn_end: OptionalWord = Field(None, description="Token that must end a chat answer, e.g. `<|im_end|>` (default: each "
                                             "model's own eos).")


class EvalSettings(EvalData, EvalKnobs):
    """Everything `evaluate` needs: the recipe-level fields above plus what the command line decides."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    chat_template_from: Optional[str] = None
    trust_remote_code: bool = False
    allow_pickle: bool = False  # accept models stored only as pickled .bin weights
    harness_tasks: List[str] = Field(default_factory=list)  # lm-evaluation-harness tasks (the `harness` extra)
    harness_include: Optional[str] = None  # folder of extra task YAMLs
    device: str = "cpu"  # cpu, cuda, mps, or auto (accelerate's device_map="auto")
    dtype: str = "float32"  # auto (the checkpoint's own) or a dtype, spelled as torch or mergekit do (bf16 too)
    chat_template: Optional[str] = None  # a Jinja chat template (e.g. a recipe's) every model is asked through
    fin_harness: Optional[str] = None  # local clone of pfnet-research/japanese-lm-fin-harness
    fin_tasks: List[str] = Field(default_factory=list)  # default: all five
    fin_prompt: Optional[str] = None  # prompt version; default finmerge.evaluation.fin_harness.DEFAULT_PROMPT
    chabsa_archive: Optional[str] = None  # the downloaded chABSA archive (.zip) for the chabsa task
    show_progress: bool = True  # a tqdm bar per model

    @field_validator("dtype")
    @classmethod
    def _torch_name(cls, value: str) -> str:
        return dtype_name(value, ("auto", *COMMON))
