"""Plumbing: where and how work runs. ``hardware`` (profiles, detection, preflight),
``requirements`` (what each task needs), ``launch`` + ``guard`` (the training child, which dies with its
flow), ``cluster`` + ``node`` (SFT on N nodes through Kubeflow Trainer), ``fsdp`` (sharded training),
``attention`` (attention inside packed rows), ``vllm_cpu`` (vLLM's CPU build). Never imports a stage."""
