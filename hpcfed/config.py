"""The job schema: TOML job files, dotted overrides, validation, the resolved job.

Typed, flat and boring (architecture.md): pydantic models with unknown keys forbidden and no
implicit coercion of ill-typed values, so a typo or a string where a number belongs is a clear
error naming the key. Every problem the user can fix raises :class:`UserError` (exit code 2).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class UserError(Exception):
    """The user's input is wrong: the CLI prints the message on one line and exits 2."""


ALGORITHMS = ("fedavg",)  # grows as the methods land: superfed, fedpt, resfed, hadfl, prism


class _Strict(BaseModel):
    # strict=True: "5" is not an int, 1 is not a string; ints are still accepted for floats.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class DataConfig(_Strict):
    dataset: Literal["digits", "synthetic", "h5", "mnist", "cifar10"] = "digits"
    partition: Literal["iid", "dirichlet", "classes", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration
    classes_per_client: int = Field(2, ge=1)  # partition = "classes"
    num_clients: int = Field(100, ge=1)
    path: str | None = None  # h5 training file, or the torchvision root (mnist, cifar10)
    test_path: str | None = None  # h5 test file
    synthetic_alpha: float = Field(1.0, ge=0)  # LEAF Synthetic(alpha, beta)
    synthetic_beta: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _paths(self) -> DataConfig:
        if self.dataset == "h5" and (self.path is None or self.test_path is None):
            raise ValueError("dataset 'h5' needs data.path and data.test_path")
        if self.dataset in ("mnist", "cifar10") and self.path is None:
            raise ValueError(f"dataset '{self.dataset}' needs data.path (a local torchvision root)")
        if self.partition == "natural" and self.dataset not in ("h5", "synthetic"):
            raise ValueError("partition 'natural' exists only for datasets 'h5' and 'synthetic'")
        return self


class ModelConfig(_Strict):
    name: Literal["mlp", "cnn", "resnet8", "resnet18"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [128])  # mlp hidden widths
    # BatchNorm statistics do not average well across non-IID clients (and the methods'
    # authors disable BN), so ResNets default to GroupNorm; "batch" is there for comparison.
    norm: Literal["group", "batch", "none"] = "group"


class TrainConfig(_Strict):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(10, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class FedAvgConfig(_Strict):
    # FedAvg's server step on the averaged update (pseudo-gradient). "sgd" with lr 1 is plain
    # FedAvg; momentum gives FedAvgM (Hsu et al. 2019); "adam" gives FedAdam (Reddi et al. 2021).
    server_optimizer: Literal["sgd", "adam"] = "sgd"
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # FedAdam's adaptivity


class CompressConfig(_Strict):
    """Compression of any algorithm's messages through the codecs (top-k, then quantisation)."""

    sparsity: float = Field(0.0, ge=0, lt=1)  # fraction of entries dropped by a global top-k
    quantization: Literal["none", "uniform", "median", "sign"] = "none"
    bits: int = Field(8, ge=1, le=8)  # uniform: bit width; median: q (2^(q-1) levels per sign)
    rounding: Literal["nearest", "stochastic"] = "nearest"  # uniform quantisation
    error_feedback: bool = False  # what the codec dropped is added to the sender's next message
    direction: Literal["up", "down", "both"] = "up"

    @property
    def active(self) -> bool:
        return self.sparsity > 0 or self.quantization != "none"


class JobConfig(_Strict):
    name: str = "run"
    algorithm: str
    seed: int = Field(0, ge=0)
    rounds: int = Field(50, ge=1)
    clients_per_round: int = Field(10, ge=1)
    eval_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    checkpoint_keep: int = Field(3, ge=1)
    out: str = "runs"
    # "balanced": clients go to ranks greedily by sample count each round, so ranks finish
    # together; "fixed": client c always lives on rank c % world_size (per-client state).
    placement: Literal["balanced", "fixed"] = "balanced"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    fedavg: FedAvgConfig = Field(default_factory=FedAvgConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        if self.clients_per_round > self.data.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds "
                f"data.num_clients ({self.data.num_clients})"
            )
        if "/" in self.name or self.name in ("", ".", ".."):
            raise ValueError("name must be a plain folder name")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name


# --------------------------------------------------------------------------- loading


def _first_error(exc: ValidationError, where: str) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key '{key}'"
    if err["type"] == "missing":
        return f"{where}: missing required key '{key}'"
    if key:
        return f"{where}: key '{key}': {msg} (got {err.get('input')!r})"
    return f"{where}: {msg}"


def validate(raw: dict[str, Any], where: str) -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_first_error(exc, where)) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such job file")
    try:
        return tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: not valid TOML ({exc})") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value``: value is parsed as a TOML value, or taken as a bare string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise UserError(f"override {text!r}: expected dotted.key=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # bare words: out=scratch, data.dataset=digits
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {text!r}: '{part}' is not a table")
            node = child
        node[path[-1]] = value
    return raw


def load_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    raw = apply_overrides(read_toml(path), list(overrides))
    where = f"{path}" + (" (with overrides)" if overrides else "")
    return validate(raw, where)


def to_toml(job: JobConfig) -> str:
    """The resolved job as TOML text, every default filled in (None values are omitted)."""
    data = job.model_dump(exclude_none=True)
    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for k, v in data.items():
        if not isinstance(v, dict):
            lines.append(f"{k} = {_toml_value(v)}")
    for table, values in tables.items():
        lines.append(f"\n[{table}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return (
            repr(v)
            if v == v and abs(v) != float("inf")
            else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
        )
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return str(v)
