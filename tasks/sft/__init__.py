"""Stage: LoRA SFT. ``stage`` holds the Prefect task ``lora_sft`` and the training child's entry
(``python -m tasks.sft.stage JOB.json``); ``plan`` holds ``SFTParams`` and the batch, memory and speed
plans (importable without the training code)."""
