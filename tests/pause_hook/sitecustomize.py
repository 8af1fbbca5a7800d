"""Test-only: pause a finmerge process at a known point, so a test can stop it there every time.

A test puts this folder on PYTHONPATH and sets FINMERGE_TEST_PAUSE=WHERE:MARKER. Python imports
`sitecustomize` at start-up; at WHERE the process writes MARKER (the test waits for it) and sleeps,
so the signal the test then sends arrives while that step is in progress:
- `swap`: a domain_instruct merge, its scratch folder complete, just before it is moved into OUT;
- `measure`: `finmerge diagnose`, before the first tensor is measured;
- `stepN` (e.g. `step5`): pretraining, at the start of optimizer step N, every checkpoint before it
  complete; it goes on once MARKER.go exists (the test creates it after sending its signal: a signal
  that only sets a flag does not end a sleep).
Everything else runs the real code.
"""

import os
import time

_WHERE, _, _MARKER = os.environ.get("FINMERGE_TEST_PAUSE", "").partition(":")


def _pausing(function):
    def paused(*args, **kwargs):
        with open(_MARKER, "w", encoding="utf-8") as handle:
            handle.write(str(os.getpid()))
        time.sleep(120)
        return function(*args, **kwargs)

    return paused


def _pause_until_go():
    with open(_MARKER, "w", encoding="utf-8") as handle:
        handle.write(str(os.getpid()))
    deadline = time.time() + 300
    while not os.path.exists(_MARKER + ".go") and time.time() < deadline:
        time.sleep(0.05)


if _WHERE.startswith("step"):
    import transformers

    _training_step = transformers.Trainer.training_step
    _STEPS_DONE = int(_WHERE[len("step"):]) - 1

    def _step(self, *args, **kwargs):
        if self.state.global_step == _STEPS_DONE and not os.path.exists(_MARKER):
            _pause_until_go()
        return _training_step(self, *args, **kwargs)

    transformers.Trainer.training_step = _step
elif _WHERE == "swap":
    import finmerge.plugins.run as _run

    _run._move_into_place = _pausing(_run._move_into_place)
elif _WHERE == "measure":
    import finmerge.diagnostics.standalone as _standalone

    _standalone._Measurer.measure = _pausing(_standalone._Measurer.measure)
