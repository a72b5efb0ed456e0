"""What the device of a run can compute, found out in one place instead of assumed.

    from fmtrain.hardware import probe
    caps = probe("cpu")                     # this machine's CPU (asked once per process)
    caps.refusal("deepspeed", "fp16")       # None, or why not and what to use instead
    caps.describe()                         # 'cpu: Intel(R) Xeon(R) Processor (AVX512; bf16 native; fp16 native)'
    caps.auto_precision("ddp")              # ('bf16', '... multiplies bf16 natively (AMX-BF16 and AVX512-BF16)')

Validation asks before launch (the local launcher runs on this machine), each strategy asks again
on its rank's device (a Slurm or Ray node may differ from the machine that submitted), and
``fmtrain plan`` / ``--dry-run`` show the answer.

On a CPU torch computes bf16 and fp16 everywhere: natively through oneDNN where the CPU has the
instructions (bf16: AVX512-BF16 or AMX-BF16; fp16: AVX512-FP16 or AMX-FP16), emulated and slower
elsewhere. DeepSpeed's CPU accelerator refuses fp16 without oneDNN's fp16 kernels, as on an AMD EPYC,
so its own answer is asked. On GPUs, bf16 needs sm_80 (Ampere) and fp8 sm_89 (Ada, Hopper).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with fp8 tensor cores
BF16_MIN_CAPABILITY = (8, 0)  # Ampere
# The CPU flags (as /proc/cpuinfo names them) that decide how 16-bit matmuls run.
NOTABLE_FLAGS = ("avx2", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


@dataclass(frozen=True)
class Capabilities:
    kind: str  # "cpu" or "cuda"
    name: str  # the CPU's model name, or the GPU's
    isa: str  # CPU: the vector ISA torch's kernels use (AVX512, AVX2, ...); GPU: sm_XY
    flags: tuple[str, ...]  # CPU: which of NOTABLE_FLAGS it has
    native_bf16: bool  # bf16 matmuls in hardware (CPU: AVX512-BF16 or AMX-BF16; GPU: tensor cores)
    native_fp16: bool  # (CPU: AVX512-FP16 or AMX-FP16)
    fp8: bool  # fp8 tensor cores (torchao Float8Linear)
    deepspeed_fp16: bool | None  # DeepSpeed's accelerator's answer; None: not asked (not installed)
    deepspeed_bf16: bool | None

    def describe(self) -> str:
        native = [
            f"{dtype} {'native' if ok else 'emulated'}" for dtype, ok in (("bf16", self.native_bf16), ("fp16", self.native_fp16))
        ]
        extra = [f"DeepSpeed fp16 {'yes' if self.deepspeed_fp16 else 'no'}"] if self.deepspeed_fp16 is not None else []
        return f"{self.kind}: {self.name} ({'; '.join([self.isa, *native, *(['fp8'] if self.fp8 else []), *extra])})"

    def auto_precision(self, strategy: str) -> tuple[str, str]:
        """What ``precision=auto`` trains in on this device, and why: bf16 autocast where bf16
        matmuls run in hardware (and DeepSpeed, if it runs them, accepts bf16), else fp32."""
        if not self.native_bf16:
            return "fp32", f"{self.describe()} has no native bf16 matmuls"
        if strategy == "deepspeed" and self.deepspeed_bf16 is False:
            return "fp32", f"DeepSpeed's {self.kind} accelerator refuses bf16 here"
        units = (
            "tensor cores"
            if self.kind == "cuda"
            else " and ".join(
                name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in self.flags
            )
        )
        return "bf16", f"{self.name} multiplies bf16 natively ({units})"

    def refusal(self, strategy: str, precision: str) -> str | None:
        """Why ``strategy`` cannot train in ``precision`` on this device, naming what can; None if it can."""
        where = f"this run's device is {self.describe()}"
        if precision == "fp8" and not self.fp8:
            return (
                "fp8 training needs GPUs with fp8 tensor cores (compute capability >= 8.9, e.g. H100, L40S); "
                f"{where}: use precision=bf16"
            )
        if precision == "bf16" and self.kind == "cuda" and not self.native_bf16:
            return f"bf16 needs compute capability >= 8.0 (Ampere); {where}: use precision=fp16"
        if strategy == "deepspeed" and precision == "fp16" and self.deepspeed_fp16 is False:
            why = " (oneDNN has no fp16 kernels without AVX512-FP16 or AMX-FP16)" if self.kind == "cpu" else ""
            return (
                f"DeepSpeed's {self.kind} accelerator refuses fp16 here{why}; {where}: use precision=bf16, or "
                "strategy=fsdp precision=fp16 (torch's loss scaling)"
            )
        if strategy == "deepspeed" and precision == "bf16" and self.deepspeed_bf16 is False:
            return f"DeepSpeed's {self.kind} accelerator refuses bf16 here; {where}: use precision=fp16 or fp32"
        return None


def cpu_flags() -> tuple[str, ...]:
    """Which of NOTABLE_FLAGS this CPU has (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    present = set(line.partition(":")[2].split())
    return tuple(flag for flag in NOTABLE_FLAGS if flag in present)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _deepspeed_answers(kind: str) -> tuple[bool | None, bool | None]:
    """(fp16, bf16) as DeepSpeed's accelerator for ``kind`` answers, or (None, None) without DeepSpeed."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return None, None
    logging.disable(logging.WARNING)  # importing DeepSpeed logs which accelerator it picked
    try:
        if kind == "cpu":
            from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

            accelerator = CPU_Accelerator()
        else:
            from deepspeed.accelerator import get_accelerator

            accelerator = get_accelerator()
    finally:
        logging.disable(logging.NOTSET)
    return bool(accelerator.is_fp16_supported()), bool(accelerator.is_bf16_supported())


@functools.cache
def probe(kind: str, index: int = 0, *, engines: bool = True) -> Capabilities:
    """The capabilities of this machine's ``kind`` device ("cpu" or "cuda", GPU ``index``).

    ``engines``: also ask DeepSpeed (about a second to import it); without, its answers are None.
    """
    import torch  # here, not at the top: validation asks without paying for torch unless it must

    deepspeed = _deepspeed_answers(kind) if engines else (None, None)
    if kind == "cuda":
        capability = torch.cuda.get_device_capability(index)
        return Capabilities(
            kind="cuda",
            name=torch.cuda.get_device_name(index),
            isa=f"sm_{capability[0]}{capability[1]}",
            flags=(),
            native_bf16=capability >= BF16_MIN_CAPABILITY,
            native_fp16=True,
            fp8=capability >= FP8_MIN_CAPABILITY,
            deepspeed_fp16=deepspeed[0],
            deepspeed_bf16=deepspeed[1],
        )
    flags = cpu_flags()
    return Capabilities(
        kind="cpu",
        name=cpu_name(),
        isa=torch.backends.cpu.get_cpu_capability(),
        flags=flags,
        # The instructions, and oneDNN allowed to use them (ONEDNN_MAX_CPU_ISA may cap it below the CPU).
        native_bf16=bool({"avx512_bf16", "amx_bf16"} & set(flags)) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        native_fp16=bool({"avx512_fp16", "amx_fp16"} & set(flags)) and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
        fp8=False,
        deepspeed_fp16=deepspeed[0],
        deepspeed_bf16=deepspeed[1],
    )


AUTO_PIN = "FMTRAIN_PRECISION_AUTO"  # a site's pin of what precision=auto means: fp32 or bf16
COMPILE_PIN = "FMTRAIN_COMPILE_AUTO"  # a site's (or the test suite's) pin of what trainer.compile=auto means


def site_pin(variable: str, setting: str, choices: tuple[str, str]) -> str | None:
    """The value environment ``variable`` pins ``setting`` (an ``auto``) to, or None where it is unset.

    Raises:
        ConfigError: naming the variable, its value and the choices.
    """
    import os

    pinned = os.environ.get(variable)
    if not pinned:
        return None
    if pinned not in choices:
        from fmtrain.config import ConfigError

        raise ConfigError(f"${variable}", pinned, f"pins what {setting} means: {' or '.join(choices)}")
    return pinned


def resolve_precision(kind: str, strategy: str, precision: str, index: int = 0) -> tuple[str, str]:
    """``precision`` itself, or for ``auto`` what this device trains fastest in without loss scaling
    (:meth:`Capabilities.auto_precision`), unless ``$FMTRAIN_PRECISION_AUTO`` pins it; and why."""
    if precision != "auto":
        return precision, "asked for"
    if pinned := site_pin(AUTO_PIN, "precision=auto", ("fp32", "bf16")):
        return pinned, f"${AUTO_PIN}={pinned}"
    return probe(kind, index, engines=strategy == "deepspeed").auto_precision(strategy)


def compile_pin() -> bool | None:
    """What ``$FMTRAIN_COMPILE_AUTO`` pins ``trainer.compile=auto`` to (true, false), or None where it is unset."""
    pinned = site_pin(COMPILE_PIN, "trainer.compile=auto", ("true", "false"))
    return None if pinned is None else pinned == "true"


def cpu_compile_problem() -> str | None:
    """Why ``torch.compile`` cannot build CPU kernels here, or None: a one-line function is compiled and
    run as a block's would be (inductor needs a C++ compiler, ``$CXX`` or ``g++``, and Python's headers).
    Costs a few seconds (about 10 with a cold inductor cache), most of which a block's compile then saves."""
    import torch

    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 2 + 1

    x = torch.linspace(0, 1, 8)
    try:
        compiled = torch.compile(probe, fullgraph=True, dynamic=False)(x)
    except Exception as error:  # InductorError (InvalidCxxCompiler, a failed build): its first line says which
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    return None if torch.allclose(compiled, probe(x)) else "a compiled function computed other values than eager"


def check(kind: str, strategy: str, precision: str, index: int = 0) -> None:
    """Refuse what device ``kind`` (``"cpu"``, ``"cuda"``) number ``index`` cannot train: a
    ConfigError naming the device and the alternative. Validation asks it of this machine before a
    local launch; each rank asks it of its own device, since a node may differ from the submitter."""
    from fmtrain.config import ConfigError

    precision = resolve_precision(kind, strategy, precision, index)[0]
    caps = probe(kind, index, engines=strategy == "deepspeed")
    if reason := caps.refusal(strategy, precision):
        raise ConfigError("precision.name", precision, reason)
