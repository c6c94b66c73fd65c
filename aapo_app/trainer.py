"""The training loop: rollout -> resampling -> scoring -> update, once per step, on every rank.

Data parallelism: each rank draws its own ``rollout.prompts_per_rank`` prompts (disjoint slices of
one global batch), samples all G completions of each of them itself, so a prompt group never
spans ranks and the group statistics need no communication. DeepSpeed averages the gradients.
The run is set up by :mod:`aapo_app.builder`; checkpoints are :class:`aapo_app.checkpoint.Checkpointer`'s.
"""

from __future__ import annotations

import json
import random
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from aapo_app import __version__
from aapo_app import metrics as M
from aapo_app import rundir
from aapo_app.builder import build_training, check_prompt_lengths, open_model, plan_run
from aapo_app.checkpoint import Checkpointer, check_same_ds_configs
from aapo_app.config import RunConfig
from aapo_app.data import PromptSampler, PromptStyle, fingerprint
from aapo_app.engine import all_reduce_max, all_reduce_sum, init_distributed, on_rank0
from aapo_app.errors import AapoError
from aapo_app.generation import Sampling, encode_prompts
from aapo_app.reporting import Reporter, git_commit, sample_rows, write_samples_file
from aapo_app.resampling import resample
from aapo_app.rewards import format_reward, run_reward_model
from aapo_app.rollout import Rollout
from aapo_app.scoring import score
from aapo_app.update import update


def reduce_metrics(local: dict[str, float]) -> dict[str, float]:
    """Average every metric over ranks (same keys on every rank; sums for SUMMED keys)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    keys = sorted(local)
    totals = all_reduce_sum([local[k] for k in keys])
    return {k: (t if k in M.SUMMED else t / world) for k, t in zip(keys, totals)}


def length_extremes(lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """The shortest and longest policy completion over every rank, and the mean length of those that
    ended with EOS (absent when none did). Collective."""
    longest, neg_shortest = all_reduce_max([float(lengths.max()), -float(lengths.min())])
    ended = ~truncated
    eos_total, eos_count = all_reduce_sum([float(lengths[ended].sum()), float(ended.sum())])
    out = {"completion_len/min": -neg_shortest, "completion_len/max": longest}
    if eos_count:
        out["completion_len/eos_mean"] = eos_total / eos_count
    return out


class Trainer:
    """Builds a run (:mod:`aapo_app.builder`) and drives its steps."""

    def __init__(self, cfg: RunConfig, ds_config: str | None = None, ref_ds_config: str | None = None,
                 resume_from: Path | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.resume_from = Path(resume_from) if resume_from else None
        # everything that can fail on user input is checked before the (slow) engines are built
        plan = plan_run(cfg, ds_config, ref_ds_config)
        self.algorithm, self.ds_policy, self.ds_ref = plan.algorithm, plan.ds_policy, plan.ds_ref
        self.precision, self.tis = plan.precision, plan.tis
        self.train_examples, self.eval_examples = plan.train_examples, plan.eval_examples
        if self.resume_from is not None:
            check_same_ds_configs(self.resume_from.parent.parent,
                                  {"--ds-config": self.ds_policy, "--ref-ds-config": self.ds_ref})

        self.rank, self.world = init_distributed()
        self.sampler = PromptSampler(self.train_examples, cfg.rollout.prompts_per_rank, self.rank, self.world,
                                     cfg.train.seed)
        random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        files = open_model(cfg.model.path, self.rank)
        self.model_path, self.tokenizer = files.path, files.tokenizer
        self.prompts = PromptStyle(self.tokenizer, cfg.data)
        check_prompt_lengths(self.tokenizer, files.max_positions, cfg, self.train_examples, self.eval_examples)
        self.rewards = run_reward_model(cfg.rewards)
        self.format_key = format_reward(self.rewards.weights)
        self.eval_rewards = {name: self.rewards.rewards[name] for name in ("accuracy", self.format_key) if name}

        # rank 0 locks (and creates) the run directory; a failure there must stop every rank, not leave them waiting
        self.output_dir, notes = on_rank0(lambda: self._claim_output_dir(overwrite))
        self.output_dir = Path(self.output_dir)
        try:
            self._build(plan, files, notes)
        except AapoError:
            if self.rank == 0:  # a new run that could not start leaves no run behind (it could not be resumed)
                if self.resume_from is None:
                    rundir.undo_start(self.output_dir)
                rundir.unlock(self.output_dir)
            raise

    def _build(self, plan, files, notes: list[str]) -> None:
        cfg = self.cfg
        parts = build_training(plan, files, self.rank,
                               self._max_model_len() if cfg.rollout.backend == "vllm" else 0)
        self.policy, self.reference, self.generator = parts.policy, parts.reference, parts.generator
        self.rollout = Rollout(policy=parts.generator, tokenizer=self.tokenizer, rollout=cfg.rollout,
                               algorithm=self.algorithm, seed=cfg.train.seed, rank=self.rank,
                               micro_batch_size=cfg.train.micro_batch_size,
                               add_special_tokens=self.prompts.add_special_tokens,
                               reference=parts.reference_generator, cache=parts.reference_cache,
                               scorer=self.reference)
        if self.rank == 0:
            for note in plan.notes + notes:
                tqdm.write(f"note: {note}", file=sys.stderr)
        self.checkpoints = Checkpointer(self.output_dir, self.rank, self.world, cfg.train.keep_checkpoints,
                                        lora=cfg.model.lora, base_model=cfg.model.path)
        self.history: list[dict] = []
        self.start_step, self.eval_before = 1, None
        self.nonfinite_in_a_row = 0
        self.stop_signal: int | None = None
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.checkpoints.check_disk_space(self.policy, self._saves_left())
        self.reporter = self._make_reporter()

    # -- helpers ------------------------------------------------------------------------------
    def _claim_output_dir(self, overwrite: bool) -> tuple[str, list[str]]:
        """Rank 0: lock the run directory (see :mod:`aapo_app.rundir`) and, for a new run, create it and
        record its configs; returns it and notes for the user."""
        if self.resume_from is not None:
            return str(self.cfg.output_dir), rundir.continue_from(self.resume_from)
        out = self.cfg.output_dir
        if not out:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            out = f"runs/{self.cfg.algorithm.name}-{stamp}"
        path = Path(out)
        rundir.start(path, overwrite)
        try:
            (path / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            (path / "ds_config.json").write_text(json.dumps(self.ds_policy, indent=2))
            (path / "ds_config_reference.json").write_text(json.dumps(self.ds_ref, indent=2))
        except OSError as exc:
            raise AapoError(f"--output-dir: cannot write to '{path}' ({exc.strerror}); choose a writable directory") from exc
        return str(path), []

    def _saves_left(self) -> int:
        """How many checkpoints the rest of this run writes (every train.save_every steps, and at the end)."""
        t = self.cfg.train
        every = t.save_every
        steps = range(self.start_step, t.max_steps + 1)
        saves = sum(1 for s in steps if every and s % every == 0)
        return saves + int(bool(t.save_final and steps and not (every and t.max_steps % every == 0)))

    def _prompts(self, examples) -> list[str]:
        return [self.prompts.render(ex.problem) for ex in examples]

    def log_rollout(self, step: int, scored) -> None:
        """Append this rank's groups to ``rollouts/rank<r>.jsonl`` (prompt, completions, rewards)."""
        if not self.cfg.train.log_rollouts:
            return
        batch, G = scored.rollout, scored.rollout.group_size
        path = self.output_dir / "rollouts" / f"rank{self.rank}.jsonl"
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as f:
            for i, ex in enumerate(batch.examples):
                rows = slice(i * G, (i + 1) * G)
                record = {
                    "step": step, "rank": self.rank, "prompt_id": ex.id, "problem": ex.problem, "answer": ex.answer,
                    "completions": batch.policy.texts[rows], "rewards": scored.rewards[i].tolist(),
                    "advantages": scored.advantages[i].tolist(),
                    "reward_parts": {k: v[i].tolist() for k, v in scored.reward_parts.items()},
                }
                if batch.reference is not None:
                    record["ref_completions"] = batch.reference.texts[rows]
                    record["ref_rewards"] = scored.ref_rewards[i].tolist()
                f.write(json.dumps(record) + "\n")

    def log(self, m: dict) -> None:
        if self.rank != 0:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(m) + "\n")

    def save_checkpoint(self, step: int) -> Path:
        """``checkpoints/step-<step>`` with everything a resume needs. Collective."""
        state = {"algorithm": self.cfg.algorithm.name, "base_model": self.cfg.model.path,
                 "eval_before": self.eval_before, "history": self.history, "config": self.cfg.to_dict()}
        return self.checkpoints.save(step, self.policy, self.tokenizer, self.sampler, state)

    def _restore(self, step_dir: Path) -> None:
        state = self.checkpoints.restore(step_dir, self.policy, self.sampler)
        self.generator.weights_changed()  # a vLLM policy engine still holds the base weights
        self.history = list(state.get("history", []))
        self.eval_before = state.get("eval_before")
        self.start_step = int(state["step"]) + 1

    def _make_reporter(self) -> Reporter:
        """wandb / TensorBoard on rank 0 with the full config and the code's git commit; the same
        facts go to run_info.json."""
        cfg = self.cfg
        info = {"git_commit": git_commit(), "aapo_version": __version__, "world_size": self.world, "model_path": self.model_path,
                "torch": torch.__version__, "resumed_from": str(self.resume_from) if self.resume_from else None,
                "precision": self.precision.as_dict(), "tis": self.tis,
                # what pairs runs of one seed in `aapo compare`: the same held-out set and prompt order
                "data": {"eval_set": fingerprint(self.eval_examples),
                         "train_order": self.sampler.order_fingerprint()}}
        if self.rank == 0:
            (self.output_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        config = {**cfg.to_dict(), "ds_config": self.ds_policy, "ds_config_reference": self.ds_ref, **info}
        return Reporter(cfg.train.report_to, self.output_dir, cfg.train.run_name or self.output_dir.name,
                        cfg.train.tags, cfg.train.wandb_project, config, self.rank,
                        log=lambda msg: tqdm.write(msg, file=sys.stderr))

    def request_stop(self, signum: int) -> None:
        """First SIGTERM/SIGINT: finish the current step, save, exit. (The CLI installs the handler.)"""
        self.stop_signal = signum

    def _max_model_len(self) -> int:
        """The longest rendered prompt plus the longest completion (training or evaluation)."""
        longest = max(self.prompts.lengths(self._prompts(self.train_examples + self.eval_examples)), default=0)
        return longest + max(self.cfg.rollout.max_new_tokens, self.cfg.train.eval_max_new_tokens) + 8

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy (and format rate), problems sharded over ranks. Collective (a rank
        without problems still takes part in the generator's session)."""
        shard = self.eval_examples[self.rank::self.world]
        correct = formatted = 0.0
        with self.generator.session():
            if shard:
                ids, mask = encode_prompts(self.tokenizer, self._prompts(shard), self.prompts.add_special_tokens)
                samples = self.generator.sample(ids, mask, num_samples=1, seed=0,
                                                sampling=Sampling(self.cfg.train.eval_max_new_tokens))
                answers, lengths = [ex.answer for ex in shard], samples.lengths.tolist()
                correct = sum(self.eval_rewards["accuracy"](samples.texts, answers, lengths))
                if self.format_key:
                    formatted = sum(self.eval_rewards[self.format_key](samples.texts, answers, lengths))
        total, correct, formatted = all_reduce_sum([len(shard), correct, formatted])
        result = {"eval/accuracy": correct / total}
        if self.format_key:
            result["eval/format_rate"] = formatted / total
        return result

    # -- the loop -----------------------------------------------------------------------------
    def _draw(self, step: int, round: int):
        """One rollout of the next prompts (a resampling round when ``round`` > 0). Collective."""
        examples = self.sampler.next_batch()
        with self.generator.session():
            return self.rollout(examples, self._prompts(examples), step, round)

    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        resampled = resample(lambda round: self._draw(step, round), self.algorithm.resampling(), self.rewards,
                             self.tokenizer.pad_token_id)
        batch, rounds, kept_frac = resampled.batch, resampled.rounds, resampled.kept_frac
        scored = score(batch, self.rewards, self.algorithm)
        self.log_rollout(step, scored)
        every = cfg.train.log_samples_every
        if self.rank == 0 and every and (step % every == 0 or step == 1):
            rows = sample_rows(scored)
            write_samples_file(self.output_dir, step, rows)
            self.reporter.samples(rows, step)
        upd = update(self.policy, scored, self.algorithm, micro_batch_size=cfg.micro_batch_rows,
                     temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                     micro_batch_tokens=cfg.train.micro_batch_tokens,
                     tis=self.tis)
        if upd["skipped_nonfinite"] < self.algorithm.optimizer_steps_per_rollout:  # some step moved the weights
            self.generator.weights_changed()
        pol = batch.policy
        local = dict(scored.diagnostics)
        local.update({k: v for k, v in upd.items() if k not in ("update_tokens", "update_seconds")})
        local["completion_len/mean"] = float(pol.lengths.float().mean())
        local["truncated_frac"] = float(pol.truncated.float().mean())
        local["rollout_tokens"] = float(pol.num_tokens + (batch.reference.num_tokens if batch.reference else 0))
        local["update_tokens"] = upd["update_tokens"]
        local["rollout_seconds"] = batch.seconds
        local["update_seconds"] = upd["update_seconds"]
        local["step_seconds"] = time.perf_counter() - t0
        local["resample_rounds"] = float(rounds)
        if kept_frac is not None:
            local["resample_kept_frac"] = kept_frac
        m = reduce_metrics(local)
        m.update(length_extremes(pol.lengths, pol.truncated))
        m["rollout_tokens_per_s"] = m.pop("rollout_tokens") / max(m["rollout_seconds"], 1e-9)
        m["update_tokens_per_s"] = m.pop("update_tokens") / max(m["update_seconds"], 1e-9)
        if "reward/accuracy" in m:
            m["accuracy"] = m["reward/accuracy"]
        if self.format_key and f"reward/{self.format_key}" in m:
            m["format_rate"] = m[f"reward/{self.format_key}"]
        return {"step": step, **m}

    def train(self) -> dict:
        cfg = self.cfg
        steps = cfg.train.max_steps
        if self.rank == 0:  # once the run has started (a refused start prints only its one error line)
            tqdm.write(self.precision.describe() + (f"; truncated importance sampling: {self.tis} level"
                                                    if self.tis else ""), file=sys.stderr)
        if self.eval_before is None:
            before = self.evaluate()
            self.eval_before = before
            if self.rank == 0:
                tqdm.write(f"held-out accuracy before training: {100 * before['eval/accuracy']:.1f}% "
                           f"({len(self.eval_examples)} problems)", file=sys.stderr)
                self.log({"step": 0, **before})
            self.reporter.metrics(before, 0)
        elif self.rank == 0:
            tqdm.write(f"resumed from {self.resume_from} at step {self.start_step - 1}", file=sys.stderr)
        before = self.eval_before
        bar = tqdm(range(self.start_step, steps + 1), desc=f"aapo train [{cfg.algorithm.name}]", unit="step",
                   disable=self.rank != 0, file=sys.stderr, dynamic_ncols=True, initial=self.start_step - 1,
                   total=steps)
        stopped_at = None
        for step in bar:
            m = self.step(step)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != steps:
                m.update(self.evaluate())
            if step == steps:
                m.update(self.evaluate())
            self.history.append(m)
            self.log(m)
            self.reporter.metrics(m, step)
            self._count_nonfinite(m)
            # every rank learns of a signal any rank received, and they stop after the same step
            stop = all_reduce_sum([1.0 if self.stop_signal is not None else 0.0])[0] > 0
            saving = (cfg.train.save_every and step % cfg.train.save_every == 0) or (step == steps and cfg.train.save_final)
            if saving or stop:
                self.save_checkpoint(step)
            if self.rank == 0:
                bar.set_postfix(r=f"{m['reward/mean']:.2f}", loss=f"{m['loss']:.3g}")
                if step % cfg.train.log_every == 0 or step == steps:
                    tqdm.write(M.format_line(m), file=sys.stderr)
            if stop and step != steps:
                stopped_at = step
                break
        bar.close()
        last = self.history[-1] if self.history else {}
        summary = {
            "output_dir": str(self.output_dir),
            "algorithm": cfg.algorithm.name,
            "steps": stopped_at or steps,
            "stopped_early": stopped_at is not None,
            "eval_before": before["eval/accuracy"],
            "eval_after": last.get("eval/accuracy"),
            "eval_format_before": before.get("eval/format_rate"),
            "eval_format_after": last.get("eval/format_rate"),
            "eval_problems": len(self.eval_examples),
            "skipped_nonfinite_steps": int(sum(m.get("skipped_nonfinite", 0) for m in self.history)),
            "checkpoint": (str(self.output_dir / "checkpoints" / f"step-{stopped_at or steps}")
                           if cfg.train.save_final or stopped_at or self.stop_signal else None),
        }
        if self.rank == 0:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _count_nonfinite(self, m: dict) -> None:
        """A step whose loss or gradient was not finite was skipped by the optimizer (DeepSpeed
        ZeRO-2/3 skip a step whose gradient norm is inf/NaN); stop after too many in a row."""
        if m.get("skipped_nonfinite", 0) > 0:
            self.nonfinite_in_a_row += 1
            if self.rank == 0:
                tqdm.write(f"step {m['step']}: non-finite loss or gradient, update skipped "
                           f"({self.nonfinite_in_a_row} in a row)", file=sys.stderr)
        else:
            self.nonfinite_in_a_row = 0
        limit = self.cfg.train.max_nonfinite_steps
        if limit and self.nonfinite_in_a_row >= limit:
            raise AapoError(f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient and were skipped "
                            f"(train.max_nonfinite_steps={limit}); lower train.learning_rate, check the rewards for "
                            f"NaN/inf, or use bf16/fp32 instead of fp16; resume from the last checkpoint with --resume")

    def close(self) -> None:
        if self.rank == 0 and getattr(self, "output_dir", None) is not None:
            rundir.unlock(self.output_dir)
        self.rewards.close()
        if getattr(self, "reporter", None) is not None:
            self.reporter.finish()
