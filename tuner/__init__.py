"""The tuner: trainers, the adapter registry, the eval gate and reload."""

from tuner.gate import GateError, compare_rates, decide, gate, gate_table, run_gate
from tuner.registry import Registry, RegistryError
from tuner.reload import LocalReloader, Reloader, ReloadError, VllmReloader
from tuner.sanity import SanityError
from tuner.schemas import AdapterRecord, GateResult, Guard, TrainConfig, TrainResult, Verdict
from tuner.train import TrainError, build_trainer, train, tune

__all__ = [
    "AdapterRecord",
    "GateError",
    "GateResult",
    "Guard",
    "LocalReloader",
    "Registry",
    "RegistryError",
    "ReloadError",
    "Reloader",
    "SanityError",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "Verdict",
    "VllmReloader",
    "build_trainer",
    "compare_rates",
    "decide",
    "gate",
    "gate_table",
    "run_gate",
    "train",
    "tune",
]
