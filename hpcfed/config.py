"""The job schema: TOML job files, dotted overrides, validation, the resolved job.

Typed, flat and boring (architecture.md): pydantic models with unknown keys forbidden and no
implicit coercion of ill-typed values, so a typo or a string where a number belongs is a clear
error naming the key. Every problem the user can fix raises :class:`UserError` (exit code 2).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpcfed import registry
from hpcfed.errors import UserError

__all__ = ["JobConfig", "UserError", "load_job", "validate"]

# The built-in algorithms (their classes are behind hpcfed.registry, as user algorithms are).
ALGORITHMS = tuple(registry.BUILTINS["algorithm"])


class _Strict(BaseModel):
    # strict=True: "5" is not an int, 1 is not a string; ints are still accepted for floats.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class DataConfig(_Strict):
    # a built-in (digits | synthetic | h5 | mnist | cifar10) or "module:load", called as
    # load(seed, **options) -> hpcfed.FederatedData
    dataset: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the dataset's loader
    partition: Literal["iid", "dirichlet", "classes", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)  # Dirichlet concentration
    classes_per_client: int = Field(2, ge=1)  # partition = "classes"
    num_clients: int = Field(100, ge=1)
    path: str | None = None  # h5 training file, or the torchvision root (mnist, cifar10)
    test_path: str | None = None  # h5 test file
    synthetic_alpha: float = Field(1.0, ge=0)  # LEAF Synthetic(alpha, beta)
    synthetic_beta: float = Field(1.0, ge=0)

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, v: str) -> str:
        return registry.check_name("data.dataset", v)

    @model_validator(mode="after")
    def _paths(self) -> DataConfig:
        if self.dataset == "h5" and (self.path is None or self.test_path is None):
            raise ValueError("dataset 'h5' needs data.path and data.test_path")
        if self.dataset in ("mnist", "cifar10") and self.path is None:
            raise ValueError(f"dataset '{self.dataset}' needs data.path (a local torchvision root)")
        # (a user dataset's clients are known only once it is built: checked at start-up)
        if self.partition == "natural" and self.dataset in ("digits", "mnist", "cifar10"):
            raise ValueError("partition 'natural' exists only for datasets 'h5' and 'synthetic'")
        return self


class ModelConfig(_Strict):
    # a built-in (mlp | cnn | resnet8 | resnet18 | elastic_mlp | elastic_resnet) or "module:build",
    # called as build(input_shape, num_classes, **options) -> torch.nn.Module
    name: str = "mlp"
    options: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the model's builder
    hidden: list[int] = Field(default_factory=lambda: [128])  # mlp hidden widths
    # BatchNorm statistics do not average well across non-IID clients (and the methods'
    # authors disable BN), so ResNets default to GroupNorm; "batch" is there for comparison.
    norm: Literal["group", "batch", "none"] = "group"
    # elastic_resnet (SuperFed's supernet): output channels of each stage, most blocks per stage
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64])
    blocks: list[int] = Field(default_factory=lambda: [3, 3, 3])
    # one fixed subnet of an elastic model, trained by any algorithm (SuperFed's iFedAvg baseline):
    # "smallest" | "largest" | a spec (TOML table or JSON text); resolved to a spec in the job
    subnet: str | dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return registry.check_name("model.name", v)


class TrainConfig(_Strict):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(10, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # "cross_entropy" | "mse" | "module:fn", called as fn(outputs, targets) -> scalar tensor (the mean)
    loss: str = "cross_entropy"
    # clients of a rank trained at once, vectorised (hpcfed/executor.py): 1 = one after another;
    # "auto": groups where the model is a Linear/ReLU stack it is measured to speed up, else 1
    parallel_clients: int | Literal["auto"] = "auto"

    @field_validator("loss")
    @classmethod
    def _loss_name(cls, v: str) -> str:
        return registry.check_name("train.loss", v)

    @field_validator("parallel_clients")
    @classmethod
    def _parallel(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError('expected "auto" or a positive number of clients')
        return v


class FedAvgConfig(_Strict):
    # FedAvg's server step on the averaged update (pseudo-gradient). "sgd" with lr 1 is plain
    # FedAvg; momentum gives FedAvgM (Hsu et al. 2019); "adam", "adagrad", "yogi" give FedAdam,
    # FedAdagrad, FedYogi (Reddi et al. 2021, Algorithm 2: beta1 momentum, tau adaptivity).
    server_optimizer: Literal["sgd", "adam", "adagrad", "yogi"] = "sgd"
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)  # adaptivity of FedAdam / FedAdagrad / FedYogi


class FedProxConfig(_Strict):
    """FedProx (algorithm = "fedprox"): the proximal term mu/2 ||w - w_global||^2 in local training."""

    mu: float = Field(0.01, ge=0)  # 0 is FedAvg exactly


class ScaffoldConfig(_Strict):
    """SCAFFOLD (algorithm = "scaffold"): control variates correct each local gradient."""

    # "II": c_i+ = c_i - c + (x - y_i) / (K lr), free; "I": c_i+ = the full gradient at x (one pass)
    control_update: Literal["II", "I"] = "II"
    server_lr: float = Field(1.0, gt=0)  # eta_g, the global step size
    state: Literal["memory", "disk"] = "memory"  # per-client control variates: heap, or HDF5 per rank


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


class FedPTConfig(_Strict):
    """FedPT (algorithm = "fedpt"): which parameters train; the rest stay at their seeded values.

    Exactly one of ``freeze`` ("largest": the layer holding the most parameters, or a list of
    parameter-name globs such as ``["fc1.*"]``) and ``trainable`` (globs; ``["*"]`` trains all)."""

    freeze: str | list[str] | None = None
    trainable: list[str] | None = None
    # client lr = train.lr x lr_scale. "auto": x40 (HEAD_LR_SCALE in algorithms/fedpt.py) without
    # [dp] when every trainable parameter comes after every frozen one (a head on frozen random
    # features, a convex problem that needs and tolerates a larger step: docs/fedpt.md), else x1.
    # 1.0: the paper's plain reading.
    lr_scale: float | Literal["auto"] = "auto"

    @model_validator(mode="after")
    def _one_choice(self) -> FedPTConfig:
        if not isinstance(self.lr_scale, str) and not (self.lr_scale > 0 and math.isfinite(self.lr_scale)):
            raise ValueError(f'fedpt.lr_scale must be "auto" or a positive number (got {self.lr_scale})')
        if self.freeze is not None and self.trainable is not None:
            raise ValueError("give fedpt.freeze or fedpt.trainable, not both")
        if isinstance(self.freeze, str) and self.freeze != "largest":
            raise ValueError(f'fedpt.freeze must be "largest" or a list of name globs, not {self.freeze!r}')
        if self.trainable == []:
            raise ValueError("fedpt.trainable is empty: nothing would train")
        return self


DP_ALGORITHMS = ("fedavg", "fedpt")  # the strategies that implement [dp]


class DPConfig(_Strict):
    """DP-FedAvg (McMahan et al. 2018): a ``[dp]`` table in the job turns it on."""

    clip: float = Field(1.0, gt=0)  # S: each client's update is clipped to L2 norm <= S
    noise_multiplier: float = Field(1.0, ge=0)  # sigma: N(0, sigma^2 S^2) added to the sum
    delta: float = Field(1e-5, gt=0, lt=1)  # epsilon is reported for this delta
    secure_noise: bool = False  # true: OS entropy on rank 0, broadcast (not reproducible)


class PrismConfig(_Strict):
    """PriSM (algorithm = "prism"): clients train sub-models of sampled principal kernels."""

    keep: float | list[float] = 0.2  # fraction of each layer's kernels a client trains; a list: levels
    keep_probs: list[float] | None = None  # share of clients at each keep level (default: equal)
    gamma: float = Field(3.0, ge=0)  # kernel i is sampled with p_i ∝ s_i^gamma
    sampling: Literal["principal", "uniform", "top", "channels"] = "principal"  # channels: HeteroFL
    out_keep: float = Field(1.0, gt=0, le=1)  # low-rank activations: share of U's output channels
    layers: Literal["conv", "all"] = "conv"  # "all": hidden linear layers are factorised too

    @model_validator(mode="after")
    def _levels(self) -> PrismConfig:
        levels = self.keep if isinstance(self.keep, list) else [self.keep]
        if not levels or any(not 0 < k <= 1 for k in levels):
            raise ValueError(f"prism.keep: ratios must be in (0, 1] (got {self.keep})")
        if self.keep_probs is not None:
            probs = self.keep_probs
            if not isinstance(self.keep, list) or len(probs) != len(levels):
                raise ValueError("prism.keep_probs needs a list prism.keep of the same length")
            if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
                raise ValueError(f"prism.keep_probs must be non-negative and sum to 1 (got {probs})")
        return self


class ResFedConfig(_Strict):
    """ResFed (algorithm = "resfed"): residuals against shared predictors, deep-compressed."""

    sparsity: float = Field(0.99, ge=0, lt=1)  # fraction of the residual dropped by a global top-k
    quantization: Literal["median", "uniform", "none"] = "median"  # median: the paper's codebook
    bits: int = Field(1, ge=1, le=8)  # median: q (2^(q-1) levels per sign); uniform: bit width
    # last: own last model; linear: own last + 1/2 the other stream's step (the paper's two rules);
    # received: the uplink is predicted by the model the client just received (our rule, docs/resfed.md)
    predictor: Literal["last", "linear", "received"] = "linear"
    uplink: bool = True  # residuals client -> server (false: full models)
    downlink: bool = True  # residuals server -> client, per client (false: full models)
    history: int = Field(2, ge=1)  # reconstructed models kept per trajectory
    state: Literal["memory", "disk"] = "memory"  # disk: per-client trajectories in an HDF5 file per rank

    @model_validator(mode="after")
    def _enough_history(self) -> ResFedConfig:
        if self.predictor == "linear" and self.history < 2:
            raise ValueError("resfed.predictor 'linear' needs resfed.history >= 2")
        return self


class HADFLConfig(_Strict):
    """HADFL (algorithm = "hadfl"): decentralized devices on a simulated clock (docs/hadfl.md)."""

    # steps per simulated second: a list cycled over devices, "lognormal:SIGMA" drawn from the
    # seed, or "measured" (timed real steps at start-up: not reproducible, kept in checkpoints)
    speeds: list[float] | str = Field(default_factory=lambda: [1.0])
    schedule: Literal["hadfl", "dfedavg", "sync"] = "hadfl"
    local_steps: int = Field(8, ge=1)  # tau_max of the fastest device; every device's tau for dfedavg
    select_fraction: float = Field(0.5, gt=0, le=1)  # share of devices picked to pair-average per cycle
    max_staleness: int = Field(4, ge=1)  # a device unsynced this many cycles is picked for sure
    # pair average weights: "data" (samples: a pair average keeps the data-weighted mean of the
    # device models, the evaluated model) or "data_steps" (samples x tau_i, the paper's reading,
    # which pulls that mean toward the fast devices: slower to target under label skew, docs/hadfl.md)
    pair_weight: Literal["data", "data_steps"] = "data"
    # selection p_i: "staleness" (1 + s_i: slow devices average as often as fast ones) or
    # "steps_staleness" (tau_i (1 + s_i), the paper's reading: the fastest device pairs every cycle)
    selection: Literal["staleness", "steps_staleness"] = "staleness"
    # device i's SGD lr: "same" (train.lr for all) or "per_cycle" (train.lr x tau_min / tau_i:
    # equal step budgets per cycle, which throws the fast devices' lead away; measured slower)
    lr_scale: Literal["same", "per_cycle"] = "same"
    # every K cycles a full data-weighted average of all devices instead of pairs (0: never): a
    # global all-reduce HADFL otherwise avoids; helps under strong label skew (docs/hadfl.md)
    full_average_every: int = Field(0, ge=0)

    @field_validator("speeds")
    @classmethod
    def _speeds(cls, v: list[float] | str) -> list[float] | str:
        if isinstance(v, list):
            if not v or any(not math.isfinite(s) or s <= 0 for s in v):
                raise ValueError("speeds must be a non-empty list of positive numbers")
        elif v != "measured":
            kind, _, sigma = v.partition(":")
            try:
                ok = kind == "lognormal" and math.isfinite(float(sigma)) and float(sigma) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError('speeds must be a list, "lognormal:SIGMA" (SIGMA >= 0) or "measured"')
        return v


class SuperFedConfig(_Strict):
    """SuperFed (algorithm = "superfed"): a weight-shared family of subnets of an elastic model."""

    depths: list[int] | None = None  # depths a subnet may take (MLP layers, blocks per stage); None: all
    widths: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # width ratios
    # MaxNet: the largest subnet's weight at round 0 (the paper: 0.9); None: beta_end from the
    # start, no MaxNet phase (the default: measured better on 100-round jobs, docs/superfed.md)
    beta0: float | None = Field(None, gt=0, lt=1)
    beta_end: float | None = Field(None, gt=0, lt=1)  # its weight after the decay; None: 1/K
    decay_fraction: float = Field(0.8, gt=0, le=1)  # the decay lasts this share of the rounds
    # "samples": role weight x the client's sample count (the default; the authors' weight_dataset);
    # "maxnet": the role weights alone (the paper's MaxNet)
    weighting: Literal["maxnet", "samples"] = "samples"
    # in-place distillation: the share of each client's loss on the teacher's soft predictions
    # (0: labels only, the paper's MaxNet); the teacher is the global model at the round's start:
    # "largest" (its largest subnet, as OFA/BigNAS; the client then downloads the whole supernet)
    # or "subnet" (the client's own subnet as received: no extra bytes)
    distill: float = Field(0.0, ge=0, lt=1)
    teacher: Literal["largest", "subnet"] = "largest"
    # an element's average: over the clients whose subnet covers it ("covering", the paper), or
    # over the whole cohort with the others counted as leaving it unchanged ("cohort": an element
    # few clients train moves in proportion to their share of the round's weight)
    average: Literal["covering", "cohort"] = "covering"
    # clients given the largest subnet each round (the authors' top_k; each gets the role share
    # beta, the others (1 - k beta)/(K - k)): more of them train the largest subnet's own units
    largest_clients: int = Field(1, ge=1)
    # evaluated every eval_every: "smallest" | "largest" | specs; None: smallest, two middle, largest
    eval_subnets: list[str | dict[str, Any]] | None = None


class FaultsConfig(_Strict):
    """``[faults]``: injected client failures, to test a job's robustness (README "Faults").

    Every decision comes from the (seed, round, client) generator, so a faulty run is the same on
    any number of ranks and resumes exactly."""

    nan_prob: float = Field(0.0, ge=0, le=1)  # a client's update arrives as NaN/Inf (rejected)
    drop_prob: float = Field(0.0, ge=0, le=1)  # a sampled client drops out before training
    slow_prob: float = Field(0.0, ge=0, le=1)  # a straggler: does only part of its local steps
    slow_work: float = Field(0.5, gt=0, le=1)  # the share of its local steps a straggler does

    @property
    def active(self) -> bool:
        return self.nan_prob > 0 or self.drop_prob > 0 or self.slow_prob > 0


ROBUST_ALGORITHMS = ("fedavg", "fedpt")  # one scalar weight per client update: clip/median apply


class RobustConfig(_Strict):
    """``[robust]``: per-client update clipping and coordinate-wise robust aggregation."""

    clip_norm: float | None = Field(None, gt=0)  # clip each client's update (delta) to this L2 norm
    # "median"/"trimmed_mean" need every client's update: an Allgather of K x P, not an Allreduce of P
    aggregate: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim: float = Field(0.1, ge=0, lt=0.5)  # trimmed_mean: share cut at each end, per coordinate

    @property
    def active(self) -> bool:
        return self.clip_norm is not None or self.aggregate != "mean"


class JobConfig(_Strict):
    name: str = "run"
    algorithm: str  # a built-in (ALGORITHMS) or "module:Class", a hpcfed.Strategy subclass
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
    fedprox: FedProxConfig = Field(default_factory=FedProxConfig)
    scaffold: ScaffoldConfig = Field(default_factory=ScaffoldConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    fedpt: FedPTConfig = Field(default_factory=FedPTConfig)
    dp: DPConfig | None = None  # None: no [dp] table, no differential privacy
    prism: PrismConfig = Field(default_factory=PrismConfig)
    resfed: ResFedConfig = Field(default_factory=ResFedConfig)
    hadfl: HADFLConfig = Field(default_factory=HADFLConfig)
    superfed: SuperFedConfig = Field(default_factory=SuperFedConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    robust: RobustConfig = Field(default_factory=RobustConfig)
    # a user algorithm's own keys, validated by its class's ``Options`` model (if it has one)
    strategy: dict[str, Any] = Field(default_factory=dict)
    # the folder user modules are imported from besides sys.path: the job file's, recorded so that
    # ``hpcfed resume RUN_DIR`` finds them from anywhere
    job_dir: str | None = None

    @field_validator("algorithm")
    @classmethod
    def _algorithm_name(cls, v: str) -> str:
        return registry.check_name("algorithm", v)

    @model_validator(mode="after")
    def _robust(self) -> JobConfig:
        if self.robust.active and self.dp is not None:
            # DP clips already, and a median would void its sensitivity bound
            raise ValueError("[robust] and [dp] do not combine: DP clips each update itself (dp.clip)")
        return self

    @model_validator(mode="after")
    def _strategy_keys(self) -> JobConfig:
        # The algorithm's class checks what it takes ([dp], [robust], [strategy], its own table):
        # resolved here, on load, so `hpcfed check` and a login node see every such error.
        from hpcfed.algorithms.base import strategy_class  # lazy: algorithms import this module

        registry.add_search_path(self.job_dir)
        try:
            strategy_class(self.algorithm).check_job(self)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _elastic(self) -> JobConfig:
        from hpcfed.models.elastic import check_job  # lazy: models import this module

        try:
            check_job(self)  # resolves model.subnet to an explicit spec
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _consistent(self) -> JobConfig:
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
    """The job file at ``path`` with dotted ``key=value`` overrides, validated; UserError if not."""
    raw = apply_overrides(read_toml(path), list(overrides))
    # user modules are found beside the job file (an explicit job_dir, relative to it, wins)
    folder = Path(path).resolve().parent
    raw["job_dir"] = (
        str((folder / raw["job_dir"]).resolve()) if isinstance(raw.get("job_dir"), str) else str(folder)
    )
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
