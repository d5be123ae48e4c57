"""Shared fixtures: the tiny offline Gemma 4 is built once per test session into a temp folder."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """The default tiny checkpoint: the large family's format (12B, 26B-A4B, 31B)."""
    from helpers.tiny import build_tiny_gemma4

    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4"))


@pytest.fixture(scope="session")
def tiny_e_series_path(tmp_path_factory):
    """The tiny checkpoint in the E-series format (E2B, E4B): no thought channel, clipping on."""
    from helpers.tiny import build_tiny_gemma4

    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4-e-series"), family="e-series")


@pytest.fixture(scope="session")
def tiny_e_series_processor(tiny_e_series_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_e_series_path)


@pytest.fixture(scope="session")
def tiny_processor(tiny_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture()
def tiny_model(tiny_path):
    from transformers import AutoModelForMultimodalLM

    return AutoModelForMultimodalLM.from_pretrained(tiny_path)
