"""Peak allocated bytes measured on one NVIDIA H200 (or H100, where its group says), against which ``tests/test_memory_plan.py`` checks
``helpers.teaching.memory.plan``: the planner that picks a run's micro-batch must stay close to what training
really allocates.

Each row is one ``benchmarks/gpu_train_bench.py`` variant's ``peak_alloc`` (``torch.cuda.max_memory_allocated``
over the training steps), read off the result file in ``benchmarks/results/`` named above its group (the first
group: ``train_run1.json``, ``train_run2.json``, ``train_run3.json``). Every run: 224x224 images at budget 280
(256 image tokens, 2,520 patches), ~29 text tokens, LoRA all-linear; ``plan`` keyword arguments as recorded.
Reference rows quantize with the seed's default skip list (the vision tower in NF4).
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
    # train_run4_run5.json: one process per row; micro-batch 1 x 4, 2 optimizer steps, so the optimizer state
    # is counted
    ("31B ours-q-mb1-r16 (2 steps)", "31B", {"quantization": "4bit", "lora_r": 16, "micro_batch": 1,
                                             "gradient_checkpointing": True}, 20_997_935_616),
    ("31B ours-q-mb1-r16-adam8", "31B", {"quantization": "4bit", "lora_r": 16, "micro_batch": 1,
                                         "gradient_checkpointing": True, "optimizer": "adamw_8bit"}, 20_734_764_544),
    ("31B ours-qv-mb1-r16", "31B", {"quantization": "4bit", "lora_r": 16, "micro_batch": 1,
                                    "gradient_checkpointing": True, "quantize_towers": True}, 20_188_349_440),
    ("31B ours-qv-mb1-r16-adam8", "31B", {"quantization": "4bit", "lora_r": 16, "micro_batch": 1,
                                          "gradient_checkpointing": True, "quantize_towers": True,
                                          "optimizer": "adamw_8bit"}, 19_925_178_368),
    # train_run4_run5.json: E4B bf16 LoRA, fast clamps with finite bounds
    ("E4B ours-bf16 (fast clamps)", "E4B", {"quantization": "none", "lora_r": 64, "micro_batch": 16,
                                            "lora_dtype": "fp32"}, 112_781_620_736),
    ("E4B ours-bf16-lora16", "E4B", {"quantization": "none", "lora_r": 64, "micro_batch": 16}, 108_304_979_456),
    ("E4B ours-bf16-liger", "E4B", {"quantization": "none", "lora_r": 64, "micro_batch": 16, "lora_dtype": "fp32",
                                    "liger": True}, 96_757_303_296),
    ("E4B ours-bf16-compile", "E4B", {"quantization": "none", "lora_r": 64, "micro_batch": 32, "lora_dtype": "fp32",
                                      "compiled": True}, 133_953_498_624),
    # train_issue19_runB_31b.json: the 31B trained by the shipped path, with Liger's kernels (benchmarks/liger.py)
    # and with compile_layers on the 4-bit model; these two fitted the planner's Liger and compiled factors
    ("31B ours-q-liger-helper", "31B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 8, "liger": True},
     114_176_802_816),
    ("31B ours-q-compile", "31B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 8, "compiled": True},
     97_085_303_808),
    # train_12b_run1.json: the 12B, one process for all five rows; the two micro-batch-1 rows check the
    # planner's predictions, the others fitted ACTIVATION_BYTES_PER_UNIT["12B"]
    ("12B ref", "12B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 1, "gradient_checkpointing": True,
                        "loss": "full", "skip_modules": REF_SKIP}, 11_161_631_744),
    ("12B ours-q-mb1-r16", "12B", {"quantization": "4bit", "lora_r": 16, "micro_batch": 1,
                                   "gradient_checkpointing": True}, 8_531_667_968),
    ("12B ours-q", "12B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 32}, 128_617_281_024),
    ("12B ours-bf16", "12B", {"quantization": "none", "lora_r": 64, "micro_batch": 16, "lora_dtype": "fp32"},
     94_358_237_184),
    ("12B ours-bf16-compile", "12B", {"quantization": "none", "lora_r": 64, "micro_batch": 16, "lora_dtype": "fp32",
                                      "compiled": True}, 70_705_439_232),
    # train_4bit_compiled_h200.json: the 4-bit models eager and compiled at the planner's micro-batch (one process
    # for all six rows)
    ("12B ours-q (16)", "12B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 16}, 69_778_400_256),
    ("26B-A4B ours-q-compile", "26B-A4B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 8, "compiled": True},
     95_539_883_520),
    ("12B ours-q-compile", "12B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 32, "compiled": True},
     91_266_950_656),
    ("E4B ours-q", "E4B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 16}, 102_979_192_320),
    ("E4B ours-q-compile", "E4B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 32, "compiled": True},
     124_841_801_216),
    # train_26b_experts_h200.json: the 26B-A4B at rank 16, with and without LoRA on its experts
    ("26B-A4B ours-q-r16-ckpt", "26B-A4B", {"quantization": "4bit", "lora_r": 16, "micro_batch": 16,
                                            "gradient_checkpointing": True}, 56_809_027_584),
    ("26B-A4B ours-q-experts-r16-ckpt", "26B-A4B", {"quantization": "4bit", "lora_r": 16, "micro_batch": 16,
                                                    "gradient_checkpointing": True, "lora_experts": True},
     60_615_419_904),
    ("26B-A4B ours-q-experts-r16", "26B-A4B", {"quantization": "4bit", "lora_r": 16, "micro_batch": 4,
                                               "lora_experts": True}, 134_501_593_088),
    # train_defaults_h100.json, one NVIDIA H100 80GB: docs/one-gpu.md's command with the default speed switches,
    # at the micro-batch the planner chose for 80 GB (one process for all rows)
    ("31B default (H100)", "31B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 4, "compiled": True},
     60_367_246_848),
    ("26B-A4B default (H100)", "26B-A4B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 4, "compiled": True},
     72_942_118_912),
    ("12B default (H100)", "12B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 16, "compiled": True},
     50_331_748_864),
    # train_e2b_h100.json, one NVIDIA H100 80GB: E2B, first measured here; the eager row fitted
    # ACTIVATION_BYTES_PER_UNIT["E2B"], the compiled ones check E4B's compiled factor on it
    ("E2B ours-q (H100)", "E2B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 8}, 48_119_863_808),
    ("E2B ours-q-compile (H100)", "E2B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 16, "compiled": True},
     57_063_401_984),
    ("E2B default (H100)", "E2B", {"quantization": "none", "lora_r": 64, "micro_batch": 16, "lora_dtype": "fp32",
                                   "compiled": True}, 61_371_608_064),
    ("E4B default (H100)", "E4B", {"quantization": "none", "lora_r": 64, "micro_batch": 16, "lora_dtype": "fp32",
                                   "compiled": True}, 76_280_521_216),
    # train_31b_clonegrads_h200.json, one NVIDIA H200: the 31B's defaults at the micro-batch the planner chose there
    ("31B default (H200)", "31B", {"quantization": "4bit", "lora_r": 64, "micro_batch": 8, "compiled": True},
     97_085_305_856),
]
