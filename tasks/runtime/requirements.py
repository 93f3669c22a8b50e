"""What each task of the retrain flow needs from the machine, declared once, here.

A ``TaskNeed`` per task (the data stage and the release need no GPU and are not listed) says which
parameter decides it and resolves it to a profile (``tasks/runtime/hardware.py``). Three things follow from
it and from nothing else:

- the task run's **tags**: ``gpu`` for a GPU task, so it holds a slot of the ``gpu`` tag limit that
  ``tuneline deploy`` sets from ``infra/work-pools.yaml``; ``cpu`` otherwise;
- the **preflight** the flow runs before anything is loaded (``check_needs``), one line naming the
  task, the parameter, the requirement and what was found; each GPU task checks again itself, so a
  task started on its own is held to the same requirement;
- the **device** evaluation and merge run on (``cuda`` or ``cpu``).

Which GPU tasks there are: ``lora_sft`` (``sft.profile``; none with ``sft.cluster.mode: kubeflow``,
whose pods train), ``grpo`` (``grpo.profile``), ``merge_lora``
when ``merge.device`` is ``cuda``, and ``evaluate`` when the run trains on a GPU (``eval.device: auto``
follows ``sft.profile``; ``cpu`` or ``cuda`` pins it).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.runtime.hardware import PROFILES, GpuRequirement, HardwareError, Machine, Profile, resolve_profile, satisfies

#: One card of any kind: merge and evaluation on a GPU (precision then follows the card).
ONE_GPU = Profile("one-gpu", GpuRequirement(1), "bf16", notes="merge or evaluation on one card")
#: SFT on a cluster (``sft.cluster.mode: kubeflow``): the nodes train, the task needs no GPU.
ON_CLUSTER = Profile("cluster", GpuRequirement(0), "fp32", notes="training runs in a Kubeflow TrainJob's pods")


@dataclass(frozen=True)
class TaskNeed:
    """A task's requirement: the profile it runs with and the parameter that decided it."""

    task: str  # the Prefect task's name
    decided_by: str  # e.g. "sft.profile=auto"
    profile: Profile

    @property
    def requirement(self) -> GpuRequirement:
        return self.profile.requirement

    @property
    def on_gpu(self) -> bool:
        return self.requirement.gpus > 0

    @property
    def device(self) -> str:
        return "cuda" if self.on_gpu else "cpu"

    @property
    def tags(self) -> list[str]:
        """``gpu`` holds a slot of the ``gpu`` tag limit; ``cpu`` does not."""
        return ["gpu"] if self.on_gpu else ["cpu"]

    def describe(self) -> str:
        # "sft.profile=auto → v100": the profile auto chose (merge and evaluation have no profile to name)
        named = self.decided_by.startswith(("sft.profile=", "grpo.profile=")) and not self.decided_by.endswith(
            f"={self.profile.name}"
        )
        resolved = f" → {self.profile.name}" if named else ""
        return f"{self.task} ({self.decided_by}{resolved}): {self.requirement.describe()}"


def _resolve(task: str, decided_by: str, name: str, machine: Machine | None) -> TaskNeed:
    try:
        return TaskNeed(task, decided_by, resolve_profile(name, machine))  # type: ignore[arg-type]
    except HardwareError as e:
        raise HardwareError(f"{task} ({decided_by}): {e}") from None


def sft_need(profile: str, machine: Machine | None = None, cluster: str = "none") -> TaskNeed:
    """``sft.cluster.mode`` other than ``none``: the training runs in a cluster's pods (tasks/runtime/cluster.py)
    and the task only submits and follows it, so it needs no GPU and its flow run stays on a CPU pool."""
    if cluster != "none":
        return TaskNeed("lora_sft", f"sft.cluster.mode={cluster}", ON_CLUSTER)
    return _resolve("lora_sft", f"sft.profile={profile}", profile, machine)


def grpo_need(profile: str, machine: Machine | None = None) -> TaskNeed:
    return _resolve("grpo", f"grpo.profile={profile}", profile, machine)


def merge_need(device: str) -> TaskNeed:
    return TaskNeed("merge_lora", f"merge.device={device}", ONE_GPU if device == "cuda" else PROFILES["cpu"])


def evaluate_need(device: str, sft: TaskNeed) -> TaskNeed:
    """``auto``: on a GPU when the run trains on one, else on the CPU (the demo), whatever the machine has."""
    on_gpu = sft.on_gpu if device == "auto" else device == "cuda"
    decided = f"eval.device=auto, {sft.decided_by}" if device == "auto" else f"eval.device={device}"
    return TaskNeed("evaluate", decided, ONE_GPU if on_gpu else PROFILES["cpu"])


def check_needs(needs: list[TaskNeed], machine: Machine) -> None:
    """Raise ``HardwareError`` for the first task this machine cannot run, naming both sides."""
    for need in needs:
        if not satisfies(machine, need.requirement):
            raise HardwareError(f"{need.describe()}; {machine.describe()}")
