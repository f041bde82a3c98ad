import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


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
