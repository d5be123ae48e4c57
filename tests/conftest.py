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
def tiny_moe_path(tmp_path_factory):
    """The 26B-A4B in miniature: the large family's format, with a block of experts in every layer."""
    from helpers.tiny import build_tiny_gemma4

    return build_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4-moe"), moe=True)


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


@pytest.fixture(scope="session")
def random_adapter_run(tmp_path_factory, tiny_path):
    """A run folder as helpers.runner leaves it (manifest, class names, adapter + its prompt), without the
    training: the LoRA weights are random, so the adapter changes the model and a merge has work to do."""
    import torch
    from transformers import AutoModelForMultimodalLM

    from helpers.data import DIGIT_NAMES
    from helpers.modeling import apply_lora
    from helpers.run.config import RunConfig
    from helpers.run.folder import (
        adapter_staging,
        build_manifest,
        publish_adapter,
        write_class_names,
        write_manifest,
    )

    run_dir = tmp_path_factory.mktemp("random-adapter-run")
    config = RunConfig(model_id=str(tiny_path), train_size=32, eval_size=16, lora_r=4, output_dir=str(run_dir))
    write_manifest(run_dir, build_manifest(config.to_dict(), {"class_names": list(DIGIT_NAMES)},
                                           {"model_id": str(tiny_path)}))
    write_class_names(run_dir, list(DIGIT_NAMES))
    model = apply_lora(AutoModelForMultimodalLM.from_pretrained(tiny_path), r=4, alpha=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    staging = adapter_staging(run_dir)
    model.save_pretrained(staging)
    publish_adapter(run_dir, staging, config.prompt())
    return run_dir
