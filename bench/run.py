"""Run every benchmark, then write bench/results/summary.md from their JSON files.

    python bench/run.py            # or: make bench
    python bench/run.py --summary  # only summary.md, from the results already there

Benchmarks compare against a baseline measured in the same run (ratios, not absolute seconds).
Run them on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def summary() -> str:
    machines: dict[str, None] = {}  # every machine a result comes from, in order

    def load(name: str) -> dict:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        m = result["machine"]
        machines[f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, Python {m['python']}"] = None
        return result

    lines = ["# Benchmark results", "", "| benchmark | baseline (same run) | fmtrain | ratio | goal | measured on |"]
    lines.append("|---|---|---|---|---|---|")

    def add(result: dict, row: str) -> None:
        """A row of the main table, with the machine and date its numbers come from: the benchmarks are
        run one at a time, so rows can come from different machines of the pool (Intel, AMD)."""
        lines.append(f"{row} {measured_on(result)} |")

    for t in map(load, tagged("throughput")):
        add(
            t,
            f"| training throughput, {t['model']} {t['precision']}, 1 process | bare PyTorch loop "
            f"{median(t['bare_tokens_per_s']):,.0f} tok/s | {median(t['fmtrain_tokens_per_s']):,.0f} tok/s "
            f"| {t['ratio']:.3f} | {t['goal']} |",
        )
    for s in map(load, tagged("startup")):
        add(
            s,
            f"| start-up, `trainer.max_steps=1` | torchrun script {s['median_torchrun_s']:.2f} s "
            f"| {s['median_fmtrain_s']:.2f} s | {s['ratio']:.2f} | {s['goal']} |",
        )
    if (RESULTS / "accelerate_ddp.json").is_file():
        a = load("accelerate_ddp")
        add(
            a,
            f"| DDP throughput, tiny fp32, 2 processes | `accelerate launch` (MULTI_CPU) "
            f"{median(a['accelerate_tokens_per_s']):,.0f} tok/s "
            f"| {median(a['fmtrain_tokens_per_s']):,.0f} tok/s | {a['ratio']:.3f} "
            f"| {a['goal']} (ceiling {a['ceiling']:.3f}: forward+backward only) |"
            if "ceiling" in a
            else f"| {median(a['fmtrain_tokens_per_s']):,.0f} tok/s | {a['ratio']:.3f} | {a['goal']} |",
        )
    if (RESULTS / "zero3_init.json").is_file():
        z = load("zero3_init")
        whole = max(r["peak_growth_bytes"] for r in z["built_whole"]) / 2**20
        partitioned = max(r["peak_growth_bytes"] for r in z["built_partitioned"]) / 2**20
        add(
            z,
            f"| ZeRO-3 build, peak memory per rank, {z['model']['fp32_bytes'] / 2**20:,.0f} MiB model, 2 processes "
            f"| built whole {whole:,.0f} MiB | `deepspeed.zero.Init` {partitioned:,.0f} MiB | {z['ratio']:.2f} | {z['goal']} |",
        )
    if (RESULTS / "slurm_latency.json").is_file():
        sl = load("slurm_latency")
        add(
            sl,
            f"| submit-to-first-step on the dev Slurm cluster | bare `sbatch --wrap` {sl['median_s']['bare_sbatch']:.2f} s "
            f"| {sl['median_s']['fmtrain']:.2f} s | +{sl['difference_s']:.2f} s | within {sl['goal_s']:.0f} s |",
        )
    if (RESULTS / "tune_asha.json").is_file():
        ta = load("tune_asha")
        add(
            ta,
            f"| {ta['trials']}-trial learning-rate search | full grid: {ta['grid']['trial_steps']} trial-steps, best val_loss "
            f"{ta['grid']['best_val_loss']:.4f} | ASHA: {ta['asha']['trial_steps']} trial-steps, "
            f"{ta['asha']['best_val_loss']:.4f} "
            f"| compute {ta['compute_ratio_trial_steps']:.2f}, loss {ta['best_loss_ratio']:.3f} "
            "| compute <= 0.35, loss <= 1.02 |",
        )
    if (RESULTS / "ray_startup.json").is_file():
        rs = load("ray_startup")
        add(
            rs,
            f"| start-up, 2 ranks, one step | local launcher {rs['median_s']['local']:.1f} s | launcher=ray "
            f"{rs['median_s']['ray']:.1f} s | {rs['ratio']:.2f} | (reported) |",
        )
    if (RESULTS / "checkpoint_async.json").is_file():
        ca = load("checkpoint_async")
        add(
            ca,
            f"| training blocked per checkpoint, {ca['checkpoint_mb']:.0f} MB | synchronous save {ca['median_sync_s']:.3f} s "
            f"| `checkpoint.async=true` {ca['median_async_s']:.3f} s | {ca['ratio']:.3f} | {ca['goal']} |",
        )
        add(
            ca,
            f"| step time with the hang watchdog | `trainer.hang_timeout_s=0` | default watchdog "
            f"| overhead {ca['watchdog_overhead']:.3%} measured directly (end to end {ca['watchdog_overhead_end_to_end']:+.1%}, "
            f"runs spread {ca['end_to_end_noise']:.1%}) | {ca['watchdog_goal']} |",
        )
    if (RESULTS / "hf_import.json").is_file():
        hf = load("hf_import")
        tune = hf["fine_tune"]
        for memory in hf["import_memory"]:
            add(
                hf,
                f"| peak memory per rank importing a {memory['model_mb'] / 1024:.2f} GiB Llama "
                f"| from_pretrained + a forward {memory['from_pretrained_peak_mb']} MB "
                f"| fsdp, 2 ranks {max(memory['fmtrain_fsdp_rank_peak_mb'])} MB | {memory['ratio']:.2f} | {memory['goal']} |",
            )
        theirs = max(common_median(v) for v in tune["transformers_tokens_per_s"].values())
        ours = max(common_median(v) for v in tune["fmtrain_tokens_per_s"].values())
        add(
            hf,
            "| fine-tuning a Hugging Face Llama (tiny shape), best of eager and compiled "
            f"| transformers' loop {theirs:,.0f} tok/s | model=hf {ours:,.0f} tok/s "
            f"| {tune['ratio']:.2f} (eager {tune['eager_ratio']:.2f}) | {tune['goal']} |",
        )
    for n in map(load, tagged("nanogpt")):
        best = n["best_tokens_per_s"]
        theirs = max(best["nanoGPT compile=False"], best["nanoGPT compile=True"])
        add(
            n,
            f"| `fmtrain train` (default) vs nanoGPT `train.py`, same shape and tokens | nanoGPT best of compile off/on "
            f"{theirs:,.0f} tok/s | {best['fmtrain default']:,.0f} tok/s (precision=fp32: {best['fmtrain precision=fp32']:,.0f}) "
            f"| {n['ratio']:.2f} (fp32: {n['ratio_fp32']:.2f}) | {n['goal']} |",
        )
    for name in [*tagged("step"), *tagged("step_compiled")]:
        st = load(name)
        base, _, tag = name.partition("@")
        # step_compiled's eager rows are its compiled rows' baseline: shown only where no step.json of the kind has eager
        eager_elsewhere = base == "step_compiled" and (RESULTS / f"step{'@' + tag if tag else ''}.json").is_file()
        for key, row in st["shapes"].items():
            if eager_elsewhere and not key.endswith("compiled"):
                continue
            best = row["best_tokens_per_s"]
            nano = f"; nanoGPT's GPT {best['nanoGPT']:,.0f} ({row['vs_nanogpt']:.2f}x)" if "nanoGPT" in best else ""
            # compiled: what compiling cost, as each model's first two steps (compile included)
            first = row.get("first_two_steps_s", {}) if key.endswith("compiled") else {}
            started, sitting = "", ""
            if first:  # and against fmtrain eager in the same sitting
                eager = st["shapes"][key.removesuffix(" compiled")]["best_tokens_per_s"]
                started = (
                    f" ({best['fmtrain'] / eager['fmtrain']:.2f}x its eager step, {best['fmtrain'] / eager['transformers']:.2f}x "
                    f"transformers' eager step (its default); first two steps {first['fmtrain']:.0f} s, "
                    f"transformers' {first['transformers']:.0f} s)"
                )
                sitting = f" (measured {st['date']}: compare ratios, not tok/s, with the eager rows)"
            add(
                st,
                f"| one training step, {key}{sitting} | transformers' LlamaForCausalLM {best['transformers']:,.0f} tok/s{nano} "
                f"| {best['fmtrain']:,.0f} tok/s{started} | {row['vs_transformers']:.2f} | >= 1.15 |",
            )
    if (RESULTS / "tokenization.json").is_file():
        tk = load("tokenization")
        add(
            tk,
            f"| tokenizing a {tk['megabytes']:.0f} MB jsonl with an 8192-token BPE, to ids on disk "
            f"| `datasets.map(batched=True, num_proc=2)` {tk['datasets_mb_per_s']:.2f} MB/s "
            f"| data=jsonl {tk['fmtrain_mb_per_s']:.2f} MB/s | {tk['ratio']:.2f} | >= 1.0 |",
        )
        if "workers2_ratio" in tk:
            add(
                tk,
                f"| `data.num_workers=2` vs 1: the same jsonl; chat records (chatml, masked answers) "
                f"| 1 worker {tk['fmtrain_mb_per_s']:.2f} MB/s; chats {tk['chat_mb_per_s']['1']:.2f} MB/s "
                f"| {tk['workers2_mb_per_s']:.2f} MB/s; chats {tk['chat_mb_per_s']['2']:.2f} MB/s "
                f"| {tk['workers2_ratio']:.2f}; chats {tk['chat_workers2_ratio']:.2f} | |",
            )
    if (RESULTS / "packing.json").is_file():
        pk = load("packing")
        best = pk["best_rows_per_s"]
        add(
            pk,
            f"| fine-tuning rows/s, `data.packing=bfd` (skewed lengths, seq {pk['seq_len']}) | pretraining windows "
            f"{best['windows']:.1f} rows/s | {best['bfd']:.1f} rows/s, {pk['bfd_real_share']:.1%} real tokens "
            f"(padding each alone: {pk['none_real_share']:.1%}) | {pk['ratio']:.2f} | >= 0.95 |",
        )
    for m in map(load, tagged("mfu")):
        for name, row in m["models"].items():
            add(
                m,
                f"| MFU, {name} | {row['precision']} matmul peak {row['peak_gflops']:.0f} GFLOP/s "
                f"| {row['achieved_gflops']:.1f} GFLOP/s | {row['mfu']:.1%} | {m['goal']} |",
            )
    if (RESULTS / "step.json").is_file():
        lines += profile_tables(load("step"), load("step_before") if (RESULTS / "step_before.json").is_file() else None)
    if (RESULTS / "strategies.json").is_file():
        strategies = load("strategies")
        cells = strategies["cells"]
        where = measured_on(strategies)
        lines += ["", f"Strategy x precision, 2 CPU ranks, tiny model (one run on {where}; relative to DDP fp32):", ""]
        lines += [
            "| strategy | precision | tokens/s | vs DDP fp32 | state bytes per rank | vs DDP | optimizer state vs DDP |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, cell in cells.items():
            strategy, precision = name.split()
            lines.append(
                f"| {strategy} | {precision} | {cell['tokens_per_s']:,.0f} | {cell['tokens_per_s_vs_ddp_fp32']:.2f} "
                f"| {cell['state_bytes'] / 1e6:.1f} MB | {cell['state_bytes_vs_ddp']:.2f} "
                f"| {cell.get('optim_state_bytes_vs_ddp', float('nan')):.2f} |"
            )
    lines += ["", "Machines: " + "; ".join(machines) + "."]
    return "\n".join(lines) + "\n"


def measured_on(result: dict) -> str:
    """The CPU and the day a result was measured: "AMD EPYC, 2026-12-06"."""
    return f"{result['machine']['cpu']}, {result['date'].split()[0]}"


def tagged(name: str) -> list[str]:
    """The results of benchmark ``name``: ``name.json`` and those of other machine kinds, ``name@<tag>.json``
    (written with ``BENCH_TAG=<tag>``), so that a number measured on one kind does not replace another's."""
    paths = [RESULTS / f"{name}.json", *sorted(RESULTS.glob(f"{name}@*.json"))]
    return [p.stem for p in paths if p.is_file()]


def profile_tables(after: dict, before: dict | None) -> list[str]:
    """Milliseconds per step by operator group: fmtrain before and after, and its peers, per shape."""
    where = measured_on(after) + (f"; before: {measured_on(before)}" if before else "")
    lines = ["", f"Where one training step's time goes (ms per step, self time by operator group, `bench/step.py`; {where}):"]
    for key, row in after["shapes"].items():
        if "profile" not in row:
            continue
        columns = {}
        if before and "profile" in before["shapes"].get(key, {}):
            columns["fmtrain before"] = before["shapes"][key]["profile"]["fmtrain"]
        columns |= {("fmtrain now" if name == "fmtrain" else name): p for name, p in row["profile"].items()}
        groups = list(dict.fromkeys(g for p in columns.values() for g in p["groups_ms"]))
        lines += ["", f"{key}:", "", "| group | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for group in groups:
            lines.append(f"| {group} | " + " | ".join(f"{p['groups_ms'].get(group, 0.0):.1f}" for p in columns.values()) + " |")
        lines.append("| **total** | " + " | ".join(f"**{p['ms_per_step']:.1f}**" for p in columns.values()) + " |")
    return lines


def common_median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def main() -> None:
    """``NANOGPT_DIR``: a clone of github.com/karpathy/nanoGPT, for the comparisons with it (else left out)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", action="store_true", help="write summary.md from the results there, run nothing")
    if parser.parse_args().summary:
        (RESULTS / "summary.md").write_text(summary())
        return
    nanogpt = os.environ.get("NANOGPT_DIR")
    scripts = [["throughput.py"], ["startup.py"], ["mfu.py"], ["step.py", *(["--nanogpt", nanogpt] if nanogpt else [])]]
    scripts += [["nanogpt.py", "--nanogpt", nanogpt]] if nanogpt else []
    scripts += [["strategies.py"], ["accelerate_ddp.py"], ["zero3_init.py"], ["checkpoint_async.py"], ["hf_import.py"]]
    scripts += [["tokenization.py"], ["packing.py"]]
    scripts += [["slurm_latency.py"], ["tune_asha.py"], ["ray_startup.py"]]  # root: a Slurm cluster, network namespaces
    for script, *args in scripts:
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
    (RESULTS / "summary.md").write_text(summary())
    print(summary())


if __name__ == "__main__":
    main()
