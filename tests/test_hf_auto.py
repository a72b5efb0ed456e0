"""model=hf_auto: any transformers causal LM, built by transformers from its config.json, trained by
fmtrain's strategies. The models are tiny random ones saved here with transformers itself (GPT-2 and
GPT-NeoX, outside the Llama family; Llama through the same path), nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import fmtrain, train_losses

from fmtrain import models, pretrained
from fmtrain.export import load_checkpoint_model
from launch.compose import UsageError, compose

ARCHS = {
    "gpt2": transformers.GPT2Config(
        vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ),
    "gpt_neox": transformers.GPTNeoXConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    "llama": transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    ),
}
FINE_TUNE = ["data.seq_len=64", "data.max_bytes=3000000", "trainer.global_batch_size=8", "trainer.eval_batches=2"]
FINE_TUNE += ["trainer.plot=false", "trainer.eval_interval=3", "checkpoint.interval=3", "checkpoint.keep_last=5"]


def save(arch: str, directory: Path, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[arch]).eval()
    with torch.no_grad():  # norms and biases away from 1 and 0, so a misplaced one shows in the logits
        for param in model.parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return model


def built(directory: Path, *overrides: str) -> torch.nn.Module:
    cfg = compose(["model=hf_auto", f"model.path={directory}", "data.seq_len=64", *overrides])
    recipe = models.recipe(cfg)
    model = recipe.meta()
    model.to_empty(device="cpu")
    recipe.spec.init_weights(model, 0)
    source = pretrained.initial_weights(cfg)
    assert source is not None
    pretrained.load(model, recipe, source)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_auto_computes_the_logits_transformers_computes(arch: str, tmp_path: Path) -> None:
    reference = save(arch, tmp_path / "hf")
    model = built(tmp_path / "hf")
    assert type(model).__name__ == type(reference).__name__
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in reference.named_parameters()]
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - reference(input_ids=ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_rows_give_each_example_the_logits_it_has_alone(arch: str, tmp_path: Path) -> None:
    save(arch, tmp_path / "hf")
    assert models.get("hf_auto").takes_packed(
        compose(["model=hf_auto", f"model.path={tmp_path / 'hf'}", "data.seq_len=64"]).model
    )
    model = built(tmp_path / "hf")
    generator = torch.Generator().manual_seed(2)
    examples = [torch.randint(0, 300, (n,), generator=generator) for n in (11, 6, 9)]
    row = torch.cat([*examples, torch.zeros(6, dtype=torch.long)])[None]  # three examples, then padding
    positions = torch.cat([torch.arange(len(e)) for e in examples] + [torch.zeros(6, dtype=torch.long)])[None]
    documents = torch.cat([torch.full((len(e),), i) for i, e in enumerate(examples)] + [torch.full((6,), -1)])[None]
    with torch.no_grad():
        packed = model(row, position_ids=positions, document_ids=documents)[0]  # as fmtrain's step passes a packed batch
        at = 0
        for example in examples:
            alone = model(example[None])[0]
            assert (packed[at : at + len(example)] - alone).abs().max().item() < 1e-5
            at += len(example)


def test_a_model_with_its_own_code_does_not_take_packed_rows(tmp_path: Path) -> None:
    write_remote_code_model(tmp_path / "hf")
    cfg = compose(["model=hf_auto", f"model.path={tmp_path / 'hf'}", "model.trust_remote_code=true", "data.seq_len=64"]).model
    assert not models.get("hf_auto").takes_packed(cfg)  # its masks are its own: data.packing=bfd is refused


def test_pickle_weights_load_only_when_allowed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    reference = save("gpt_neox", tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    torch.save(load_file(str(weights)), tmp_path / "hf" / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UsageError, match=r"has only pickle weights \(\.bin\).*model\.allow_pickle=true"):
        compose(["model=hf_auto", f"model.path={tmp_path / 'hf'}", "data.seq_len=64"])
    model = built(tmp_path / "hf", "model.allow_pickle=true")
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - reference(input_ids=ids).logits).abs().max().item() < 1e-5


def write_remote_code_model(directory: Path) -> None:
    """A model directory whose config.json names its own classes (auto_map), as hub models with code do."""
    directory.mkdir(parents=True)
    (directory / "configuration_tinygpt.py").write_text(
        "from transformers import GPT2Config\n\n\nclass TinyGPTConfig(GPT2Config):\n    model_type = 'tinygpt'\n"
    )
    (directory / "modeling_tinygpt.py").write_text(
        "from transformers import GPT2LMHeadModel\n\nfrom .configuration_tinygpt import TinyGPTConfig\n\n\n"
        "class TinyGPTForCausalLM(GPT2LMHeadModel):\n    config_class = TinyGPTConfig\n"
    )
    save("gpt2", directory)
    config = json.loads((directory / "config.json").read_text())
    config |= {
        "model_type": "tinygpt",
        "architectures": ["TinyGPTForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tinygpt.TinyGPTConfig",
            "AutoModelForCausalLM": "modeling_tinygpt.TinyGPTForCausalLM",
        },
    }
    (directory / "config.json").write_text(json.dumps(config))


BAD = {
    # case: (overrides beyond model=hf_auto model.path=DIR, what the one line says)
    "no tensor-parallel plan": (
        ["strategy=tp", "launcher.nproc=2"],
        "strategy.name='tp' is invalid: GPT2Config has no tensor-parallel plan (base_model_tp_plan): use ddp or fsdp",
    ),
    "an override config.json decides": (["model.n_layers=3"], "model.n_layers=3 is invalid: must be 2"),
    "not a causal LM": (["vit"], "has no causal-LM class in transformers"),
    "remote code not trusted": (["remote"], "model.trust_remote_code=False is invalid: "),
    "no config.json": (["rm config.json"], "has no config.json: not a Hugging Face model directory"),
    "missing tensor": (["drop transformer.h.1.mlp.c_fc.weight"], "missing transformer.h.1.mlp.c_fc.weight"),
}


@pytest.mark.parametrize("case", BAD)
def test_what_hf_auto_cannot_train_is_refused_before_launch(case: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "hf"
    overrides, expected = BAD[case]
    action = overrides[0]
    if action == "remote":
        write_remote_code_model(directory)
        overrides = []
    else:
        save("gpt2", directory)
    if action == "vit":
        transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4).save_pretrained(directory)
        overrides = ["model.n_layers=2", "model.vocab_size=300", "model.max_seq_len=128"]
    elif action == "rm config.json":
        (directory / "config.json").unlink()
        overrides = []
    elif action.startswith("drop "):
        tensors = load_file(str(directory / "model.safetensors"))
        del tensors[action.split()[1]]
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        overrides = []
    with pytest.raises(UsageError) as error:
        compose(["model=hf_auto", f"model.path={directory}", "data.seq_len=64", *overrides])
    message = str(error.value)
    assert expected in message and "\n" not in message, message


def export(run_dir: Path) -> Path:
    exported = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "fmtrain"), "export", str(run_dir)], capture_output=True, text=True
    )
    assert exported.returncode == 0, exported.stderr
    return Path(exported.stdout.strip())


def assert_reloads(out: Path, run_dir: Path, step: int, model_cfg: object, **options: object) -> None:
    """transformers loads the export as the source's class, with no missing or unexpected tensor, and
    computes the checkpoint's logits."""
    verification = json.loads((out / "verification.json").read_text())
    assert verification["max_abs_logit_diff"] < 1e-5 and verification["missing_keys"] == verification["unexpected_keys"] == []
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True, **options
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys")), info
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    trained = load_checkpoint_model(run_dir / "checkpoints" / f"step_{step:06d}", model_cfg)
    with torch.no_grad():
        assert (theirs.eval()(input_ids=ids).logits - trained.eval()(ids)).abs().max().item() < 1e-5


def gpt2_one_process(made_once, reference_run) -> tuple[Path, list[str], dict[int, float]]:
    """The GPT-2 saved here, the fine-tune's overrides, and its losses in one process (made once a session)."""
    hf = made_once("hf-gpt2", lambda folder: save("gpt2", folder))
    base = ["model=hf_auto", f"model.path={hf}", *FINE_TUNE, "trainer.max_steps=6"]
    return hf, base, train_losses(reference_run(*base))


@pytest.mark.slow
def test_gpt2_under_fsdp_killed_and_resumed_equals_one_process_and_exports(
    cache_dir: Path, tmp_path: Path, made_once, reference_run
) -> None:
    """GPT-2 (outside the Llama family), fsdp on 2 ranks with activation checkpointing, killed after
    step 4 and run again from step 3's checkpoint: its 6 losses equal one process's within 1e-5; the
    export reloads in transformers."""
    hf, base, expected = gpt2_one_process(made_once, reference_run)
    two = ["train", *base, f"run_dir={tmp_path / 'two'}", "strategy=fsdp", "launcher.nproc=2"]
    two += ["trainer.activation_checkpointing=full"]
    killed = fmtrain(two, cache_dir, FMTRAIN_FAULT="0:5:kill")
    assert killed.returncode != 0
    again = fmtrain(two, cache_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in (tmp_path / "two" / "logs" / "rank0.log").read_text()
    got = train_losses(tmp_path / "two")
    assert expected.keys() == got.keys() == set(range(1, 7))
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
    model_cfg = compose(["model=hf_auto", f"model.path={hf}", "data.seq_len=64"]).model
    out = export(tmp_path / "two")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert_reloads(out, tmp_path / "two", 6, model_cfg)


@pytest.mark.slow
def test_gpt2_under_ddp_and_zero3_built_partitioned_equals_one_process(
    cache_dir: Path, tmp_path: Path, made_once, reference_run
) -> None:
    """The other strategies: DDP on 2 ranks, and ZeRO-3 with zero.Init, where each parameter is
    gathered alone while the file's tensor is copied in."""
    _, base, expected = gpt2_one_process(made_once, reference_run)
    zero3 = ["strategy=deepspeed", "strategy.zero_stage=3", "strategy.zero_init=true"]
    for name, strategy in (("ddp", ["strategy=ddp"]), ("zero3", zero3)):
        run = fmtrain(["train", *base, f"run_dir={tmp_path / name}", *strategy, "launcher.nproc=2"], cache_dir)
        assert run.returncode == 0, run.stdout + run.stderr
        got = train_losses(tmp_path / name)
        assert got.keys() == expected.keys() == set(range(1, 7))
        for step, loss in expected.items():
            assert abs(got[step] - loss) <= 1e-5 * abs(loss), (name, step, got[step], loss)


@pytest.mark.slow
def test_gpt_neox_under_tensor_parallel_equals_one_process_and_exports_its_own_names(cache_dir: Path, tmp_path: Path) -> None:
    """GPT-NeoX split by its own tp plan on 2 ranks equals one process; its export keeps the
    checkpoint names transformers writes (embed_out, which the v5 class calls lm_head)."""
    save("gpt_neox", tmp_path / "hf")
    base = ["train", "model=hf_auto", f"model.path={tmp_path / 'hf'}", *FINE_TUNE, "trainer.max_steps=6"]
    one = fmtrain([*base, f"run_dir={tmp_path / 'one'}"], cache_dir)
    assert one.returncode == 0, one.stdout + one.stderr
    two = fmtrain([*base, f"run_dir={tmp_path / 'two'}", "strategy=tp", "launcher.nproc=2"], cache_dir)
    assert two.returncode == 0, two.stdout + two.stderr
    expected, got = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert expected.keys() == got.keys() == set(range(1, 7))
    for step, loss in expected.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
    out = export(tmp_path / "two")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "embed_out.weight" in set(f.keys())
    model_cfg = compose(["model=hf_auto", f"model.path={tmp_path / 'hf'}", "data.seq_len=64"]).model
    assert_reloads(out, tmp_path / "two", 6, model_cfg)


@pytest.mark.slow
def test_a_model_with_its_own_code_trains_when_trusted_and_exports_its_code(cache_dir: Path, tmp_path: Path) -> None:
    write_remote_code_model(tmp_path / "hf")
    run_dir = tmp_path / "run"
    args = ["train", "model=hf_auto", f"model.path={tmp_path / 'hf'}", *FINE_TUNE, "trainer.max_steps=3", f"run_dir={run_dir}"]
    refused = fmtrain(args, cache_dir)
    assert refused.returncode == 2 and "model.trust_remote_code=true" in refused.stderr, refused.stderr
    result = fmtrain([*args, "model.trust_remote_code=true"], cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    out = export(run_dir)
    assert (out / "modeling_tinygpt.py").is_file() and (out / "configuration_tinygpt.py").is_file()
    assert "TinyGPTForCausalLM" in json.loads((out / "verification.json").read_text())["loader"]
    model_cfg = compose(
        ["model=hf_auto", f"model.path={tmp_path / 'hf'}", "model.trust_remote_code=true", "data.seq_len=64"]
    ).model
    assert_reloads(out, run_dir, 3, model_cfg, trust_remote_code=True)
