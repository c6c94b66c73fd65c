"""The ``aapo`` command line.

One device (the CPU here)::

    aapo train                                   # AAPO on the embedded SmolLM2-135M, arithmetic task
    aapo train --config run.yaml algorithm.name=grpo rollout.group_size=8

N ranks on one machine (gloo on CPU, NCCL on GPUs)::

    deepspeed --num_gpus 2 --module aapo_app train --max-steps 4
    torchrun --nproc_per_node 2 -m aapo_app train --max-steps 4

Two nodes without ssh (run once per node, node_rank 0 and 1)::

    deepspeed --hostfile H --no_ssh --node_rank 0 --master_addr 10.0.0.1 --module aapo_app train ...
"""

from __future__ import annotations

import sys

import click

from aapo_app.errors import AapoError


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """AAPO and its baselines (GRPO, GPG, Dr. GRPO, DAPO) on a DeepSpeed ZeRO-3 hybrid engine."""
    from aapo_app.third_party import ignore_third_party_warnings

    ignore_third_party_warnings()  # in every process the CLI starts, the launcher's ranks included


@main.command(context_settings={"ignore_unknown_options": False})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Run config (YAML or JSON). Without it the embedded default runs.")
@click.option("--ds-config", type=click.Path(dir_okay=False), default=None,
              help="DeepSpeed config of the policy (default ds_configs/zero3_cpu.json); 'auto' fields are filled "
                   "from the run config.")
@click.option("--ref-ds-config", type=click.Path(dir_okay=False), default=None,
              help="DeepSpeed config of the frozen reference (default ds_configs/zero3_inference_cpu.json).")
@click.option("--output-dir", default=None, help="Run directory (default runs/<algorithm>-<UTC time>).")
@click.option("--max-steps", type=int, default=None, help="Shorthand for train.max_steps=N.")
@click.option("--seed", type=int, default=None, help="Shorthand for train.seed=S.")
@click.option("--help-config", is_flag=True, help="List every config key with its default and meaning, and exit.")
@click.option("--report-to", default=None, metavar="wandb,tensorboard",
              help="Experiment trackers (comma list); shorthand for train.report_to=[...]. wandb goes offline "
                   "by itself without an API key or network.")
@click.option("--resume", default=None, metavar="latest|DIR",
              help="Continue a run from a checkpoint: latest (the newest in --output-dir), a run directory, or "
                   "one of its checkpoints/step-N. The run's config and DeepSpeed configs are reused; only "
                   "train.max_steps may change. Checkpoints newer than the one resumed from are moved aside.")
@click.option("--overwrite", is_flag=True,
              help="Start again in an --output-dir that already holds a run, deleting it (its checkpoints too).")
@click.option("--local_rank", "--local-rank", type=int, default=None, hidden=True,
              help="Set by the deepspeed launcher; the rank is read from the environment.")
@click.argument("overrides", nargs=-1)
def train(config_path, ds_config, ref_ds_config, output_dir, max_steps, seed, help_config, report_to, resume,
          overwrite, local_rank, overrides):
    """Train with AAPO (or a baseline) on a DeepSpeed engine.

    OVERRIDES are KEY=VALUE pairs on top of the config file, e.g. algorithm.name=grpo
    rollout.group_size=8 train.learning_rate=1e-6 data.source=path/to/train.jsonl
    model.path=Qwen/Qwen2.5-Math-1.5B. See --help-config for every key.
    """
    from aapo_app.config import describe_config, load_run_config

    if help_config:
        click.echo(describe_config())
        return
    extra = list(overrides)
    if max_steps is not None:
        extra.append(f"train.max_steps={max_steps}")
    if seed is not None:
        extra.append(f"train.seed={seed}")
    if output_dir is not None:
        extra.append(f"output_dir={output_dir}")
    if report_to is not None:
        try:
            from aapo_app.reporting import parse_report_to

            extra.append(f"train.report_to=[{','.join(parse_report_to(report_to))}]")
        except AapoError as exc:
            _fail(str(exc))
    trainer = None
    try:
        resume_from = None
        if resume is not None:
            if overwrite:
                raise AapoError("--overwrite starts a run again and --resume continues it; give one of them")
            from aapo_app.checkpoint import recorded_ds_config

            cfg, resume_from = _resume_config(resume, output_dir, config_path, extra)
            run_dir = resume_from.parent.parent
            ds_config = ds_config or recorded_ds_config(run_dir, "--ds-config")
            ref_ds_config = ref_ds_config or recorded_ds_config(run_dir, "--ref-ds-config")
        else:
            cfg = load_run_config(config_path, extra)
        from aapo_app.trainer import Trainer

        trainer = Trainer(cfg, ds_config=ds_config, ref_ds_config=ref_ds_config, resume_from=resume_from,
                          overwrite=overwrite)
        _install_stop_handlers(trainer)
        summary = trainer.train()
    except AapoError as exc:
        _fail(str(exc))
    finally:
        if trainer is not None:
            trainer.close()
    if summary["stopped_early"] or trainer.stop_signal:
        # a signal always ends in 128 + its number, also when it came during the last step or the final
        # evaluation (the run is then complete): schedulers read the exit status to tell a stop from a finish
        import signal as _signal

        if trainer.rank == 0:
            name = _signal.Signals(trainer.stop_signal).name if trainer.stop_signal else "a signal"
            if summary["stopped_early"]:
                click.echo(f"stopped by {name} after step {summary['steps']}; checkpoint: {summary['checkpoint']}")
                click.echo(f"resume with: aapo train --resume latest --output-dir {summary['output_dir']}")
            else:
                click.echo(f"{name} came during the last step; the run is complete (all {summary['steps']} steps), "
                           f"checkpoint: {summary['checkpoint']}")
        sys.exit(128 + (trainer.stop_signal or 15))
    if trainer.rank == 0:
        click.echo(
            f"held-out accuracy: {100 * summary['eval_before']:.1f}% before -> "
            f"{100 * summary['eval_after']:.1f}% after {summary['steps']} steps "
            f"({summary['eval_problems']} problems)"
        )
        click.echo(f"run directory: {summary['output_dir']}")
        if summary["checkpoint"]:
            click.echo(f"checkpoint: {summary['checkpoint']} (evaluate it with: aapo eval --run {summary['output_dir']})")


def _resume_config(resume, output_dir, config_path, extra):
    """The run's own config (its config.yaml) with this command's overrides, which may only change
    train.max_steps; and the checkpoint directory to resume from."""
    from pathlib import Path

    from aapo_app.checkpoint import find_resume_checkpoint, read_state, verify_checkpoint
    from aapo_app.config import flatten_config, load_run_config

    step_dir = find_resume_checkpoint(resume, output_dir)
    run_dir = step_dir.parent.parent
    if output_dir is not None and Path(output_dir).resolve() != run_dir.resolve():
        raise AapoError(f"--output-dir '{output_dir}' is not the run being resumed ('{run_dir}'); drop it or make them match")
    try:
        saved = read_state(step_dir)
    except AapoError:
        verify_checkpoint(step_dir)  # names the damage and the newest intact earlier checkpoint
        raise
    if not isinstance(saved.get("config"), dict) or "step" not in saved:
        raise AapoError(f"--resume: {step_dir / 'trainer_state.json'} lacks the run's config or step; the checkpoint is "
                        f"damaged, resume from an earlier one")
    cfg = load_run_config(config_path, [e for e in extra if not e.startswith("output_dir=")] + [f"output_dir={run_dir}"],
                          base=None if config_path else saved["config"])
    old, new = flatten_config(saved["config"]), flatten_config(cfg.to_dict())
    defaults = flatten_config(load_run_config(None, [f"algorithm.name={cfg.algorithm.name}"]).to_dict())
    for key in sorted(set(old) | set(new)):
        if key in ("train.max_steps", "output_dir") or old.get(key) == new.get(key):
            continue
        if key not in old and new.get(key) == defaults.get(key):  # a key added since the run started, at its default
            continue
        raise AapoError(f"--resume: the run was trained with {key}={old.get(key)!r} but this command gives "
                        f"{new.get(key)!r}; resume with the run's own config (only train.max_steps may change) "
                        f"or start a new run")
    if cfg.train.max_steps <= saved["step"]:
        raise AapoError(f"train.max_steps={cfg.train.max_steps} but the checkpoint is already at step {saved['step']}; "
                        f"raise train.max_steps to continue")
    verify_checkpoint(step_dir)
    return cfg, step_dir


def _install_stop_handlers(trainer) -> None:
    """First SIGTERM/SIGINT: finish the current step, save a checkpoint, exit (128 + signal).
    A second one: exit at once."""
    import os
    import signal

    def handler(signum, frame):
        if trainer.stop_signal is None:
            trainer.request_stop(signum)
            if trainer.rank == 0:
                click.echo(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                           f"(send it again to exit at once)", err=True)
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


@main.command("eval", context_settings={"show_default": True})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Evaluation settings (YAML or JSON): protocol, prompt_template, system_prompt, use_chat_template, "
                   "temperature, top_p, top_k, max_new_tokens, n_samples, k, seed, batch_size, limit, backend, "
                   "sampler, verify_timeout_s, stop, reference_quirks. KEY=VALUE arguments and the flags below "
                   "override it.")
@click.option("--model", "models", multiple=True,
              help="Model to evaluate (hub id, HF directory, .gguf, embedded:smollm2-135m-instruct); repeat for "
                   "several rows. Without --model or --run: the embedded default.")
@click.option("--run", "run_dir", default=None, help="A training run directory: evaluate its saved checkpoints.")
@click.option("--step", default="latest", help="With --run: latest, all, or a step number.")
@click.option("--benchmarks", default="all", help="all, or a comma list of aime24, math500, amc23, minerva, olympiadbench.")
@click.option("--data-dir", default=None, help="Local benchmark files, one folder each: <dir>/aime24/test.jsonl, "
                                                "math500/, amc23/, minerva_math/, olympiadbench/ (test.jsonl, else "
                                                "the first *.jsonl); default: the hub datasets.")
@click.option("--protocol", default=None, type=click.Choice(["lighteval", "simplerl"]),
              help="lighteval (open-rs evaluate.py under lighteval 0.8.1): chat template, Qwen evaluation prompt, "
                   "T 0.6, top-p 0.95, 32768 tokens, lighteval's extractive match at 5 decimals. simplerl "
                   "(SimpleRL-Zoo's Qwen2.5-Math evaluation): raw abel prompt, stop at Question:/Answer:, T 1.0, "
                   "top-p 0.95, 16000 tokens, Qwen2.5-Math extraction/equality. Default: the --config file's, "
                   "else lighteval.")
@click.option("--temperature", type=float, default=None, help="Override the protocol's temperature.")
@click.option("--top-p", type=float, default=None, help="Override the protocol's top-p.")
@click.option("--top-k", type=int, default=None, help="Top-k sampling (0 = off).")
@click.option("--greedy", is_flag=True, help="Greedy decoding (one sample per problem).")
@click.option("--max-new-tokens", type=int, default=None, help="Override the protocol's generation length "
                                                                "(capped at the model's context).")
@click.option("--system-prompt", default=None, help="A system message (default: none under both protocols).")
@click.option("--prompt-template", default=None, help="User message with {problem}; default: the protocol's.")
@click.option("--no-chat-template", is_flag=True, help="Plain-text prompts even if the tokenizer has a chat template.")
@click.option("--reference-quirks", is_flag=True, default=None,
              help="lighteval protocol: tokenize chat-templated prompts with special tokens, as the reference "
                   "does (two BOS tokens for templates that write their own, e.g. DeepSeek-R1-Distill).")
@click.option("--n-samples", type=int, default=None, help="Samples per problem (pass@1 is their mean).")
@click.option("--k", "k_text", default=None, help="Comma list of k for unbiased pass@k, e.g. 1,4,16 (default 1).")
@click.option("--limit", type=int, default=None, help="Only the first N problems of each benchmark.")
@click.option("--batch-size", type=int, default=None, help="Problems per generation batch (default 8).")
@click.option("--seed", type=int, default=None, help="Sampling seed (default 0).")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default=None,
              help="hf: the engine's generation mode (CPU or GPU); vllm: vLLM on each rank's GPU. [default: hf]")
@click.option("--sampler", type=click.Choice(["aapo", "hf"]), default=None,
              help="With --backend hf: aapo's decoding loop (faster, same distribution) or transformers' generate. "
                   "[default: aapo]")
@click.option("--ds-config", type=click.Path(dir_okay=False), default=None,
              help="DeepSpeed inference config for --backend hf (default ds_configs/zero3_inference_cpu.json, "
                   "zero3_inference_bf16.json on CUDA).")
@click.option("--output-dir", default=None, help="Where results go (default eval_results/eval-<UTC time>, "
                                                 "or <run>/eval/eval-<UTC time> with --run).")
@click.option("--verify-timeout", type=float, default=None, help="Seconds allowed to grade one answer (default 10).")
@click.option("--resume", is_flag=True, help="Continue an interrupted evaluation in --output-dir: batches it "
                                             "already sampled are read back, not sampled again.")
@click.option("--local_rank", "--local-rank", type=int, default=None, hidden=True)
@click.argument("overrides", nargs=-1)
def eval_command(config_path, models, run_dir, step, benchmarks, data_dir, protocol, temperature, top_p, top_k, greedy,
                 max_new_tokens, system_prompt, prompt_template, no_chat_template, reference_quirks, n_samples,
                 k_text, limit,
                 batch_size, seed, backend, sampler, ds_config, output_dir, verify_timeout, resume, local_rank,
                 overrides):
    """Evaluate models on the paper's math benchmarks: pass@1 / pass@k, a markdown table, results.json
    and every sample in samples.jsonl. Run under the deepspeed launcher to shard problems over ranks.

    OVERRIDES are KEY=VALUE settings on top of --config, e.g. temperature=0.8 n_samples=4 k=1,4."""
    try:
        _run_eval(models, run_dir, step, benchmarks, data_dir, protocol, dict(
            temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy, max_new_tokens=max_new_tokens,
            system_prompt=system_prompt, prompt_template=prompt_template, n_samples=n_samples, limit=limit,
            batch_size=batch_size, seed=seed, backend=backend, sampler=sampler, verify_timeout_s=verify_timeout,
            use_chat_template=False if no_chat_template else None,
            reference_quirks=True if reference_quirks else None), k_text, ds_config, output_dir, resume,
            config_path, list(overrides))
    except AapoError as exc:
        _fail(str(exc))


def _run_eval(models, run_dir, step, benchmarks, data_dir, protocol, flags, k_text, ds_config, output_dir,
              resume=False, config_path=None, overrides=()):
    import shutil
    import time
    from datetime import datetime, timezone
    from pathlib import Path

    import torch

    from aapo_app import evaluate as E
    from aapo_app.benchmarks import load_benchmark, parse_benchmark_names
    from aapo_app.ds_config import (DEFAULT_EVAL_CONFIG_GPU, DEFAULT_REFERENCE_CONFIG, fill_inference_ds_config,
                                    read_ds_config)
    from aapo_app.engine import broadcast_object, init_distributed
    from aapo_app.models import EMBEDDED_DEFAULT, resolve_model_path

    # every check that user input can fail runs before any engine is built
    if k_text is not None:
        flags["k"] = E.parse_k(k_text)
    settings = E.eval_settings(config_path, overrides, protocol, **flags)
    names = parse_benchmark_names(benchmarks)
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise AapoError(f"--data-dir: '{data_dir}' is not a directory; point it at benchmark files laid out like "
                        f"<dir>/aime24/test.jsonl")
    if run_dir and models:
        raise AapoError("--run and --model are exclusive; evaluate a run's checkpoints or named models")
    specs = E.run_checkpoints(run_dir, step) if run_dir else [
        E.ModelSpec(Path(m.rstrip("/")).name or m, m) for m in (models or (EMBEDDED_DEFAULT,))]
    for spec in specs:
        if run_dir:
            from aapo_app.checkpoint import weights_damage

            damage = weights_damage(Path(spec.path))
            if damage:
                raise AapoError(f"--run: the weights of checkpoint {spec.path} are damaged ({damage}); evaluate "
                                f"another --step (or export it again from its DeepSpeed state with aapo export)")
        if spec.base_model:  # a LoRA checkpoint: its adapter is merged into this base model to evaluate it
            resolve_model_path(spec.base_model, convert=False)
        else:
            resolve_model_path(spec.path, convert=False)
    if settings.backend == "vllm":
        from aapo_app.vllm_engine import check_vllm_machine

        check_vllm_machine(None, "--backend vllm", "--backend hf")
    default_ds = DEFAULT_EVAL_CONFIG_GPU if torch.cuda.is_available() else DEFAULT_REFERENCE_CONFIG
    ds = read_ds_config(ds_config, default_ds)

    if output_dir is not None and (Path(output_dir) / "results.json").exists():
        raise AapoError(f"--output-dir: '{output_dir}' already holds results; choose a new directory")
    if resume and (output_dir is None or not (Path(output_dir) / "partial").is_dir()):
        raise AapoError("--resume: give the --output-dir of an interrupted evaluation (it holds a partial/ folder)")
    if not resume and output_dir is not None and (Path(output_dir) / "partial").is_dir():
        raise AapoError(f"--output-dir: '{output_dir}' holds an interrupted evaluation; add --resume to continue "
                        f"it or choose a new directory")
    problems = {name: load_benchmark(name, data_dir, settings.limit) for name in names}  # read once, for every model

    rank, world = init_distributed()
    ds = fill_inference_ds_config(ds, world)
    if output_dir is None:  # one stamp for every rank
        stamp = broadcast_object(datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
        base = Path(specs[0].source["run"]) / "eval" if run_dir else Path("eval_results")
        output_dir = str(base / f"eval-{stamp}")
    out = Path(output_dir)
    problem = None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = f"--output-dir: cannot create '{out}' ({exc.strerror}); choose a writable directory"
    problem = broadcast_object(problem)
    if problem:
        raise AapoError(problem)

    start = time.perf_counter()
    results, records = {}, []
    try:
        for spec in specs:
            rows = E.evaluate_model(spec, problems, settings, data_dir=data_dir, ds_config=ds, rank=rank, world=world,
                                    log=lambda m: click.echo(m, err=True), journal_dir=out / "partial", resume=resume)
            if rank == 0:
                results[spec.label] = E.summarize(rows, names, settings.k)
                records += rows
    except BaseException:
        if rank == 0 and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an evaluation that failed before its first batch leaves nothing behind
        raise
    if rank != 0:
        return
    paths = E.write_results(out, specs, names, settings, data_dir, results, records, time.perf_counter() - start)
    shutil.rmtree(out / "partial", ignore_errors=True)  # the journal's work is in samples.jsonl now
    click.echo(paths["markdown"].read_text())
    click.echo(f"results: {paths['json']}\ntable: {paths['markdown']}\nsamples: {paths['samples']}")


@main.command("export")
@click.argument("run_dir")
@click.option("--out", required=True, help="New directory for the Hugging Face model.")
@click.option("--step", default=None, help="Checkpoint step (default: the latest).")
@click.option("--dtype", default="auto", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), show_default=True,
              help="Weight dtype; auto keeps the training dtype (the checkpoint's config).")
@click.option("--what", default="merged", type=click.Choice(["merged", "adapter"]), show_default=True,
              help="LoRA runs (model.lora): the adapter merged into the base model (a transformers model), or "
                   "the adapter alone (peft's format, loaded with PeftModel.from_pretrained).")
def export_command(run_dir, out, step, dtype, what):
    """Export a training run's checkpoint as a Hugging Face model directory (safetensors, config,
    tokenizer, generation config) that from_pretrained and `aapo eval --model` load; a LoRA run's
    merged model or its adapter alone (--what)."""
    from aapo_app.export import export

    try:
        path = export(run_dir, out, step, dtype, what)
    except AapoError as exc:
        _fail(str(exc))
    click.echo(f"exported: {path}")


@main.command("plot")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", required=True, help="PNG file to write.")
@click.option("--smooth", "window", type=int, default=1, show_default=True,
              help="Trailing moving average over this many steps (1 = raw).")
def plot_command(run_dirs, out, window):
    """Plot reward, accuracy, loss, completion length and the algorithm diagnostics (zero-std group
    fraction, clip rates) against step for one or more runs, overlaid with a legend."""
    from aapo_app.plot import plot_runs

    if window < 1:
        _fail(f"--smooth must be >= 1 (got {window})")
    try:
        drawn = plot_runs(list(run_dirs), out, window)
    except AapoError as exc:
        _fail(str(exc))
    click.echo(f"wrote {out} ({len(run_dirs)} run(s); panels: {', '.join(drawn)})")


@main.command("compare")
@click.option("--out", required=True, metavar="DIR", help="Directory of the comparison: one run directory per algorithm and seed, "
                                          "the report, compare.json (its settings) and logs/.")
@click.option("--algorithms", default=None, metavar="A,B,...",
              help="Algorithms to compare (default: aapo,grpo,gpg,dr_grpo,dapo, or those --out was started with).")
@click.option("--seeds", default=None, metavar="S1,S2,...",
              help="Seeds, at least 2 (default: 0,1,2, or those --out was started with). Seed S gives every algorithm "
                   "the same data order and held-out set.")
@click.option("--baseline", default=None, metavar="ALGO", help="Algorithm the others are paired against (default: grpo if compared, "
                                               "else the first).")
@click.option("--threshold", default="0.9", show_default=True, metavar="FRACTION",
              help="Training accuracy for the steps-to-threshold column.")
@click.option("--window", default="3", show_default=True, metavar="N", help="Steps in the trailing mean that must reach --threshold.")
@click.option("--max-steps", default=None, metavar="N", help="Shorthand for train.max_steps=N for every run.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Run config (YAML or JSON) of every run; without it the embedded default.")
@click.option("--ds-config", type=click.Path(dir_okay=False), default=None, help="Policy DeepSpeed config of every run.")
@click.option("--ref-ds-config", type=click.Path(dir_okay=False), default=None,
              help="Reference DeepSpeed config of every run.")
@click.option("--nproc", default=None, metavar="N", help="Ranks per run (torchrun on this machine; default 1).")
@click.option("--report-only", is_flag=True, help="Write the report from the runs in --out without training.")
@click.argument("overrides", nargs=-1)
def compare_command(out, algorithms, seeds, baseline, threshold, window, max_steps, config_path, ds_config,
                    ref_ds_config, nproc, report_only, overrides):
    """Train every algorithm x seed on one config, one run after another, then write compare.md,
    results.json and curves.png in --out: held-out accuracy before/after (mean +- 95 % CI), each
    algorithm's paired difference to --baseline (CI, paired t and sign-flip p-values), steps and
    samples to --threshold, gradient-norm variance, zero-std groups.

    OVERRIDES are KEY=VALUE pairs for every run (as in aapo train), or ALGO:KEY=VALUE for one
    algorithm (aapo:algorithm.delta_low=-0.5). Give the same command again after a crash or a stop:
    finished runs are kept, an interrupted one resumes from its newest checkpoint (set
    train.save_every=N for long runs), and algorithms or seeds may be added; other settings are refused."""
    from pathlib import Path

    from aapo_app import compare as C

    try:
        plan = C.make_plan(out, algorithms, seeds, baseline, threshold, window, config_path, ds_config, ref_ds_config,
                           nproc, max_steps, list(overrides), report_only)
        if not report_only:
            C.run_all(plan, sys.argv[1:], lambda line: click.echo(line, err=True))
        elif not Path(out).is_dir():
            raise AapoError(f"--out: '{out}' does not exist; --report-only reads the runs of an earlier aapo compare")
        results = C.write_report(plan.out, plan.algorithms, plan.seeds, plan.baseline, plan.threshold, plan.window)
    except C.Stopped as exc:
        click.echo(str(exc), err=True)
        sys.exit(exc.code)
    except AapoError as exc:
        _fail(str(exc))
    click.echo((plan.out / C.TABLE).read_text())
    click.echo(f"table: {plan.out / C.TABLE}\nnumbers: {plan.out / C.RESULTS}\ncurves: {plan.out / C.CURVES}")
    if results["unfinished"]:
        click.echo(f"{len(results['unfinished'])} run(s) not finished; the report covers the finished ones")


@main.command("check-config")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, help="Run config (YAML or JSON).")
@click.option("--ds-config", type=click.Path(dir_okay=False), default=None, help="Policy DeepSpeed config.")
@click.option("--ref-ds-config", type=click.Path(dir_okay=False), default=None, help="Reference DeepSpeed config.")
@click.option("--world-size", type=int, default=1, show_default=True,
              help="Ranks the run will use (GPUs per node x nodes): the batch arithmetic is checked for it.")
@click.argument("overrides", nargs=-1)
def check_config_command(config_path, ds_config, ref_ds_config, world_size, overrides):
    """Validate a run before launching it: config keys and types, rewards, algorithm parameters,
    DeepSpeed batch-size arithmetic for --world-size ranks (and DeepSpeed's own parser), group size
    vs batch, dataset and columns, prompt lengths vs the model's context. Prints the resolved config
    and the filled DeepSpeed configs; exit 0 when everything holds, 2 with a one-line error otherwise."""
    from aapo_app.check import check_config

    try:
        report = check_config(config_path, ds_config, ref_ds_config, world_size, list(overrides))
    except AapoError as exc:
        _fail(str(exc))
    click.echo(report)


@main.command("reference-rollouts")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="The run config the cache is for (without it: the embedded default).")
@click.option("--out", "out_dir", required=True, help="Cache directory (created; an existing one is resumed).")
@click.option("--ds-config", type=click.Path(dir_okay=False), default=None,
              help="DeepSpeed inference config of the reference (default ds_configs/zero3_inference_cpu.json).")
@click.option("--batch-prompts", type=int, default=None,
              help="Prompts per generation batch on each rank (default rollout.prompts_per_rank).")
@click.option("--seeds", default=None, metavar="S1,S2,...",
              help="Cover the training prompts of each of these seeds' train/held-out splits (default: train.seed), "
                   "so runs with any of them can use the cache.")
@click.option("--local_rank", "--local-rank", type=int, default=None, hidden=True)
@click.argument("overrides", nargs=-1)
def reference_rollouts_command(config_path, out_dir, ds_config, batch_prompts, seeds, local_rank, overrides):
    """Sample G reference completions for every training prompt of a run config once, score them with
    the run's rewards, and store them in --out, keyed by prompt and fingerprinted by the reference
    model, sampling settings, rewards and prompt rendering. Train on them with
    rollout.reference_cache=DIR. Resumable (run it again), data-parallel under the deepspeed launcher."""
    from aapo_app import reference_cache
    from aapo_app.config import load_run_config

    try:
        if batch_prompts is not None and batch_prompts < 1:
            raise AapoError(f"--batch-prompts must be >= 1 (got {batch_prompts})")
        seed_list = None
        if seeds is not None:
            try:
                seed_list = [int(x) for x in seeds.split(",") if x.strip()]
            except ValueError:
                raise AapoError(f"--seeds must be a comma list of integers, e.g. 0,1,2 (got '{seeds}')") from None
            if not seed_list:
                raise AapoError("--seeds is empty; give e.g. --seeds 0,1,2")
        cfg = load_run_config(config_path, list(overrides))
        counts = reference_cache.build(cfg, out_dir, ds_config, batch_prompts,
                                       log=lambda msg: click.echo(msg, err=True), seeds=seed_list)
    except AapoError as exc:
        _fail(str(exc))
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        click.echo(f"reference cache {out_dir}: {counts['total']} prompts ({counts['sampled']} sampled now, "
                   f"{counts['cached_before']} already there); train with rollout.reference_cache={out_dir}")


class _AnswerArgsCommand(click.Command):
    """A command whose arguments may begin with '-' (negative answers: ``aapo grade -5 '\\boxed{-5}'``).

    Every token that is not exactly one of the command's own options (or the value after one) is an
    argument, so "-5", "-\\frac{1}{2}" or "-h^2" never read as options (click alone would take "-5" for
    an unknown option and "-h^2" for --help). "--" still ends the options: an answer that is exactly
    an option's name ("-h") goes after it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with_value, flags = set(), set()
        for param in self.get_params(ctx):
            if isinstance(param, click.Option):
                names = set(param.opts) | set(param.secondary_opts)
                (flags if param.is_flag or param.count else with_value).update(names)
        options, arguments = [], []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                arguments.extend(args[i + 1:])
                break
            if arg in flags or (arg.startswith("--") and arg.split("=", 1)[0] in with_value and "=" in arg):
                options.append(arg)
            elif arg in with_value:
                options.extend(args[i:i + 2])  # a missing value is click's own error
                i += 1
            else:
                arguments.append(arg)
            i += 1
        return super().parse_args(ctx, [*options, "--", *arguments])


@main.command("grade", cls=_AnswerArgsCommand)
@click.argument("gold")
@click.argument("prediction")
@click.option("--protocol", default="lighteval", type=click.Choice(["lighteval", "simplerl"]), show_default=True,
              help="lighteval: math-verify (the training reward). simplerl: Qwen2.5-Math extraction and equality.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds allowed for grading.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as one JSON object.")
def grade_command(gold, prediction, protocol, timeout, as_json):
    """Grade PREDICTION (a model's text, e.g. '... the answer is \\boxed{1/2}') against GOLD (a bare answer)
    and print what was extracted from each and the verdict. The training reward and `aapo eval` use this
    same grader. PREDICTION '-' reads it from standard input. Answers may begin with '-':
    aapo grade -5 '\\boxed{-5}'. A malformed GOLD (e.g. unbalanced braces) reports status error."""
    import json

    from aapo_app.grader import grade

    if prediction == "-":
        prediction = sys.stdin.read()
    if not gold.strip():
        _fail("GOLD is empty; give the reference answer, e.g. '\\frac{1}{2}'")
    if not timeout > 0:
        _fail(f"--timeout must be > 0 seconds (got {timeout}); e.g. --timeout 10")
    try:
        result = grade(gold, prediction, timeout_s=timeout, protocol=protocol)
    except AapoError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps({"protocol": protocol, "gold": result.gold, "predicted": result.predicted,
                               "correct": result.correct, "status": result.status}))
        return
    click.echo(f"protocol:  {protocol}")
    click.echo(f"gold:      {result.gold or '(nothing parsed)'}")
    click.echo(f"predicted: {result.predicted or '(nothing extracted)'}")
    click.echo(f"verdict:   {'correct' if result.correct else 'wrong'} (status {result.status})")


if __name__ == "__main__":
    main()
