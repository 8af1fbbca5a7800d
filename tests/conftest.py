import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """base / instruct / domain tiny Llama checkpoints (fp32), built once per test session."""
    from finmerge.demo.tiny_models import build_tiny_family

    return build_tiny_family(str(tmp_path_factory.mktemp("family")))
