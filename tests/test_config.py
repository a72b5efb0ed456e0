"""Config composition and validation, through the compose API and the real CLI."""

from __future__ import annotations

import subprocess

import pytest
from conftest import FMTRAIN, fmtrain

from fmtrain.config import ConfigError
from launch.compose import UsageError, compose, expand_sweep, group_options


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, options in group_options().items() for o in options])
def test_every_option_of_every_group_composes(group: str, option: str, tmp_path) -> None:
    extra = {("data", "text_files"): [f"data.paths=[{__file__}]"], ("strategy", "fsdp_tp"): ["launcher.nproc=4"]}.get(
        (group, option), []
    )
    if (group, option) == ("model", "hf"):  # a Hugging Face model directory, made here
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
        extra = [f"model.path={tmp_path / 'hf'}", "data.seq_len=64"]
    if (group, option) == ("model", "hf_auto"):  # any transformers causal LM: a GPT-2 here
        import transformers

        config = transformers.GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=128)
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
        extra = [f"model.path={tmp_path / 'hf'}", "data.seq_len=64"]
    if group == "data" and option in ("jsonl", "parquet", "hf_disk", "tokens"):  # a file of each kind, made here
        from conftest import write_source

        extra = [f"data.paths=[{write_source(option, tmp_path, ['one document', 'another'])}]"]
    if (group, option) == ("data", "mix"):
        from conftest import write_source

        one, two = write_source("jsonl", tmp_path, ["a document"]), write_source("parquet", tmp_path, ["another"])
        extra = [f"data.mix=[{{name: jsonl, paths: [{one}], weight: 2}}, {{name: parquet, paths: [{two}]}}]"]
    if (group, option) == ("model", "custom"):  # the example module users copy
        extra = ["model.target=examples.custom_model.tiny_gpt.build", "data.seq_len=64"]
    cfg = compose([f"{group}={option}", *extra], check=False)
    if group == "cluster":  # site profiles fill in launcher fields
        assert option == "none" or cfg.launcher.partition
    else:
        assert getattr(cfg, group).name == option
    if (group, option) not in (("model", "8b"), ("model", "1b"), ("precision", "fp8")):
        compose([f"{group}={option}", *extra])  # and validates (big models validate too, below)


def test_big_models_validate_and_have_their_size() -> None:
    import torch

    from fmtrain.models.llama import Transformer

    for name, expected in (("1b", 1.24e9), ("8b", 8.03e9)):
        cfg = compose([f"model={name}", "trainer.device=cpu"])
        with torch.device("meta"):
            model = Transformer(cfg.model)
        assert model.num_params() == pytest.approx(expected, rel=0.01)


def test_defaults_and_overrides_reach_the_typed_config() -> None:
    cfg = compose(["trainer.max_steps=7", "launcher.nproc=2", "optim.lr=1e-4", "run_dir=/tmp/x"])
    assert (cfg.trainer.max_steps, cfg.launcher.nproc, cfg.optim.lr, cfg.run_dir) == (7, 2, 1e-4, "/tmp/x")
    assert cfg.model.name == "tiny" and cfg.trainer.resume == "auto"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.foo=1"], r"unknown key 'trainer.foo'; valid keys under 'trainer': max_steps, .*resume"),
        (["bogus=1"], r"unknown key 'bogus'; valid keys at the top level: experiment, run_dir"),
        (["+trainer.foo=1"], r"trainer.foo=1 is invalid: unknown key; valid keys under 'trainer': max_steps"),
        (
            ["launcher=slurm", "launcher.tasks_per_node=2", "launcher.procs_per_task=2"],
            r"launcher.procs_per_task=2 is invalid: several ranks per task needs one task per node",
        ),
        (["+bogus=1"], r"bogus=1 is invalid: unknown key; valid keys under 'the top level': experiment"),
        (["launcher=ray", "launcher.submit=later"], r"launcher.submit='later' is invalid: valid choices are foreground, jobs"),
        (["launcher=ray", "launcher.submit=jobs"], r"launcher.address=None is invalid: launcher.submit=jobs needs the dashboard"),
        (["trainer.max_steps=abc"], r"trainer.max_steps='abc' is invalid: expected integer"),
        (["model=huge"], r"model=huge: no such option; valid choices are 1b, 8b, custom, hf, hf_auto, small, tiny"),
        (["trainer.max_steps=0"], r"trainer.max_steps=0 is invalid: must be positive"),
        (["optim.schedule=step"], r"optim.schedule='step' is invalid: valid choices are cosine, linear, constant"),
        (["optim.implementation=apex"], r"optim.implementation='apex' is invalid: valid choices are fused, foreach, for_loop"),
        (
            ["precision=fp32", "precision.name=fp64"],
            r"precision.name='fp64' is invalid: valid choices are auto, fp32, bf16, fp16, fp8",
        ),
        (
            ["precision=fp8", "trainer.device=cpu"],
            r"precision.name='fp8' is invalid: fp8 training needs GPUs .* device is cpu: .*: use precision=bf16",
        ),
        (
            ["trainer.global_batch_size=10", "launcher.nproc=4"],
            r"trainer.global_batch_size=10 .* divisible by .* data-parallel ranks = 1 x 4 = 4",
        ),
        (
            ["trainer.global_batch_size=16", "trainer.micro_batch_size=3"],
            r"divisible by trainer.micro_batch_size x data-parallel ranks = 3 x 1 = 3",
        ),
        (["trainer.resume=/no/such/checkpoint"], r"trainer.resume='/no/such/checkpoint' is invalid: must be auto, never"),
        (["launcher.nproc=999", "trainer.device=cpu"], r"launcher.nproc=999 is invalid: must be <= \d+"),
        (["model.n_heads=3"], r"model.n_heads=3 is invalid: must divide model.dim=256"),
        (["data=text_files"], r"data.paths=\[\] is invalid: give one or more files"),
        (["data=text_files", "data.paths=[/no/such/*.txt]"], r"data.paths=.* no file matches"),
        (["data.seq_len=4096"], r"data.seq_len=4096 is invalid: must be <= model.max_seq_len=1024"),
        (
            ["strategy=ddp", "strategy.tp=2", "launcher.nproc=2"],
            r"strategy.tp=2 is invalid: tensor parallelism needs strategy=tp or fsdp_tp",
        ),
        (["strategy=tp", "strategy.tp=3", "launcher.nproc=4"], r"strategy.tp=3 is invalid: must divide the world size 4"),
        (
            ["strategy=fsdp", "strategy.sequence_parallel=true", "launcher.nproc=2"],
            r"strategy.sequence_parallel=True is invalid: splits tensor-parallel activations: strategy=tp or fsdp_tp, not fsdp",
        ),
        (
            ["strategy=tp", "strategy.sequence_parallel=true", "launcher.nproc=2", "data.seq_len=255"],
            r"strategy.sequence_parallel=True is invalid: needs data.seq_len=255 divisible by the tensor-parallel degree 2",
        ),
        (["strategy=tp", "strategy.tp=2", "launcher.nproc=4"], r"strategy.tp=2 is invalid: .* tp must equal the world size 4"),
        (
            ["strategy=fsdp_tp", "launcher.nproc=2"],
            r"strategy.tp=2 is invalid: strategy=fsdp_tp needs at least 2 data-parallel shards",
        ),
        (
            ["strategy=tp", "launcher.nproc=2", "model.n_kv_heads=1"],
            r"strategy.tp=2 is invalid: must divide model.n_kv_heads = 1",
        ),
        (
            ["strategy=fsdp_tp", "strategy.tp=4", "launcher.nproc=8", "model.dim=192", "model.n_heads=6"],
            r"must divide model.n_heads = 6",
        ),
        (["strategy=deepspeed", "strategy.zero_stage=4"], r"strategy.zero_stage=4 is invalid: valid choices are 1, 2, 3"),
        (
            ["strategy=deepspeed", "strategy.offload_params=true"],
            r"strategy.offload_params=True is invalid: parameter offload needs strategy.zero_stage=3, not 2",
        ),
        (
            ["strategy=deepspeed", "strategy.tp=2", "launcher.nproc=2"],
            r"strategy.tp=2 is invalid: tensor parallelism needs strategy=tp or fsdp_tp, not deepspeed",
        ),
        (
            ["strategy=deepspeed", "trainer.on_nonfinite=skip"],
            r"trainer.on_nonfinite='skip' is invalid: strategy=deepspeed steps inside its engine",
        ),
        (
            ["strategy=deepspeed", "+strategy.deepspeed.train_batch_size=64"],
            r"strategy.deepspeed=\['train_batch_size'\] is invalid: these keys come from trainer.global_batch_size",
        ),
        # A key of another option than the chosen one: refused with that option's keys.
        (
            ["strategy=fsdp", "strategy.offload_optimizer=true"],
            r"strategy.offload_optimizer=True is invalid: a key of strategy=deepspeed, not of strategy=fsdp; "
            r"the keys of strategy=fsdp: name, reshard_after_forward, cpu_offload$",
        ),
        (
            ["strategy=ddp", "strategy.cpu_offload=true"],
            r"a key of strategy=fsdp\|fsdp_tp, not of strategy=ddp; "
            r"the keys of strategy=ddp: name, find_unused_parameters, bucket_cap_mb$",
        ),
        (["strategy=deepspeed", "strategy.bucket_cap_mb=50"], r"strategy.bucket_cap_mb=50 is invalid: a key of strategy=ddp"),
        (["strategy=tp", "strategy.zero_stage=3"], r"the keys of strategy=tp: name, tp, sequence_parallel$"),
        (
            ["launcher=local", "launcher.partition=gpu"],
            r"launcher.partition='gpu' is invalid: a key of launcher=slurm, not of launcher=local; "
            r"the keys of launcher=local: name, nproc, max_restarts, shutdown_timeout, monitor_interval, start$",
        ),
        (["launcher.num_workers=4"], r"launcher.num_workers=4 is invalid: a key of launcher=ray, not of launcher=local"),
        (["launcher=slurm", "launcher.nproc=2"], r"launcher.nproc=2 is invalid: a key of launcher=local, not of launcher=slurm"),
        (["launcher=ray", "launcher.time_min=5"], r"the keys of launcher=ray: name, address, num_workers"),
        (
            ["model.arch=gpt3"],
            r"model.arch='gpt3' is invalid: one of [\w, -]*llama \(a model of your own: imports=\[your_module\]",
        ),
        (["imports=[no_such_module_here]"], r"imports='no_such_module_here' is invalid: cannot be imported: ModuleNotFoundError"),
    ],
)
def test_bad_overrides_are_refused_with_field_value_and_choices(overrides: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        compose(overrides)


def test_deepspeed_json_comes_from_the_typed_config_with_extra_keys_merged() -> None:
    from fmtrain.strategies.zero import deepspeed_config

    cfg = compose(
        ["strategy=deepspeed", "strategy.zero_stage=3", "+strategy.deepspeed.zero_optimization.reduce_bucket_size=1000"]
    )
    generated = deepspeed_config(
        zero_stage=cfg.strategy.zero_stage,
        precision="bf16",
        micro=2,
        accum=4,
        dp_size=2,
        grad_clip=1.0,
        offload_optimizer=True,
        offload_params=False,
        extra=cfg.strategy.deepspeed,
    )
    assert generated["train_batch_size"] == 16 and generated["gradient_accumulation_steps"] == 4
    assert generated["zero_optimization"]["stage"] == 3
    assert generated["zero_optimization"]["reduce_bucket_size"] == 1000  # merged, not replacing the section
    assert generated["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert generated["bf16"] == {"enabled": True} and generated["fp16"]["enabled"] is False
    assert generated["gradient_clipping"] == 1.0


def test_sweeps_expand_to_every_combination() -> None:
    jobs = expand_sweep(["optim.lr=1e-3,3e-4", "model=tiny,small", "trainer.max_steps=5"])
    assert len(jobs) == 4
    assert ["optim.lr=0.001", "model=small", "trainer.max_steps=5"] in jobs


def test_cli_refuses_bad_values_with_exit_code_2_and_no_traceback(cache_dir, tmp_path) -> None:
    for args, message in (
        (["trainer.max_steps=-1"], "trainer.max_steps=-1 is invalid: must be positive"),
        (["trainer.nope=1"], "unknown key 'trainer.nope'"),
        (["launcher=slurmish"], "launcher=slurmish: no such option; valid choices are local"),
        (["optim.lr=1e-3,1e-4"], "describes a sweep of 2 runs; add -m"),
        (["-m", "optim.lr=1e-3,-1"], "optim.lr=-1.0 is invalid: must be positive"),
        (
            ["strategy=fsdp", "strategy.offload_optimizer=true"],
            "the keys of strategy=fsdp: name, reshard_after_forward, cpu_offload",
        ),
        (["launcher=local", "launcher.partition=gpu"], "the keys of launcher=local: name, nproc, max_restarts"),
        (["--dry-run", "launcher=local", "launcher.partition=gpu"], "a key of launcher=slurm, not of launcher=local"),
    ):
        result = fmtrain(["train", f"run_dir={tmp_path}/run", *args], cache_dir, timeout=60)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run").exists(), "nothing may start or be written for a refused command"


def test_cli_help_lists_subcommands_and_groups(cache_dir) -> None:
    result = fmtrain(["--help"], cache_dir, timeout=60)
    assert result.returncode == 0
    assert "train" in result.stdout and "status" in result.stdout
    assert "model      1b, 8b, custom, hf, hf_auto, small, tiny" in result.stdout
    assert "launcher   local" in result.stdout


def test_cli_output_into_a_closed_pipe_ends_quietly(cache_dir) -> None:
    """``fmtrain --help | head -1``: the reader leaves early; no BrokenPipeError traceback."""
    import shlex

    piped = subprocess.run(f"{shlex.quote(FMTRAIN)} --help | head -1", shell=True, capture_output=True, text=True, timeout=60)
    assert piped.stdout.startswith("usage: fmtrain")
    assert piped.stderr == ""


def test_cli_cfg_job_prints_the_config_and_runs_nothing(cache_dir, tmp_path) -> None:
    result = fmtrain(["train", "--cfg", "job", "trainer.max_steps=3", f"run_dir={tmp_path}/r"], cache_dir, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "max_steps: 3" in result.stdout and "name: tiny" in result.stdout
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_a_config_error_crosses_processes_whole() -> None:
    """Ray hands a trial's exception to the sweep's driver by pickling it."""
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("model.n_heads", 3, "must divide model.dim=64")))
    assert (error.key, error.value, str(error)) == ("model.n_heads", 3, "model.n_heads=3 is invalid: must divide model.dim=64")


def test_the_library_call_validates_as_the_command_does(tmp_path) -> None:
    """``fmtrain.run(cfg)`` from a user's program: the same ConfigError, before anything is written."""
    from fmtrain import run

    cfg = compose([f"run_dir={tmp_path / 'run'}", "model.n_heads=3"], check=False)
    with pytest.raises(ConfigError, match=r"^model.n_heads=3 is invalid: must divide model.dim=256$"):
        run(cfg)
    assert not (tmp_path / "run").exists()
