"""The training loop: rollout -> scoring -> update, once per step, on every rank.

Data parallelism: each rank draws its own ``rollout.prompts_per_rank`` prompts (disjoint slices of
one global batch), samples all G completions of each of them itself, so a prompt group never
spans ranks and the group statistics need no communication. DeepSpeed averages the gradients.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from aapo_app import checkpoint as CK
from aapo_app import metrics as M
from aapo_app.algorithms import build_algorithm
from aapo_app.batches import select_groups
from aapo_app.check import check_lengths, sample_prompts
from aapo_app.config import RunConfig
from aapo_app.data import PromptSampler, load_examples, render_prompt
from aapo_app.ds_config import (DEFAULT_POLICY_CONFIG, DEFAULT_REFERENCE_CONFIG, fill_ds_config, lr_schedule,
                                read_ds_config)
from aapo_app.engine import (ZeroModel, all_reduce_sum, barrier, check_hybrid_engine,
                             init_distributed, launched_world_size, on_rank0)
from aapo_app.errors import AapoError
from aapo_app.models import load_causal_lm, load_tokenizer, resolve_model_path, resolve_model_path_rank0_first
from aapo_app.reporting import Reporter, git_commit, sample_rows, write_samples_file
from aapo_app.rewards import run_reward_model
from aapo_app.rollout import encode_prompts, eos_token_ids, rollout, sample
from aapo_app.scoring import grade, score, signal_groups
from aapo_app.update import update
from aapo_app.vllm_engine import WeightSync, check_vllm_run

FORMAT_REWARDS = ("boxed_format", "format", "tag_format")


def _format_key(names) -> str | None:
    return next((n for n in FORMAT_REWARDS if n in names), None)


def reduce_metrics(local: dict[str, float]) -> dict[str, float]:
    """Average every metric over ranks (same keys on every rank; sums for SUMMED keys)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    keys = sorted(local)
    totals = all_reduce_sum([local[k] for k in keys])
    return {k: (t if k in M.SUMMED else t / world) for k, t in zip(keys, totals)}


class Trainer:
    """Builds the engines, data, rewards and algorithm of a run and drives the steps."""

    def __init__(self, cfg: RunConfig, ds_config: str | None = None, ref_ds_config: str | None = None,
                 resume_from: Path | None = None):
        self.cfg = cfg
        self.resume_from = Path(resume_from) if resume_from else None
        # everything that can fail on user input is checked before the (slow) engines are built
        ds_policy = read_ds_config(ds_config, DEFAULT_POLICY_CONFIG)
        ds_ref = read_ds_config(ref_ds_config, DEFAULT_REFERENCE_CONFIG, option="--ref-ds-config")
        self.algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params)
        resolve_model_path(cfg.model.path, convert=False)
        if cfg.rollout.deepspeed_hybrid_engine:
            check_hybrid_engine()
        if cfg.rollout.backend == "vllm":
            check_vllm_run(cfg, self.algorithm)
        self.train_examples, self.eval_examples = load_examples(cfg.data, cfg.train.seed)

        if not self.resume_from and cfg.output_dir and (Path(cfg.output_dir) / "metrics.jsonl").exists():
            raise AapoError(f"--output-dir: '{cfg.output_dir}' already holds a run; choose a new directory "
                            f"(or continue it with --resume latest)")
        # the DeepSpeed configs' numbers against the run config, before the process group starts
        launched_world = launched_world_size()
        self.ds_policy = fill_ds_config(ds_policy, cfg, launched_world)
        self.ds_ref = fill_ds_config(ds_ref, cfg, launched_world, training=False)

        self.rank, self.world = init_distributed()
        self.sampler = PromptSampler(self.train_examples, cfg.rollout.prompts_per_rank, self.rank, self.world,
                                     cfg.train.seed)
        random.seed(cfg.train.seed)
        torch.manual_seed(cfg.train.seed)
        # rank 0 creates the run directory; a failure there must stop every rank, not leave them waiting
        self.output_dir = Path(on_rank0(lambda: str(cfg.output_dir) if self.resume_from else self._create_output_dir()))

        model_path = resolve_model_path_rank0_first(cfg.model.path, self.rank)
        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path)
        self.chat = bool(cfg.data.use_chat_template and self.tokenizer.chat_template)
        from transformers import AutoConfig

        max_positions = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
        check_lengths(self.tokenizer, max_positions, sample_prompts(self.train_examples, self.eval_examples,
                                                                    lambda p: render_prompt(self.tokenizer, p, cfg.data)),
                      cfg, add_special_tokens=not self.chat)
        self.reference_cache = None
        if cfg.rollout.reference.startswith("cached:"):
            if self.algorithm.uses_reference_samples:
                from aapo_app.reference_cache import ReferenceCache, fingerprint_components

                # rank 0 hashes the weights for the fingerprint; the other ranks need not read them again
                components = on_rank0(lambda: fingerprint_components(cfg, model_path, self.tokenizer))
                self.reference_cache = ReferenceCache(cfg.rollout.reference[len("cached:"):].strip(), components,
                                                      self.tokenizer.pad_token_id)
            elif self.rank == 0:
                tqdm.write(f"note: rollout.reference={cfg.rollout.reference} is ignored: {cfg.algorithm.name} samples "
                           f"no reference group", file=sys.stderr)
        self.rewards = run_reward_model(cfg.rewards)
        self.format_key = _format_key(self.rewards.weights)
        self.eval_rewards = {name: self.rewards.rewards[name] for name in ("accuracy", self.format_key) if name}

        self.policy = ZeroModel(load_causal_lm(model_path, ds_config=self.ds_policy), self.ds_policy, trainable=True,
                                gather=cfg.rollout.gather, gradient_checkpointing=cfg.model.gradient_checkpointing,
                                learning_rate=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                                hybrid_engine=cfg.rollout.deepspeed_hybrid_engine,
                                max_out_tokens=cfg.rollout.max_new_tokens + 1024,
                                lr_schedule=None if "scheduler" in self.ds_policy else lr_schedule(cfg))
        # the reference group is sampled by the DeepSpeed reference engine unless it comes from a cache
        # or a vLLM reference engine; KL baselines always score with it
        samples_online = self.algorithm.uses_reference_samples and self.reference_cache is None
        needs_engine = (self.algorithm.uses_reference_logprobs
                        or (samples_online and cfg.rollout.backend != "vllm"))
        self.vllm_needs_reference = samples_online and cfg.rollout.backend == "vllm"
        self.reference = None
        if needs_engine:
            self.reference = ZeroModel(load_causal_lm(model_path, ds_config=self.ds_ref), self.ds_ref, trainable=False,
                                       gather=cfg.rollout.gather)
        self.eos_ids = eos_token_ids(self.tokenizer, self.policy.module)
        self.vllm = self.vllm_reference = None
        self.weight_sync = WeightSync(cfg.rollout.vllm_sleep_level)
        if cfg.rollout.backend == "vllm":
            self._build_vllm(model_path)
        self.history: list[dict] = []
        self.start_step, self.eval_before = 1, None
        self.nonfinite_in_a_row = 0
        self.stop_signal: int | None = None
        if self.resume_from is not None:
            self._restore(self.resume_from)
        elif cfg.train.save_every or cfg.train.save_final:
            self._check_disk_space()
        self.reporter = self._make_reporter()

    # -- helpers ------------------------------------------------------------------------------
    def _create_output_dir(self) -> str:
        out = self.cfg.output_dir
        if not out:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            out = f"runs/{self.cfg.algorithm.name}-{stamp}"
        path = Path(out)
        if path.exists() and (path / "metrics.jsonl").exists():
            raise AapoError(f"--output-dir: '{path}' already holds a run; choose a new directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            (path / "ds_config.json").write_text(json.dumps(self.ds_policy, indent=2))
            (path / "ds_config_reference.json").write_text(json.dumps(self.ds_ref, indent=2))
        except OSError as exc:
            raise AapoError(f"--output-dir: cannot write to '{path}' ({exc.strerror}); choose a writable directory") from exc
        return str(path)

    def _prompts(self, examples) -> list[str]:
        return [render_prompt(self.tokenizer, ex.problem, self.cfg.data) for ex in examples]

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
        """Save everything a resume needs as ``checkpoints/step-<step>`` (see
        :mod:`aapo_app.checkpoint`): written under ``.tmp`` and renamed once every rank is done, so a
        kill or a full disk leaves the previous checkpoint intact. Keeps the last
        ``train.keep_checkpoints``. Collective: every rank calls it."""
        final = self.output_dir / "checkpoints" / f"step-{step}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the remains of a save that was killed
            tmp.mkdir(parents=True, exist_ok=True)
        barrier()
        failure = ""
        try:
            self.policy.save_pretrained(tmp, self.tokenizer)
            self.policy.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
            (tmp / "ranks").mkdir(exist_ok=True)
            torch.save(CK.rank_state(self.sampler), tmp / "ranks" / f"rank{self.rank}.pt")
            if self.rank == 0:
                state = {"step": step, "world_size": self.world, "algorithm": self.cfg.algorithm.name,
                         "base_model": self.cfg.model.path, "eval_before": self.eval_before,
                         "history": self.history, "config": self.cfg.to_dict()}
                (tmp / CK.STATE_FILE).write_text(json.dumps(state, indent=1))
        except OSError as exc:
            failure = f"{exc.strerror or exc}"
        failures = failure if self.world == 1 else self._gather_failure(failure)
        if failures:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = sorted(CK.checkpoint_dirs(self.output_dir))
            kept = f"the previous checkpoint step-{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise AapoError(f"checkpoint step-{step} could not be written ({failures}); {kept}; free disk space "
                            f"or lower train.keep_checkpoints, then resume with --resume latest")
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            CK.prune(self.output_dir, self.cfg.train.keep_checkpoints)
        barrier()
        return final

    def _gather_failure(self, failure: str) -> str:
        """Any rank's save error, on every rank (so that all of them stop together)."""
        import torch.distributed as dist

        box = [None] * self.world
        dist.all_gather_object(box, failure)
        return "; ".join(sorted({f for f in box if f}))

    def _restore(self, step_dir: Path) -> None:
        """Load a checkpoint into the engines, the sampler and the RNGs, and cut the logs back to it."""
        state = CK.read_state(step_dir)
        if state.get("world_size") != self.world:
            raise AapoError(f"--resume: the checkpoint was written by {state.get('world_size')} ranks and this run has "
                            f"{self.world}; resume with the same number of ranks")
        load_path, _ = self.policy.engine.load_checkpoint(str(step_dir / "deepspeed"), tag="state",
                                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise AapoError(f"--resume: DeepSpeed could not load {step_dir / 'deepspeed'}; resume from another step")
        rank_file = step_dir / "ranks" / f"rank{self.rank}.pt"
        try:
            CK.restore_rank_state(torch.load(rank_file, weights_only=False), self.sampler)
        except (OSError, KeyError, ValueError) as exc:
            raise AapoError(f"--resume: cannot read {rank_file} ({exc}); resume from another step") from exc
        step = int(state["step"])
        self.weight_sync.weights_replaced()  # a vLLM policy engine still holds the base weights
        self.history = list(state.get("history", []))
        self.eval_before = state.get("eval_before")
        self.start_step = step + 1
        if self.rank == 0:
            CK.truncate_jsonl(self.output_dir / "metrics.jsonl", step)
        CK.truncate_jsonl(self.output_dir / "rollouts" / f"rank{self.rank}.jsonl", step)
        barrier()

    def _check_disk_space(self) -> None:
        """Refuse to start when one checkpoint would not fit on the run directory's disk."""
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in self.policy.module.parameters())
        need = CK.checkpoint_bytes(numel, 4, self.world)
        free = shutil.disk_usage(self.output_dir).free
        if free < need:
            raise AapoError(f"--output-dir: {free / 2**30:.1f} GiB free on the run directory's disk, one checkpoint needs "
                            f"about {need / 2**30:.1f} GiB; free space, choose another --output-dir, or set "
                            f"train.save_final=false train.save_every=0")

    def _make_reporter(self) -> Reporter:
        """wandb / TensorBoard on rank 0 with the full config and the code's git commit; the same
        facts go to run_info.json."""
        cfg = self.cfg
        info = {"git_commit": git_commit(), "world_size": self.world, "model_path": self.model_path,
                "torch": torch.__version__, "resumed_from": str(self.resume_from) if self.resume_from else None}
        if self.rank == 0:
            (self.output_dir / "run_info.json").write_text(json.dumps(info, indent=2))
        config = {**cfg.to_dict(), "ds_config": self.ds_policy, "ds_config_reference": self.ds_ref, **info}
        return Reporter(cfg.train.report_to, self.output_dir, cfg.train.run_name or self.output_dir.name,
                        cfg.train.tags, cfg.train.wandb_project, config, self.rank,
                        log=lambda msg: tqdm.write(msg, file=sys.stderr))

    def request_stop(self, signum: int) -> None:
        """First SIGTERM/SIGINT: finish the current step, save, exit. (The CLI installs the handler.)"""
        self.stop_signal = signum

    # -- vLLM rollouts (rollout.backend=vllm) ---------------------------------------------------
    def _build_vllm(self, model_path: str) -> None:
        """The vLLM engines, after the DeepSpeed ones (which allocate first): the policy's and, for
        AAPO's online reference group, the reference's; then the start-up check that the reference
        engine is not the policy engine. Collective."""
        from aapo_app.rollout import stream_seed
        from aapo_app.vllm_engine import build_engines

        r = self.cfg.rollout
        self.vllm, self.vllm_reference = build_engines(
            r, model_path, rank=self.rank, seed=stream_seed(self.cfg.train.seed, "vllm", self.rank),
            reference=self.vllm_needs_reference, max_num_seqs=r.vllm_max_num_seqs or r.prompts_per_rank * r.group_size,
            max_model_len=self._max_model_len())
        # building an engine reseeds python, numpy and torch: put the run's seeds back
        random.seed(self.cfg.train.seed)
        torch.manual_seed(self.cfg.train.seed)
        self.vllm.sleep()
        self.weight_sync.fell_asleep()

    def _max_model_len(self) -> int:
        """The longest rendered prompt plus the longest completion (training or evaluation)."""
        prompts = self._prompts(self.train_examples + self.eval_examples)
        longest = max((len(self.tokenizer(p, add_special_tokens=not self.chat)["input_ids"]) for p in prompts), default=0)
        return longest + max(self.cfg.rollout.max_new_tokens, self.cfg.train.eval_max_new_tokens) + 8

    @contextlib.contextmanager
    def _generator(self):
        """What generates now: the DeepSpeed policy, or the vLLM policy engine woken up with the
        trainer's current weights (pushed if they changed), put back to sleep afterwards.
        Collective (the push gathers the ZeRO-3 partitions)."""
        if self.vllm is None:
            yield self.policy
            return
        from aapo_app.vllm_engine import push_weights_checked

        engine = self.vllm
        engine.wake_weights()
        if self.weight_sync.needs_push():
            push_weights_checked(self.policy.module, engine, self.vllm_reference)
            self.weight_sync.did_push()
        self.weight_sync.woke()
        engine.wake_cache()
        try:
            yield engine
        finally:
            engine.sleep()
            if engine.sleep_level:
                self.weight_sync.fell_asleep()

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy (and format rate), problems sharded over ranks."""
        shard = self.eval_examples[self.rank::self.world]
        correct = formatted = 0.0
        with self._generator() as generator:
            if shard:
                ids, mask = encode_prompts(self.tokenizer, self._prompts(shard), not self.chat)
                samples = sample(generator, self.tokenizer, ids, mask, num_samples=1,
                                 max_new_tokens=self.cfg.train.eval_max_new_tokens, temperature=None, seed=0,
                                 eos_ids=self.eos_ids, generation_batch_size=self.cfg.rollout.generation_batch_size)
                answers, lengths = [ex.answer for ex in shard], samples.lengths.tolist()
                correct = sum(self.eval_rewards["accuracy"](samples.texts, answers, lengths))
                if self.format_key:
                    formatted = sum(self.eval_rewards[self.format_key](samples.texts, answers, lengths))
            elif generator is self.policy:  # ZeRO-3 gathers are collective: ranks without problems take part
                with self.policy.generation_mode():
                    pass
        total, correct, formatted = all_reduce_sum([len(shard), correct, formatted])
        result = {"eval/accuracy": correct / total}
        if self.format_key:
            result["eval/format_rate"] = formatted / total
        return result

    # -- the loop -----------------------------------------------------------------------------
    def _rollout(self, step: int, round: int = 0):
        examples = self.sampler.next_batch()
        cfg = self.cfg
        with self._generator() as generator:
            return rollout(generator, self.reference, self.tokenizer, examples, self._prompts(examples),
                           cfg=cfg.rollout, algorithm=self.algorithm, seed=cfg.train.seed, step=step, rank=self.rank,
                           micro_batch_size=cfg.train.micro_batch_size, add_special_tokens=not self.chat,
                           eos_ids=self.eos_ids, round=round, reference_cache=self.reference_cache,
                           reference_sampler=self.vllm_reference)

    def _rollout_with_resampling(self, step: int):
        """One rollout, or, for algorithms that resample (DAPO's dynamic sampling, GPG's
        regeneration), rounds of rollouts whose groups carrying signal (``Resampling.signal``) are
        kept until the batch has enough of them. Each round is graded once, here, and the grades
        travel with the batch to scoring. All ranks take the same number of rounds (ZeRO-3
        generation is collective, and the prompt samplers stay in step). If the rounds run out, the
        batch is topped up with groups without signal so every rank trains the same number of
        sequences. Returns the batch, the extra rounds taken and the fraction of its groups that
        carry signal (None without resampling)."""
        batch = self._rollout(step)
        plan = self.algorithm.resampling()
        if plan is None:
            return batch, 0, None
        start = time.perf_counter() - batch.seconds
        P = len(batch.examples)
        kept, dropped, rounds, counts = [], [], 0, {}
        while True:
            batch = grade(batch, self.rewards)
            for key, value in batch.policy_grades.counts.items():
                counts[key] = counts.get(key, 0) + value
            signal = signal_groups(batch.policy_grades, batch.group_size, plan.signal)
            kept += [(batch, i) for i in range(P) if signal[i]]
            dropped += [(batch, i) for i in range(P) if not signal[i]]
            short = float(len(kept) < math.ceil(plan.min_kept_fraction * P))
            if rounds >= plan.max_extra_rounds or all_reduce_sum([short])[0] == 0:
                break
            rounds += 1
            batch = self._rollout(step, round=rounds)
        kept_frac = min(len(kept), P) / P
        if rounds == 0 and len(kept) == P:
            return batch, 0, kept_frac
        merged = select_groups((kept + dropped)[:P], self.tokenizer.pad_token_id, counts)
        merged.seconds = time.perf_counter() - start  # every round's sampling and grading
        return merged, rounds, kept_frac

    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        batch, rounds, kept_frac = self._rollout_with_resampling(step)
        scored = score(batch, self.rewards, self.algorithm)
        self.log_rollout(step, scored)
        every = cfg.train.log_samples_every
        if self.rank == 0 and every and (step % every == 0 or step == 1):
            rows = sample_rows(scored)
            write_samples_file(self.output_dir, step, rows)
            self.reporter.samples(rows, step)
        upd = update(self.policy, scored, self.algorithm, micro_batch_size=cfg.micro_batch_rows,
                     temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens)
        self.weight_sync.optimizer_step(applied=upd["skipped_nonfinite"] < self.algorithm.optimizer_steps_per_rollout)
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
                           if cfg.train.save_final or stopped_at else None),
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
        self.rewards.close()
        if getattr(self, "reporter", None) is not None:
            self.reporter.finish()
