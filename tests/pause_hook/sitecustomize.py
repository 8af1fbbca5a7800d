"""Test-only: pause a finmerge process at a known point, so a test can stop it there every time.

A test puts this folder on PYTHONPATH and sets FINMERGE_TEST_PAUSE=WHERE:MARKER. Python imports
`sitecustomize` at start-up; at WHERE the process writes MARKER (the test waits for it) and sleeps,
so the signal the test then sends arrives while that step is in progress:
- `swap`: a domain_instruct merge, its scratch folder complete, just before it is moved into OUT;
- `measure`: `finmerge diagnose`, before the first tensor is measured.
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


if _WHERE == "swap":
    import finmerge.plugins.run as _run

    _run._move_into_place = _pausing(_run._move_into_place)
elif _WHERE == "measure":
    import finmerge.plugins.diagnostics.standalone as _standalone

    _standalone._Measurer.measure = _pausing(_standalone._Measurer.measure)
