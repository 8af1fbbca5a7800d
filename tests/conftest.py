import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one torch thread each (and in the commands they start), so
    # that the workers share the cores instead of oversubscribing them. Set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """base / instruct / domain tiny Llama checkpoints (fp32), built once per test session."""
    from finmerge.demo.tiny_models import build_tiny_family

    return build_tiny_family(str(tmp_path_factory.mktemp("family")))
