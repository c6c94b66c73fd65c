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
@click.option("--local_rank", "--local-rank", type=int, default=None, hidden=True,
              help="Set by the deepspeed launcher; the rank is read from the environment.")
@click.argument("overrides", nargs=-1)
def train(config_path, ds_config, ref_ds_config, output_dir, max_steps, seed, help_config, local_rank, overrides):
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
    trainer = None
    try:
        cfg = load_run_config(config_path, extra)
        from aapo_app.trainer import Trainer

        trainer = Trainer(cfg, ds_config=ds_config, ref_ds_config=ref_ds_config)
        summary = trainer.train()
    except AapoError as exc:
        _fail(str(exc))
    finally:
        if trainer is not None:
            trainer.close()
    if trainer.rank == 0:
        click.echo(
            f"held-out accuracy: {100 * summary['eval_before']:.1f}% before -> "
            f"{100 * summary['eval_after']:.1f}% after {summary['steps']} steps "
            f"({summary['eval_problems']} problems)"
        )
        click.echo(f"run directory: {summary['output_dir']}")


if __name__ == "__main__":
    main()
