"""Stage: GRPO after SFT (optional). ``stage`` holds the Prefect task ``grpo`` and the child's entry
(``python -m tasks.grpo.stage JOB.json``); ``plan`` holds ``GRPOParams`` and its plans; ``rewards`` the
rule-based TRL reward functions; ``vllm_setup`` the vLLM rollout engine's setup and weight-sync check."""
