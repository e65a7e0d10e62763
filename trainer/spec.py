"""RunSpec: the single, validated description of one training run.

Its JSON field names are a public contract shared by the CLI (YAML specs), the REST API,
the notebook client and the browser form. This module imports neither torch nor anything
of the service, so the API server can validate specs and draw LR schedules without torch.

Every invalid value raises a pydantic ``ValidationError`` whose ``loc`` is the offending
field: cross-field rules are checked in the validator of the *later* field, so the error
points at the field a user would change.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

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


class RunSpec(BaseModel):
    """One training run, in the terms of Goyal et al. 2017 (k workers x n samples)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, protected_namespaces=(), validate_default=True
    )

    # --- what to train on -------------------------------------------------------------
    model: Model = Field("mnist1d_cnn", description="Network architecture.")
    dataset: Dataset = Field("mnist1d", description="Training data.")
    dataset_size: int | None = Field(
        None,
        gt=0,
        description="Samples to use (MNIST-1D/synthetic: generated; others: a subset). "
        "None: the dataset's default.",
    )
    data_root: str | None = Field(
        None, description="Local folder of a torchvision dataset (mnist, cifar10, imagefolder)."
    )
    epochs: int = Field(20, ge=1, le=10000, description="Training epochs (paper: 90).")

    # --- minibatch: k workers, n per worker ----------------------------------------------
    workers: int = Field(1, ge=1, le=4096, description="k: workers (virtual or real).")
    batch_per_worker: int = Field(
        32, ge=1, le=65536, description="n: samples per worker per iteration (paper: 32)."
    )
    nproc: int = Field(
        1,
        ge=1,
        le=512,
        description="Real processes (DDP) the k workers are spread over; k/nproc each.",
    )
    micro_batch: int | None = Field(
        None,
        ge=1,
        description="Largest number of samples per forward pass; bigger iterations are "
        "accumulated. None: the whole iteration at once.",
    )

    # --- learning rate ------------------------------------------------------------------
    base_lr: float = Field(0.1, gt=0, le=1000, description="eta for the reference batch.")
    ref_batch: int = Field(256, ge=1, description="Reference total batch of base_lr (256).")
    scaling: Literal["linear", "sqrt", "none"] = Field(
        "linear", description="How the LR grows with k*n / ref_batch."
    )
    warmup: Literal["none", "constant", "gradual"] = Field("gradual")
    warmup_epochs: float = Field(5.0, ge=0, description="Warmup length in epochs (paper: 5).")
    decay: Literal["step", "cosine", "constant"] = Field("step")
    milestones: list[float] = Field(
        default_factory=lambda: [30.0, 60.0, 80.0],
        description="Epochs at which step decay multiplies the LR by decay_factor.",
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
    ghost_batch: int | None = Field(None, ge=1, description="Group size g of bn_ghost.")
    bn_momentum: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Running-stat update weight (PyTorch convention; the paper's 0.9 decay).",
    )
    cbn_window: int = Field(4, ge=1, le=16, description="Iterations averaged by cbn.")
    gn_groups: int = Field(8, ge=1, description="Groups of gn.")
    zero_init_residual: bool = Field(
        True, description="Start the last BN gamma of each residual block at 0."
    )

    # --- loop ---------------------------------------------------------------------------
    eval_every: int = Field(1, ge=1, description="Validate every this many epochs.")
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    target_accuracy: float | None = Field(
        None, gt=0, le=1, description="Validation accuracy whose first reach is timed."
    )
    divergence_factor: float = Field(
        20.0, gt=1, description="Stop as diverged when loss exceeds this times its start."
    )
    checkpoint: bool = Field(True, description="Save a checkpoint at the end of each epoch.")

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
        if v is None and info.data.get("dataset") == "imagefolder":
            raise ValueError("imagefolder needs dataset_size (training images to use)")
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

    @field_validator("micro_batch")
    @classmethod
    def _micro_divides(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("batch_per_worker")
        if v is not None and n is not None and v < n and n % v:
            raise ValueError(f"micro_batch={v} must divide batch_per_worker={n} or exceed it")
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
    def _milestones_sorted(cls, v: list[float]) -> list[float]:
        if any(m <= 0 for m in v):
            raise ValueError("milestones are epochs > 0")
        if sorted(v) != list(v):
            raise ValueError("milestones must be increasing")
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
        """Full iterations per epoch (the last partial minibatch is dropped)."""
        n_train = self.train_size
        if n_train is None:
            raise ValueError("training set size unknown: set dataset_size")
        return max(1, n_train // self.total_batch)

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
        nproc = self.nproc if k % self.nproc == 0 else 1
        return self.model_copy(
            update={"workers": k, "batch_per_worker": n, "nproc": nproc, "warmup": "none"}
        )

    def with_total_batch(self, total: int) -> RunSpec:
        """The same spec at another kn, keeping n per worker (k = total / n) when it can."""
        n = self.batch_per_worker
        k, n = (total // n, n) if total % n == 0 and total >= n else (1, total)
        nproc = self.nproc if k % self.nproc == 0 else 1
        return RunSpec.model_validate(
            {**self.model_dump(), "workers": k, "batch_per_worker": n, "nproc": nproc}
        )

    def summary_dict(self) -> dict[str, Any]:
        """Derived figures shown beside a run (tables, legends)."""
        out: dict[str, Any] = {"total_batch": self.total_batch, "peak_lr": self.peak_lr}
        if self.train_size is not None:
            out.update(iters_per_epoch=self.iters_per_epoch, total_iters=self.total_iters)
        return out


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
