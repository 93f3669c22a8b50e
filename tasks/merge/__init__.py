"""Stage: merge the LoRA adapter into the base and verify it. ``stage`` holds the Prefect task
``merge_lora`` and ``merge`` (peft's merge, checked by logits); ``stream`` merges shard file by shard
file for models bigger than memory (``merge.method=stream``)."""
