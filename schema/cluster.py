"""Cluster profiles: where jobs run and what the hardware can do.

`local` is built in: this machine's CPU, gloo, fp32. Slurm profiles live as YAML under
slurm/clusters/ and are validated against ClusterProfile.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import TIME_LIMIT_PATTERN, Spec

GpuKind = Literal["A100", "H100", "H200", "B200", "GB200"]
Fp8Recipe = Literal["delayed", "tensorwise", "mxfp8", "blockwise"]

# Which FP8 scaling recipes Transformer Engine runs natively on each GPU generation. Hopper has
# per-tensor (delayed, current/tensorwise) and 1x128/128x128 block scaling; MXFP8 needs Blackwell.
FP8_RECIPES_BY_GPU: dict[str, frozenset[str]] = {
    "A100": frozenset(),
    "H100": frozenset({"delayed", "tensorwise", "blockwise"}),
    "H200": frozenset({"delayed", "tensorwise", "blockwise"}),
    "B200": frozenset({"delayed", "tensorwise", "mxfp8", "blockwise"}),
    "GB200": frozenset({"delayed", "tensorwise", "mxfp8", "blockwise"}),
}


class Throughput(Spec):
    """What a GPU's kernels and links reach in training, for the time estimate's layout model
    (engine/compile/estimate.py): compute at these fractions of the peaks, plus the pipeline bubble and the
    communication the layout exposes."""

    gemm_efficiency: float = Field(
        gt=0, le=1, description="fraction of the bf16 peak that a bf16 job's transformer GEMMs reach, the time of "
        "the layer's other kernels (norms, activations, rotary embeddings) included"
    )
    fp8_gemm_efficiency: float | None = Field(
        default=None, gt=0, le=1, description="the same fraction of the FP8 peak for FP8 GEMMs (casts and scaling "
        "included); none: FP8 jobs are estimated at the bf16 rate"
    )
    attention_efficiency: float = Field(
        gt=0, le=1, description="fraction of the bf16 peak fused (flash) attention reaches, forward and backward"
    )
    nvlink_gb_s: float = Field(gt=0, description="GB/s per GPU per direction between GPUs of one node")
    network_gb_s: float = Field(gt=0, description="GB/s per GPU per direction between nodes")


class DataRates(Spec):
    """CPU seconds per megabyte of input that the data stage's passes take, in the stage's main process and
    in its worker pools: what `engine plan` estimates the data stage's wall time from (engine/compile/
    data_estimate.py). The defaults were measured with bench/data_throughput.py (workers 2, a 10 MB JSONL
    corpus of 100-300-word documents, a 4,096-token byte-level BPE) on a 2-core x86 machine; the rates of
    other CPUs and corpora differ: measure yours with it (each run also writes its own in the stage's
    timing.json) and set them here."""

    clean_main: float = Field(default=0.030, gt=0, description="reading, dedup look-ups and spooling (main process)")
    clean_pool: float = Field(default=0.084, gt=0, description="normalising, filtering and exact signatures (pool)")
    near_main: float = Field(default=0.11, ge=0, description="what near dedup adds to the main process (LSH look-ups)")
    near_pool: float = Field(default=0.38, ge=0, description="what near dedup adds to the pool (MinHash signatures)")
    tokenize_main: float = Field(default=0.011, gt=0, description="appending tokens to the outputs (main process)")
    tokenize_pool: float = Field(default=0.30, gt=0, description="tokenising (pool)")
    merge: float = Field(default=0.003, ge=0, description="joining the shards' parts (one process; shards > 1)")


class ClusterProfile(Spec):
    """A place to run jobs: its launcher, its accelerators and their peak numbers."""

    name: str = Field(description="profile name, as the recipe's `cluster` refers to it")
    launcher: Literal["local", "slurm"] = Field(
        description="`local` runs jobs as torchrun subprocesses here; `slurm` submits them with sbatch"
    )
    device: Literal["cpu", "cuda"] = Field(description="the device the workers train on")
    gpu: GpuKind | None = Field(default=None, description="GPU model on the nodes; none for CPU profiles")
    gpus_per_node: int = Field(
        gt=0, le=1024, description="GPUs per node (for CPU profiles: the default number of worker processes)"
    )
    max_nodes: int | None = Field(default=None, gt=0, le=1_000_000, description="the most nodes one job may ask for")
    peak_tflops_bf16: float = Field(gt=0, description="dense bf16 (fp32 on CPU) peak TFLOP/s per device")
    peak_tflops_fp8: float | None = Field(
        default=None, gt=0, description="dense FP8 peak TFLOP/s per GPU; none where FP8 is not supported"
    )
    hbm_gib: float | None = Field(
        default=None, gt=0, description="memory per GPU in GiB; jobs estimated above it are refused"
    )
    assumed_mfu: float = Field(
        gt=0, le=1, description="model FLOPs utilisation assumed for time estimates when `throughput` is not given"
    )
    throughput: Throughput | None = Field(
        default=None, description="kernel efficiencies and link speeds of the layout model; none: assumed_mfu"
    )
    partition: str | None = Field(default=None, description="Slurm partition (sbatch --partition)")
    account: str | None = Field(default=None, description="Slurm account (sbatch --account)")
    qos: str | None = Field(default=None, description="Slurm quality of service (sbatch --qos)")
    constraint: str | None = Field(default=None, description="Slurm node features (sbatch --constraint)")
    container_image: str | None = Field(
        default=None, description="container image for pyxis/enroot (srun --container-image)"
    )
    container_mounts: list[str] = Field(
        default_factory=list, description="container bind mounts, `src:dst` (srun --container-mounts)"
    )
    modules: list[str] = Field(default_factory=list, description="environment modules to `module load`")
    env: dict[str, str] = Field(default_factory=dict, description="environment set for every job")
    default_time_limit: str = Field(
        default="04:00:00",
        pattern=TIME_LIMIT_PATTERN,
        description="time limit of a job whose stage sets none (Slurm format, e.g. 04:00:00 or 2-00:00:00)",
    )
    data_rates: DataRates = Field(
        default_factory=DataRates, description="the data stage's CPU seconds per MB of input, for its time estimate"
    )

    def fp8_recipes(self) -> frozenset[str]:
        return FP8_RECIPES_BY_GPU.get(self.gpu or "", frozenset())


LOCAL = ClusterProfile(
    name="local",
    launcher="local",
    device="cpu",
    gpus_per_node=1,
    # A laptop-class CPU in fp32: rough figures, used only for time estimates.
    peak_tflops_bf16=0.2,
    assumed_mfu=0.2,
    default_time_limit="04:00:00",
)
