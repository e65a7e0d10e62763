"""RunSpec: the single, validated description of one training run.

Its JSON field names are a public contract shared by the CLI (YAML specs), the REST API,
the notebook client and the browser form. This module imports neither torch nor anything
of the service, so the API server can validate specs and draw LR schedules without torch.

Every invalid value raises a pydantic ``ValidationError`` whose ``loc`` is the offending
field: cross-field rules are checked in the validator of the *later* field, so the error
points at the field a user would change.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

Model = Literal["mlp", "mnist1d_cnn", "simple_cnn", "resnet20", "resnet50"]
Dataset = Literal["mnist1d", "synthetic", "mnist", "cifar10", "imagefolder"]
Norm = Literal["bn_local", "bn_sync", "bn_ghost", "frn", "cbn", "gn", "none"]

# Number of training samples each dataset holds when dataset_size is not given.
# MNIST-1D: the package's default 5000 samples, 80% of which train (its own split).
DEFAULT_DATASET_SIZE: dict[str, int | None] = {
    "mnist1d": 5000,
    "synthetic": 4096,
    "mnist": 60000,
    "cifar10": 50000,
    "imagefolder": None,
}
MNIST1D_TRAIN_FRACTION = 0.8
SYNTHETIC_VAL_FRACTION = 0.2
NUM_CLASSES: dict[str, int | None] = {
    "mnist1d": 10,
    "synthetic": 10,
    "mnist": 10,
    "cifar10": 10,
    "imagefolder": None,  # read from the folder's class directories
}
# Which input shapes each model accepts (per sample, without the batch dimension).
MODEL_INPUT: dict[str, tuple[int, ...] | None] = {
    "mlp": None,  # anything: flattened
    "mnist1d_cnn": (40,),
    "simple_cnn": (1, 28, 28),
    "resnet20": (3, 32, 32),
    "resnet50": (3, 224, 224),
}
DATASET_INPUT: dict[str, tuple[int, ...] | None] = {
    "mnist1d": (40,),
    "synthetic": None,  # shaped to fit the model
    "mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "imagefolder": (3, 224, 224),  # resized/cropped on load
}

# Resource limits (docs/runspec.md): a spec within them trains in bounded memory, is a few
# kB stored and listed, and its seeds fit int64 and numpy's seed range.
MAX_DATASET_SIZE = 2_000_000  # ImageNet-1k's 1.28M training images fit
MAX_MNIST1D_SIZE = 1_000_000  # generated sample by sample: about a minute per 10^6
MAX_SYNTHETIC_VALUES = 2**30  # samples x values per sample: 4 GiB of float32
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536  # per worker, per forward pass, per BN group
MAX_REF_BATCH = 2**20
MAX_MILESTONES = 100
MAX_SEED = 2**32 - 1  # numpy's seed range; seed * 1_000_003 + epoch fits torch's int64
MAX_TEXT = 4096

DEFAULT_EPOCHS = 20
# Measured cost at these intervals: docs/benchmarks.md (issue 13; <= 5% and <= 3%).
DEFAULT_NOISE_EVERY = 40
DEFAULT_HEALTH_EVERY = 20
MAX_PROBE_EVERY = 1_000_000
# Goyal et al.: the LR drops /10 at epochs 30, 60 and 80 of 90.
PAPER_EPOCHS = 90
PAPER_MILESTONES = (30, 60, 80)


_EPOCH_RANGE = range(1, MAX_EPOCHS + 1)


def paper_milestones(epochs: int) -> list[float]:
    """The paper's step-decay epochs scaled to a run of ``epochs`` (2 decimals)."""
    return [round(epochs * m / PAPER_EPOCHS, 2) for m in PAPER_MILESTONES]


def _plain_text(v: str) -> str:
    """Refuse NUL (PostgreSQL cannot store it) and lone surrogates (not UTF-8)."""
    if "\x00" in v:
        raise ValueError("must not contain NUL characters")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return v


PlainText = Annotated[str, AfterValidator(_plain_text)]


class RunSpec(BaseModel):
    """One training run, in the terms of Goyal et al. 2017 (k workers x n samples)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        protected_namespaces=(),
        validate_default=True,
        # NaN and Infinity (Python's JSON reads them) would be stored and break schedules.
        allow_inf_nan=False,
    )

    # --- what to train on -------------------------------------------------------------
    model: Model = Field("mnist1d_cnn", description="Network architecture.")
    dataset: Dataset = Field("mnist1d", description="Training data.")
    dataset_size: int | None = Field(
        None,
        gt=0,
        le=MAX_DATASET_SIZE,
        description="Samples to use (MNIST-1D/synthetic: generated; others: a subset). "
        "None: the dataset's default.",
    )
    data_root: PlainText | None = Field(
        None,
        max_length=MAX_TEXT,
        description="Local folder of a torchvision dataset (mnist, cifar10, imagefolder).",
    )
    epochs: int = Field(
        DEFAULT_EPOCHS, ge=1, le=MAX_EPOCHS, description="Training epochs (paper: 90)."
    )

    # --- minibatch: k workers, n per worker ----------------------------------------------
    workers: int = Field(1, ge=1, le=4096, description="k: workers (virtual or real).")
    batch_per_worker: int = Field(
        32, ge=1, le=MAX_BATCH, description="n: samples per worker per iteration (paper: 32)."
    )
    nproc: int = Field(
        1,
        ge=1,
        le=512,
        description="Real processes (DDP) per node the k workers are spread over; "
        "k/(nodes*nproc) each.",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description="Machines (batchlab workers) the run spans, nproc processes on each; "
        "they start together as a gang (docs/deploy.md).",
    )
    micro_batch: int | None = Field(
        None,
        ge=1,
        le=MAX_BATCH,
        description="Largest number of samples per forward pass; bigger iterations are "
        "accumulated. None: the whole iteration at once.",
    )
    backward_splits: int = Field(
        1,
        ge=1,
        le=64,
        description="m (seed 004): one forward over the kn batch, then m updates, each "
        "from the mean loss of one of m equal chunks at the forward's weights. 1: plain.",
    )

    # --- learning rate ------------------------------------------------------------------
    base_lr: float = Field(0.1, gt=0, le=1000, description="eta for the reference batch.")
    ref_batch: int = Field(
        256, ge=1, le=MAX_REF_BATCH, description="Reference total batch of base_lr (256)."
    )
    scaling: Literal["linear", "sqrt", "none"] = Field(
        "linear", description="How the LR grows with k*n / ref_batch."
    )
    warmup: Literal["none", "constant", "gradual"] = Field("gradual")
    warmup_epochs: float = Field(
        5.0, ge=0, le=MAX_EPOCHS, description="Warmup length in epochs (paper: 5)."
    )
    decay: Literal["step", "cosine", "constant"] = Field("step")
    milestones: list[Annotated[float, Field(le=MAX_EPOCHS)]] = Field(
        # Unset: the paper's 30, 60, 80 of 90 epochs scaled to `epochs` (_scale_milestones).
        default_factory=lambda: paper_milestones(DEFAULT_EPOCHS),
        max_length=MAX_MILESTONES,
        description="Epochs at which step decay multiplies the LR by decay_factor; each "
        "< epochs. Default: the paper's 30, 60, 80 of 90 epochs, scaled to epochs.",
    )
    decay_factor: float = Field(0.1, gt=0, le=1)

    # --- optimizer ----------------------------------------------------------------------
    optimizer: Literal["sgd", "lars", "lamb"] = Field("sgd")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    momentum_form: Literal["pytorch", "caffe"] = Field(
        "pytorch", description="pytorch: LR outside the momentum buffer; caffe: LR inside."
    )
    momentum_correction: bool = Field(
        True, description="Caffe form: rescale the buffer by lr_{t+1}/lr_t (Remark 2)."
    )
    weight_decay: float = Field(1e-4, ge=0, le=1)
    weight_decay_norm: bool = Field(
        False, description="Also decay normalization gamma/beta and biases (paper: no)."
    )

    # --- normalization ------------------------------------------------------------------
    norm: Norm = Field("bn_local", description="Normalization layers.")
    ghost_batch: int | None = Field(
        None, ge=1, le=MAX_BATCH, description="Group size g of bn_ghost."
    )
    bn_momentum: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Running-stat update weight (PyTorch convention; the paper's 0.9 decay).",
    )
    cbn_window: int = Field(4, ge=1, le=16, description="Iterations averaged by cbn.")
    gn_groups: int = Field(8, ge=1, le=1024, description="Groups of gn.")
    zero_init_residual: bool = Field(
        True, description="Start the last BN gamma of each residual block at 0."
    )

    # --- loop ---------------------------------------------------------------------------
    eval_every: int = Field(1, ge=1, le=MAX_EPOCHS, description="Validate every this many epochs.")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32 (TF32 matmuls on CUDA) or bf16 autocast of the forward pass."
    )
    compile: bool = Field(False, description="Compile the model with torch.compile.")
    target_accuracy: float | None = Field(
        None, gt=0, le=1, description="Validation accuracy whose first reach is timed."
    )
    divergence_factor: float = Field(
        20.0, gt=1, le=1e6, description="Stop as diverged when loss exceeds this times its start."
    )
    checkpoint: bool = Field(True, description="Save a checkpoint at the end of each epoch.")
    noise_every: int = Field(
        DEFAULT_NOISE_EVERY,
        ge=0,
        le=MAX_PROBE_EVERY,
        description="Iterations between gradient-noise-scale measurements (McCandlish et "
        "al. 2018; trainer/noise.py). 0: off.",
    )
    health_every: int = Field(
        DEFAULT_HEALTH_EVERY,
        ge=0,
        le=MAX_PROBE_EVERY,
        description="Iterations between per-layer health measurements (dead ReLUs, "
        "norms, update ratios; trainer/health.py). 0: off.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _suggest_field_names(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """An unknown field's error names the closest RunSpec field ("did you mean ...?")."""
        try:
            return handler(data)
        except ValidationError as err:
            errors = err.errors(include_url=False)
            if not any(e["type"] == "extra_forbidden" for e in errors):
                raise
            details = [
                {
                    "type": PydanticCustomError(e["type"], _suggest(e)),
                    "loc": e["loc"],
                    "input": e.get("input"),
                }
                for e in errors
            ]
            raise ValidationError.from_exception_data(err.title, details) from None

    @model_validator(mode="before")
    @classmethod
    def _scale_milestones(cls, data: Any) -> Any:
        """Milestones left out follow `epochs`, so a shorter run still decays."""
        if not isinstance(data, dict) or "milestones" in data:
            return data
        epochs = data.get("epochs", DEFAULT_EPOCHS)
        with contextlib.suppress(TypeError, ValueError):  # a bad `epochs` reports itself
            if not isinstance(epochs, bool) and float(epochs) == int(epochs) in _EPOCH_RANGE:
                return {**data, "milestones": paper_milestones(int(epochs))}
        return data

    # ---------------------------------------------------------------------------------
    # Cross-field rules. Each lives on the later field so the error names what to fix.
    @field_validator("dataset")
    @classmethod
    def _model_fits_dataset(cls, v: str, info: ValidationInfo) -> str:
        model = info.data.get("model")
        want, have = MODEL_INPUT.get(model or ""), DATASET_INPUT[v]
        if (
            want is not None
            and have is not None
            and want != have
            and not (model == "resnet50" and v == "imagefolder")
        ):
            raise ValueError(
                f"model {model!r} takes inputs of shape {want}, dataset {v!r} gives {have}"
            )
        return v

    @field_validator("dataset_size")
    @classmethod
    def _size_known(cls, v: int | None, info: ValidationInfo) -> int | None:
        dataset = info.data.get("dataset")
        if v is None and dataset == "imagefolder":
            raise ValueError("imagefolder needs dataset_size (training images to use)")
        if v is not None and dataset == "mnist1d" and v > MAX_MNIST1D_SIZE:
            raise ValueError(f"mnist1d generates at most {MAX_MNIST1D_SIZE} samples")
        if v is not None and dataset == "synthetic":
            shape = MODEL_INPUT.get(info.data.get("model") or "") or (40,)
            if v * math.prod(shape) > MAX_SYNTHETIC_VALUES:
                raise ValueError(
                    f"{v} synthetic samples of shape {shape} exceed {MAX_SYNTHETIC_VALUES} "
                    "values (4 GiB)"
                )
        return v

    @field_validator("data_root")
    @classmethod
    def _root_given(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("dataset") in ("mnist", "cifar10", "imagefolder"):
            raise ValueError(
                f"dataset {info.data['dataset']!r} is read from a local folder: set data_root"
            )
        return v

    @field_validator("batch_per_worker")
    @classmethod
    def _batch_fits(cls, v: int, info: ValidationInfo) -> int:
        k = info.data.get("workers")
        if k is None or "dataset" not in info.data:
            return v
        n_train = _train_size(info.data.get("dataset"), info.data.get("dataset_size"))
        if n_train is not None and k * v > n_train:
            raise ValueError(
                f"total batch k*n = {k}*{v} = {k * v} is larger than the training set "
                f"({n_train} samples): no full iteration fits in an epoch"
            )
        return v

    @field_validator("nproc")
    @classmethod
    def _nproc_divides(cls, v: int, info: ValidationInfo) -> int:
        k = info.data.get("workers")
        if k is not None and k % v:
            raise ValueError(f"nproc={v} must divide workers={k} (k/nproc workers per process)")
        return v

    @field_validator("nodes")
    @classmethod
    def _nodes_divide(cls, v: int, info: ValidationInfo) -> int:
        k, nproc = info.data.get("workers"), info.data.get("nproc")
        if k is not None and nproc is not None and k % (v * nproc):
            raise ValueError(
                f"nodes*nproc = {v}*{nproc} = {v * nproc} must divide workers={k} "
                "(the same k workers spread over every process of every node)"
            )
        return v

    @field_validator("micro_batch")
    @classmethod
    def _micro_divides(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("batch_per_worker")
        if v is not None and n is not None and v < n and n % v:
            raise ValueError(f"micro_batch={v} must divide batch_per_worker={n} or exceed it")
        return v

    @field_validator("backward_splits")
    @classmethod
    def _splits_fit(cls, v: int, info: ValidationInfo) -> int:
        # trainer/splits.py: the m chunk gradients come from one graph in one process.
        k, n = info.data.get("workers"), info.data.get("batch_per_worker")
        if v == 1 or k is None or n is None:
            return v
        micro = info.data.get("micro_batch")
        if (k * n) % v:
            raise ValueError(f"backward_splits={v} must divide the total batch k*n = {k * n}")
        if info.data.get("nproc", 1) > 1 or info.data.get("nodes", 1) > 1:
            raise ValueError("backward_splits > 1 runs in one process: set nproc=1 and nodes=1")
        if micro is not None and micro < k * n:
            raise ValueError(
                "backward_splits > 1 needs the whole kn in one forward pass: unset micro_batch"
            )
        return v

    @field_validator("weight_decay_norm")
    @classmethod
    def _decay_norm_possible(cls, v: bool, info: ValidationInfo) -> bool:
        # pytorch-optimizer's LARS never decays 1-D tensors (BN gamma/beta, biases):
        # refuse at submission rather than fail when the optimizer is built (docs/lars.md).
        if v and info.data.get("optimizer") == "lars":
            raise ValueError("optimizer lars cannot decay norm parameters and biases")
        return v

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_fits(cls, v: float, info: ValidationInfo) -> float:
        epochs = info.data.get("epochs")
        if info.data.get("warmup", "none") != "none" and epochs is not None and v > epochs:
            raise ValueError(f"warmup of {v} epochs is longer than training ({epochs} epochs)")
        return v

    @field_validator("milestones")
    @classmethod
    def _milestones_sorted(cls, v: list[float], info: ValidationInfo) -> list[float]:
        if any(m <= 0 for m in v):
            raise ValueError("milestones are epochs > 0")
        if sorted(v) != list(v):
            raise ValueError("milestones must be increasing")
        # A drop at or after the last epoch never happens: the LR would stay flat with no
        # word of it (e.g. `--set epochs=10` on milestones [10, 20, 27]).
        epochs = info.data.get("epochs")
        late = [m for m in v if epochs is not None and m >= epochs]
        if late and info.data.get("decay") == "step":
            raise ValueError(
                f"milestones {_fmt_epochs(late)} are at or past the end of training "
                f"(epochs={epochs}): each must be < epochs, or use decay 'constant'"
            )
        return v

    @field_validator("precision", mode="before")
    @classmethod
    def _no_fp16(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() in ("fp16", "float16", "half"):
            raise ValueError(
                "fp16 needs loss scaling (a GradScaler) to keep small gradients from "
                "underflowing: use bf16, which has fp32's range and needs none"
            )
        return v

    @field_validator("nesterov")
    @classmethod
    def _nesterov_needs_momentum(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("momentum") == 0:
            raise ValueError("Nesterov momentum needs momentum > 0")
        return v

    @field_validator("ghost_batch")
    @classmethod
    def _ghost_divides(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("batch_per_worker")
        if info.data.get("norm") == "bn_ghost":
            if v is None:
                raise ValueError("bn_ghost needs ghost_batch (samples per BN group)")
            if n is not None and n % v:
                raise ValueError(f"ghost_batch={v} must divide batch_per_worker={n}")
        return v

    # --- derived quantities (pure) -------------------------------------------------------
    @property
    def total_batch(self) -> int:
        """k*n, the minibatch the paper's rules are stated in."""
        return self.workers * self.batch_per_worker

    @property
    def train_size(self) -> int | None:
        return _train_size(self.dataset, self.dataset_size)

    @property
    def iters_per_epoch(self) -> int:
        """Iterations (updates) per epoch: full minibatches (the last partial one is
        dropped), times backward_splits."""
        n_train = self.train_size
        if n_train is None:
            raise ValueError("training set size unknown: set dataset_size")
        return max(1, n_train // self.total_batch) * self.backward_splits

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def peak_lr(self) -> float:
        """The LR after warmup: base_lr scaled by kn/ref_batch under the chosen rule."""
        ratio = self.total_batch / self.ref_batch
        if self.scaling == "linear":
            return self.base_lr * ratio
        if self.scaling == "sqrt":
            return self.base_lr * math.sqrt(ratio)
        return self.base_lr

    def baseline(self) -> RunSpec:
        """The matching reference run: kn = ref_batch with the same n where possible.

        The paper's baseline keeps n = 32 per worker and uses k = 256/32 = 8 workers, no
        warmup needed (its LR is base_lr). When n does not divide ref_batch, one worker of
        n = ref_batch is used.
        """
        n = self.batch_per_worker
        k, n = (self.ref_batch // n, n) if self.ref_batch % n == 0 else (1, self.ref_batch)
        plain = {"warmup": "none", "backward_splits": 1}  # the paper's reference run
        return self.model_copy(
            update={"workers": k, "batch_per_worker": n, **self._spread(k), **plain}
        )

    def with_total_batch(self, total: int) -> RunSpec:
        """The same spec at another kn, keeping n per worker (k = total / n) when it can."""
        n = self.batch_per_worker
        k, n = (total // n, n) if total % n == 0 and total >= n else (1, total)
        return RunSpec.model_validate(
            {**self.model_dump(), "workers": k, "batch_per_worker": n, **self._spread(k)}
        )

    def _spread(self, k: int) -> dict[str, int]:
        """This spec's nodes and nproc for k workers, or as few as divide k."""
        nproc = self.nproc if k % self.nproc == 0 else 1
        nodes = self.nodes if k % (self.nodes * nproc) == 0 else 1
        return {"nproc": nproc, "nodes": nodes}

    @property
    def processes(self) -> int:
        """Training processes in all: nodes x nproc (each holds k / processes workers)."""
        return self.nodes * self.nproc

    def summary_dict(self) -> dict[str, Any]:
        """Derived figures shown beside a run (tables, legends)."""
        out: dict[str, Any] = {
            "total_batch": self.total_batch,
            "peak_lr": self.peak_lr,
            # Samples per logged step: kn, or kn/m with backward_splits (an update each).
            "update_batch": self.total_batch // self.backward_splits,
        }
        if self.train_size is not None:
            out.update(iters_per_epoch=self.iters_per_epoch, total_iters=self.total_iters)
        return out


def suggest_field(name: str) -> str | None:
    """The RunSpec field ``name`` was probably meant to be (difflib), or None."""
    close = difflib.get_close_matches(name, RunSpec.model_fields, n=1, cutoff=0.6)
    return close[0] if close else None


def _suggest(error: Any) -> str:
    """pydantic's message, plus "did you mean FIELD?" for an unknown top-level field."""
    loc = error["loc"]
    if error["type"] != "extra_forbidden" or len(loc) != 1 or not isinstance(loc[0], str):
        return error["msg"]
    guess = suggest_field(loc[0])
    hint = f"did you mean {guess}?" if guess else "docs/runspec.md lists the fields"
    return f"{error['msg']} (unknown field): {hint}"


def _fmt_epochs(values: list[float]) -> str:
    """[10.0, 20.5] -> "[10, 20.5]": epochs as a user wrote them (first few only)."""
    shown = ", ".join(f"{m:g}" for m in values[:5])
    return f"[{shown}{', ...' if len(values) > 5 else ''}]"


def _train_size(dataset: str | None, dataset_size: int | None) -> int | None:
    """Training samples for a dataset and requested size (None when unknown)."""
    if dataset is None:
        return None
    size = dataset_size if dataset_size is not None else DEFAULT_DATASET_SIZE.get(dataset)
    if size is None:
        return None
    if dataset == "mnist1d":
        return int(size * MNIST1D_TRAIN_FRACTION)
    if dataset == "synthetic":
        return size - int(size * SYNTHETIC_VAL_FRACTION)
    return size


def input_shape(spec: RunSpec) -> tuple[int, ...]:
    """Per-sample input shape the data must have for ``spec.model``."""
    fixed = DATASET_INPUT[spec.dataset]
    if fixed is not None:
        return fixed
    return MODEL_INPUT[spec.model] or (40,)


def load_spec(path: str) -> RunSpec:
    """Read a RunSpec from a YAML or JSON file."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    return RunSpec.model_validate(data)
