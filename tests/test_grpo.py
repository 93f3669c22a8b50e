"""GRPO stage: learning on the real SmolLM2 (transformers rollouts), the fallback when vLLM is missing,
bad input caught before any model is loaded, and the Prefect task's artifacts and cache.

Data: tests/fixtures/grpo_arithmetic.jsonl, 64 reasoning-gym ``basic_arithmetic`` problems (made with
``reasoning_gym.create_dataset('basic_arithmetic', size=64, seed=7, min_terms=2, max_terms=2,
min_digits=1, max_digits=1)``) as ``{"messages": [user question, assistant answer]}`` rows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tasks.grpo.stage import GRPOParams, grpo, make_job, to_prompt_rows, train
from tasks.runtime.hardware import HardwareError

FIXTURE = Path(__file__).parent / "fixtures" / "grpo_arithmetic.jsonl"
# The easy task the policy must learn in a few steps: answer with a bare (signed) number first.
NUMBER_FIRST = r"^\s*-?\d"


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter as the SFT stage saves it (fresh LoRA: B = 0, so the policy starts at the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def data_dir(tmp_path: Path, rows: int | None = None, text: str | None = None) -> Path:
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    lines = FIXTURE.read_text().splitlines()[:rows] if text is None else text.splitlines()
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d


def job_for(config: GRPOParams, model_dir: Path, adapter: Path, data: Path, tmp_path: Path) -> dict:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return make_job(config, model_dir, adapter, data, scratch, "cpu")


@pytest.fixture(scope="module")
def smollm2_adapter(smollm2_dir, tmp_path_factory) -> Path:
    return make_adapter(smollm2_dir, tmp_path_factory.mktemp("sft-adapter"))


def test_grpo_learns_the_format_on_smollm2(smollm2_dir, smollm2_adapter, tmp_path):
    """A few GRPO steps on the real model: rewards vary inside the groups (something to learn from)
    and the format reward's mean rises; the new adapter, curve and samples are written."""
    config = GRPOParams(
        enabled=True,
        rewards=["format"],
        reward_settings={"format": {"pattern": NUMBER_FIRST}},
        num_generations=8,
        per_device_batch_size=16,
        max_completion_length=6,
        temperature=1.0,
        learning_rate=2e-3,
        max_steps=6,
        seed=0,
    )
    job = job_for(config, smollm2_dir, smollm2_adapter, data_dir(tmp_path), tmp_path)
    metrics = train(job)

    history = json.loads((Path(job["output_dir"]) / "log_history.json").read_text())
    curve = [h["rewards/format_reward/mean"] for h in history if "rewards/format_reward/mean" in h]
    assert len(curve) == 6 and metrics["steps"] == 6
    assert metrics["reward_std_mean"] > 0  # non-zero variance: GRPO has advantages to learn from
    assert sum(curve[-2:]) / 2 > sum(curve[:2]) / 2 + 0.15, curve
    assert metrics["rollout_engine"] == "continuous"
    out = Path(job["output_dir"])
    assert (out / "adapter_model.safetensors").exists() and (out / "rewards.png").stat().st_size > 1000
    samples = json.loads((out / "samples.json").read_text())
    assert samples and {"prompt", "completion", "format_reward", "advantage"} <= set(samples[0])


def test_use_vllm_without_vllm_falls_back_and_says_so(tiny_model_dir, tmp_path, capfd):
    """The project venv has no vLLM: vllm.enabled still trains, with transformers' continuous batching, and
    says why."""
    pytest.importorskip("trl")
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this venv")
    config = GRPOParams(
        enabled=True,
        rewards=["format", "repetition"],
        num_generations=2,
        per_device_batch_size=2,
        max_completion_length=4,
        max_steps=1,
        vllm={"enabled": True},
    )
    job = job_for(
        config, tiny_model_dir, make_adapter(tiny_model_dir, tmp_path / "adapter"), data_dir(tmp_path, rows=4), tmp_path
    )
    metrics = train(job)
    assert metrics["steps"] == 1 and metrics["rollout_engine"] == "continuous"  # CPU: continuous batching
    assert 0 < metrics["rollout_tokens"] <= 1 * 2 * 4  # generated tokens, at most the limit
    assert "vLLM is not installed" in metrics["rollout_reason"]
    out = capfd.readouterr().out
    assert "vLLM is not installed" in out and "rollouts: continuous" in out


@pytest.mark.parametrize(
    "line, field",
    [
        ('{"text": "hi"}', "field 'messages'"),
        ('{"messages": [{"role": "user", "content": "2+2?"}]}', "field 'messages'"),
        (
            '{"messages": [{"role": "user", "content": "2+2?"}, {"role": "user", "content": "4"}]}',
            "field 'messages[-1]'",
        ),
    ],
)
def test_malformed_rows_are_named(tmp_path, line, field):
    good = FIXTURE.read_text().splitlines()[0]
    path = data_dir(tmp_path, text=f"{good}\n{line}") / "train.jsonl"
    with pytest.raises(ValueError) as e:
        to_prompt_rows(path)
    assert str(path) in str(e.value) and "row 2" in str(e.value) and field in str(e.value)


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 rewards"):
        GRPOParams(rewards=["accuracy", "format"], reward_weights=[1.0])
    with pytest.raises(ValueError, match="multiple of num_generations"):
        GRPOParams(num_generations=8, per_device_batch_size=6)
    with pytest.raises(ValueError, match="reward_settings for \\['overlong'\\]"):
        GRPOParams(rewards=["format"], reward_settings={"overlong": {"max_length": 8}})
    with pytest.raises(
        ValueError, match=r"grpo.use_vllm is now grpo.vllm.enabled"
    ):  # the old flat key names the new one
        GRPOParams(use_vllm=True)


def test_prefect_task_fails_fast_on_bad_reward_and_publishes_report(tiny_model_dir, tmp_path):
    """In a real flow: an unknown reward fails before the child starts; a good run publishes the
    adapter with curve + samples, a second run is a cache hit."""
    from prefect import flow

    from tasks.artifacts.stage_folders import publish
    from tasks.artifacts.store import store_for
    from tasks.core.stage import StageContext

    store = store_for(str(tmp_path / "root"))
    adapter = publish(store, "sft", "a" * 16, make_adapter(tiny_model_dir, tmp_path / "adapter"), {})
    dataset = publish(store, "data", "d" * 16, data_dir(tmp_path, rows=4), {})

    @flow
    def run(config: GRPOParams):
        return grpo(
            config, adapter, dataset, ctx=StageContext(base_model=str(tiny_model_dir), root=str(tmp_path / "root"))
        )

    with pytest.raises(ValueError, match="unknown reward 'speed'"):
        run(
            GRPOParams(
                enabled=True, profile="cpu", rewards=["speed"], num_generations=2, per_device_batch_size=2, max_steps=1
            )
        )
    assert not (tmp_path / "root" / "scratch" / "grpo").exists()  # nothing started

    with pytest.raises(HardwareError, match=r"^grpo \(grpo.profile=auto\): profile auto chooses among GPU"):
        run(GRPOParams(enabled=True, num_generations=2, per_device_batch_size=2, max_steps=1))  # no GPU here
    config = GRPOParams(
        enabled=True,
        profile="cpu",
        rewards=["format", "tasks.grpo.rewards:repetition_penalty_reward"],
        reward_weights=[1.0, 0.5],
        num_generations=2,
        per_device_batch_size=2,
        max_completion_length=4,
        max_steps=2,
    )
    ref = run(config)
    folder = Path(ref.uri)
    assert ref.metrics["steps"] == 2 and ref.metrics["rollout_engine"] == "continuous"
    assert {"adapter_model.safetensors", "rewards.png", "samples.json", "metrics.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert run(config).uri == ref.uri  # cache hit: same folder, no second training
    shutil.rmtree(tmp_path / "root", ignore_errors=True)
