import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(2)

# CI runs the same examples every time (a red build is reproducible, never a dice roll) and keeps no
# example database; local runs explore new examples and replay earlier failures from the database.
# Model captures are slow and their time varies with the machine's load, so neither has a deadline.
# (Hypothesis loads its own "ci" profile when CI is set: both are built on its plain defaults instead.)
settings.register_profile(
    "ci", settings.get_profile("default"), derandomize=True, database=None, deadline=None, print_blob=True
)
settings.register_profile("dev", settings.get_profile("default"), deadline=None, print_blob=True)


def pytest_configure(config):
    """Load the profile for this environment unless one was asked for with --hypothesis-profile."""
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(scope="session")
def minilm():
    """The embedded all-MiniLM-L6-v2 and its tokenizer (loaded once)."""
    from fxcook.models import load_model

    return load_model("minilm")


@pytest.fixture(scope="session")
def minilm_cooked(minilm):
    """MiniLM captured with no passes (shared, read-only: compile again to modify)."""
    import fxcook
    from fxcook.models import example_batch

    model, tok = minilm
    return fxcook.capture(model, example_batch(tok, ["a first sentence here", "and a second, longer one to pad"]))
