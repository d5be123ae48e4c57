"""Peak allocated bytes measured on one NVIDIA H200 (2026-11-28), for helpers.memory.plan's tests.

Read off benchmarks/results/train_run{1,2,3}.json (``peak_alloc`` = torch.cuda.max_memory_allocated over
the training steps). Every run: 224x224 images at budget 280 (256 image tokens, 2,520 patches), ~29 text
tokens, LoRA all-linear; ``plan`` keyword arguments as recorded. Reference rows quantize with the seed's
default skip list (the vision tower in NF4).
"""

REF_SKIP = ["lm_head", "model.embed_vision.embedding_projection", "model.language_model.embed_tokens"]

MEASURED = [
    # (run, size, plan kwargs, peak allocated bytes)
    ("31B ref", "31B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 1, "gradient_checkpointing": True,
                            "loss": "full", "skip_modules": REF_SKIP}, 24_151_975_424),
    ("31B ref-trl", "31B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 1, "gradient_checkpointing": True,
                                "skip_modules": REF_SKIP}, 23_518_690_816),
    ("31B ours-q-mb1-r64", "31B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 1,
                                       "gradient_checkpointing": True}, 23_550_016_000),
    ("31B ours-q-mb1-r16", "31B", {"quantization": "4bit", "lora_r": 16, "micro_batch": 1,
                                       "gradient_checkpointing": True}, 20_557_768_704),
    ("31B ours-q", "31B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 8}, 129_620_916_736),
    ("31B ours-q-liger", "31B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 8, "liger": True}, 106_584_477_184),
    ("31B ours-bf16", "31B", {"quantization": "none", "lora_r": 64, "micro_batch": 4}, 120_028_161_024),
    ("26B-A4B ref", "26B-A4B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 1, "gradient_checkpointing": True,
                                    "loss": "full", "skip_modules": REF_SKIP}, 50_805_123_584),
    ("26B-A4B ours-q", "26B-A4B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 8}, 117_442_506_240),
    ("E4B ref", "E4B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 1, "gradient_checkpointing": True,
                            "loss": "full", "skip_modules": REF_SKIP}, 12_158_641_664),
    ("E4B ours-bf16", "E4B", {"quantization": "none", "lora_r": 64, "micro_batch": 16, "lora_dtype": "fp32"},
     120_213_404_160),
]
