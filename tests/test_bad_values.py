"""Every field of every schema, given a bad value on the command line: wrong type, negative, zero, huge,
empty, nan/inf, unknown. ``fmtrain train --dry-run`` refuses each with exit 2 and one line naming the
field, before anything is written; none ends in a traceback.

The cases come from the schema itself (each field's type), so a new field is covered the day it is
added; which fields take zero, an empty string or null is said here, by hand, not read from the
domains under test.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from fmtrain.config import LauncherConfig, StrategyConfig, TrainConfig
from launch.cli import main

# Fields that take zero (the rest of the numbers must be positive).
ZERO_OK = {
    "seed", "optim.min_lr_ratio", "optim.weight_decay", "optim.warmup_steps", "optim.grad_clip",
    "launcher.max_restarts", "launcher.gpus_per_node", "launcher.signal_delay_s", "launcher.max_requeues",
    "launcher.gpus_per_worker", "launcher.max_failures", "trainer.hang_timeout_s",
}  # fmt: skip
# Free-form strings where an empty value means something (the default cache folder; no pretrained weights).
EMPTY_OK = {"data.cache_dir", "model.name", "model.path", "trainer.init_from", "model.hf_architecture", "model.target"}
# Free-form strings: no list of choices to leave ("nosuchvalue" is a valid name).
FREE_TEXT = {
    "experiment", "run_dir", "model.name", "model.arch", "data.name", "data.cache_dir", "trainer.resume",
    "launcher.partition", "launcher.account", "launcher.qos", "launcher.constraint", "launcher.exclude",
    "launcher.job_name", "tune.name", "model.hf_architecture", "model.target", "data.text_field", "data.split",
}  # fmt: skip
# Maps of free keys (strategy.deepspeed, launcher.sbatch, tune.space): checked by their own tests.
SKIPPED_TYPES = (dict,)
HUGE = 10**30


def fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, typing.Any]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += fields(hint, f"{prefix}{f.name}.")
        elif (typing.get_origin(hint) or hint) not in SKIPPED_TYPES:
            out.append((f"{prefix}{f.name}", hint))
    return out


def option_of(key: str) -> list[str]:
    """The strategy or launcher option a key belongs to, chosen first (a key of another option is
    refused for that reason alone, which is a different test)."""
    section, _, name = key.partition(".")
    options = {"strategy": StrategyConfig.OPTIONS, "launcher": LauncherConfig.OPTIONS}.get(section, {})
    owner = next((option for option, keys in options.items() if name in keys), None)
    return [f"{section}={owner}"] if owner else []


def bad_values(key: str, hint: typing.Any) -> list[str]:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is typing.Union or type(None) in typing.get_args(hint) else hint
    origin = typing.get_origin(base) or base
    if origin is bool:
        return ["-1", "2", "maybe", "''"]
    if origin is int or origin is float:
        values = ["abc", "nan", "inf", "-inf", "-1", str(HUGE), "''", "[1]"]
        return values + ([] if key in ZERO_OK else ["0"])
    if origin is str:
        values = ["[a]", "{a: 1}", "x" * 300 if key in ("run_dir", "trainer.resume", "data.cache_dir") else None]
        values += [] if key in EMPTY_OK else ["''"]
        values += [] if key in FREE_TEXT else ["nosuchvalue"]
        return [v for v in values if v is not None]
    if origin in (list, tuple):
        return ["[{a: 1}]", "abc", "[[1]]"] + (
            ["[0.9]", "[0.9,0.95,0.99]", "[nan,0.9]", "[0.9,1.5]"] if key == "optim.betas" else []
        )
    raise AssertionError(f"{key}: a field type this test does not know ({hint}); add its bad values")


CASES = [(key, value) for key, hint in fields() for value in bad_values(key, hint)]


def schema_keys(node: typing.Any = None, prefix: str = "") -> set[str]:
    """Every leaf of the schema as OmegaConf builds a config of it, collected apart from :func:`fields` (so a
    field that ``fields`` missed is missed by the table too, and shows here); free maps left out, as above."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.structured(TrainConfig) if node is None else node
    keys: set[str] = set()
    for key in node:
        child = node._get_node(key)
        if not isinstance(child, DictConfig):
            keys.add(f"{prefix}{key}")
        elif OmegaConf.get_type(child) is not dict:
            keys |= schema_keys(child, f"{prefix}{key}.")
    return keys


def test_the_table_covers_every_field() -> None:
    covered = {key for key, _ in CASES}
    assert covered == schema_keys() and len(CASES) > 400, (sorted(schema_keys() ^ covered), len(CASES))


@pytest.mark.parametrize(("key", "value"), CASES, ids=[f"{k}={v[:20]}" for k, v in CASES])
def test_a_bad_value_is_refused_before_anything_starts(
    key: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    overrides = [*option_of(key), f"run_dir={run_dir}" if key != "run_dir" else "", f"{key}={value}"]
    code = main(["train", "--dry-run", *[o for o in overrides if o]])
    err = capsys.readouterr().err
    assert code == 2, f"{key}={value} was accepted:\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fmtrain: error: ") and key in lines[0], err
    assert "Traceback" not in err and not run_dir.exists()


# Each value reported as accepted before this check existed (issue 13's findings), with what must be named.
FINDINGS = [
    (["model.init_std=-1"], "model.init_std"),
    (["model.rope_theta=0"], "model.rope_theta"),
    (["model.rope_theta=-1"], "model.rope_theta"),
    (["model.norm_eps=nan"], "model.norm_eps"),
    (["model.norm_eps=1e300"], "model.norm_eps"),
    (["model.ffn_dim_multiplier=inf"], "model.ffn_dim_multiplier"),
    (["model.ffn_dim_multiplier=nan"], "model.ffn_dim_multiplier"),
    (["model.ffn_dim_multiplier=1e-300"], "model.ffn_dim_multiplier"),
    (["model.n_kv_heads=0"], "model.n_kv_heads"),
    (["model.dim=1000000000000"], "model.dim"),
    (["model.n_layers=1000000000000"], "model.n_layers"),
    (["model.vocab_size=1000000000000"], "model.vocab_size"),
    (["model.max_seq_len=1000000000000"], "model.max_seq_len"),
    (["trainer.global_batch_size=1000000000000"], "trainer.global_batch_size"),
    (["trainer.eval_batches=1000000000000"], "trainer.eval_batches"),
    (["seed=1e23"], "seed"),
    (["seed=100000000000000000000000"], "seed"),
    (["optim.lr=nan"], "optim.lr"),
    (["optim.lr=inf"], "optim.lr"),
    (["optim.eps=-1"], "optim.eps"),
    (["optim.eps=nan"], "optim.eps"),
    (["optim.weight_decay=nan"], "optim.weight_decay"),
    (["optim.grad_clip=nan"], "optim.grad_clip"),
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.betas=[0.9,0.95,0.99]"], "optim.betas"),
    (["optim.name=anything"], "optim.name"),
    (["trainer.resume="], "trainer.resume"),
    ([f"trainer.resume={'r' * 300}"], "trainer.resume"),
    (["run_dir="], "run_dir"),
    ([f"data.cache_dir={'c' * 300}"], "data.cache_dir"),
    (["data.paths=[{a:1}]"], "data.paths"),
    (["data=text_files", "data.paths=[README.md,/no/such/*.txt]"], "data.paths"),
    (["trainer.peak_flops=1e-300"], "trainer.peak_flops"),
    (["trainer.peak_flops=nan"], "trainer.peak_flops"),
    (["trainer.compile=-1"], "trainer.compile"),
    (["launcher.nproc=2", "strategy.bucket_cap_mb=100000000000000000000000"], "strategy.bucket_cap_mb"),
    (["launcher.monitor_interval=nan"], "launcher.monitor_interval"),
    (["launcher.monitor_interval=1e300"], "launcher.monitor_interval"),
    (["launcher=slurm", "launcher.mem_gb=inf"], "launcher.mem_gb"),
    (["launcher=slurm", "launcher.mem_gb=nan"], "launcher.mem_gb"),
    (["launcher=slurm", "launcher.mem_gb=1e300"], "launcher.mem_gb"),
    (["launcher=slurm", "launcher.setup=[{a:1}]"], "launcher.setup"),
    (["launcher=slurm", "launcher.env_allow=[{a:1}]"], "launcher.env_allow"),
    (["launcher=slurm", "launcher.partition="], "launcher.partition"),
    (["launcher=ray", "launcher.address=nosuchvalue"], "launcher.address"),
    (["launcher=ray", "launcher.object_store_mb=1000000000000"], "launcher.object_store_mb"),
    (["launcher=ray", "launcher.cpus_per_worker=nan"], "launcher.cpus_per_worker"),
    (["tune.cpus_per_trial=nan"], "tune.cpus_per_trial"),
    (["tune.address=nosuchvalue"], "tune.address"),
]


@pytest.mark.parametrize(("overrides", "key"), FINDINGS, ids=[" ".join(o)[:40] for o, _ in FINDINGS])
def test_each_reported_bad_value_is_refused(
    overrides: list[str], key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = [] if any(o.startswith("run_dir=") for o in overrides) else [f"run_dir={tmp_path / 'run'}"]
    assert main(["train", "--dry-run", *run_dir, *overrides]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"fmtrain: error: {key}=") and "Traceback" not in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ('+tune.space.model.n_layers="uniform(0.5, 2.5)"', "model.n_layers is an integer: use randint"),
        ('+tune.space.model.n_layers="choice([-1, 0])"', "tune.space.model.n_layers=-1 is invalid: a trial would run with"),
    ],
)
def test_a_search_space_outside_a_fields_domain_is_refused(space: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tune", "tune=asha", space]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_a_model_that_cannot_fit_this_machine_is_refused_before_launch() -> None:
    from launch.compose import compose
    from launch.local import LocalLauncher
    from launch.spec import LaunchError

    with pytest.raises(LaunchError, match=r"^model.name='8b' is invalid: needs about \d+\.\d GiB per rank .* memory is"):
        LocalLauncher().preflight(compose(["model=8b"]))
    LocalLauncher().preflight(compose(["model=tiny", "launcher.nproc=2"]))  # fits: no error
