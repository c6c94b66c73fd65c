"""Time TRL's GRPOTrainer on CPU, configured to do the same work per optimizer step as aapo's `grpo`.

Usage (TRL is not an aapo dependency: `pip install trl==1.16.0`):

    python bench/trl_grpo_step.py --model ~/.cache/aapo/smollm2-135m-instruct-fp32 \
        --prompts prompts.jsonl --steps 4 --warmup 1 --prompts-per-step 2 --group-size 4 \
        --max-new-tokens 64 --beta 0.04 --out trl.json

`--prompts` is a JSONL of {"prompt": <chat-templated text>, "answer": "..."} (cycled if the run
needs more). Prints and writes {"trl_version", "torch_version", "settings", "step_seconds",
"warmup_step_seconds", "rollout_seconds", "mean_step_seconds", "median_step_seconds",
"mean_completion_length", "completion_tokens", "logs"}; rollout_seconds is the part of each
measured step spent in generation + reference log-probs + rewards, completion_tokens the
completion tokens (EOS included) generated in each measured step. Torch threads are left at
torch's default (set OMP_NUM_THREADS to change it); do not time two runs at once on one machine.

How TRL 1.16 is mapped onto aapo's GRPO step (read from trl/trainer/grpo_{config,trainer}.py):
- Batch: TRL's batch sizes count completions, not prompts. per_device_train_batch_size = P*G
  (or --micro-batch-size), gradient_accumulation_steps = P*G / that, steps_per_generation left
  unset (= gradient_accumulation_steps), so generation_batch_size = P*G: each optimizer step draws
  P distinct prompts (RepeatSampler repeats each G times), generates P*G completions in ONE
  model.generate call, and updates once on them; num_iterations = 1. Because generation and
  optimizer steps are aligned, TRL skips the old-log-prob forward (old = logp.detach()), as aapo.
- Loss: loss_type="grpo" is the per-sequence token mean then batch mean (aapo's seq_mean); the
  default "dapo" is a token mean over the batch. PPO clip epsilon (epsilon_high = epsilon),
  beta * k3 KL to a reference model (none is loaded when beta = 0), delta=None.
- Advantages: scale_rewards="group": (r - group mean) / (unbiased group std + 1e-4), rewards
  summed with weights 1 ("sum_then_normalize"), as aapo.
- Off: top_entropy_quantile=1.0, entropy_coef=0, mask_truncated_completions, use_vllm (so no
  vLLM importance-sampling correction), off_policy_mask_threshold, sync_ref_model,
  gradient_checkpointing, torch_compile, eval, checkpoints (save_strategy="no"), report_to.
- Optimizer as aapo's defaults: torch fused AdamW, weight_decay 0, constant lr, no warm-up,
  max_grad_norm 1.0.
- Prompts: a plain-string "prompt" column is not conversational, so TRL applies no chat template
  (it only templates lists of {"role", "content"} messages); it tokenizes with
  `processing_class(text=prompts)`, i.e. add_special_tokens=True. The subclass below passes
  add_special_tokens=False, like aapo for chat-templated prompts (a no-op for SmolLM2, whose
  tokenizer adds no BOS). max_prompt_length no longer exists in TRL 1.16: prompts are not cut.
- Generation: do_sample with temperature / top_p / top_k (0 = off), max_new_tokens = T, stops at
  the tokenizer's and generation_config's EOS ids; completions are cut after the first EOS.
- Timing: a callback times on_step_begin -> on_step_end. Generation happens inside that window
  (Trainer.training_step -> GRPOTrainer._prepare_inputs -> _generate_and_score_completions:
  generate, reference log-probs, rewards, advantages), followed by forward/backward, gradient
  clipping and the optimizer step.
Differences TRL forces: it always computes per-token entropy (for logging) in the training
forward; its log-probs come from a chunked fused LM head (transformers' fused_lm_head) rather than
full logits; --bf16 means autocast over fp32 weights (aapo's bf16 DeepSpeed config trains bf16
weights); ref log-probs are computed in chunks of the micro-batch size. aapo's default
train.micro_batch_size is 8: pass the same --micro-batch-size to match its accumulation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
import trl
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


def last_boxed(text: str) -> str | None:
    """Content of the last brace-balanced ``\\boxed{...}`` in ``text`` (None if there is none)."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{"): i - 1]
        start = text.rfind("\\boxed{", 0, start)
    return None


def accuracy(completions, answer, **_) -> list[float]:
    """1.0 when the last \\boxed{} content equals the answer after stripping."""
    out = []
    for text, gold in zip(completions, answer):
        boxed = last_boxed(text)
        out.append(1.0 if boxed is not None and boxed.strip() == str(gold).strip() else 0.0)
    return out


def boxed_format(completions, **_) -> list[float]:
    """0.5 when the completion contains \\boxed{ (the weight is folded in, TRL's weights stay 1)."""
    return [0.5 if "\\boxed{" in text else 0.0 for text in completions]


class PlainPromptGRPOTrainer(GRPOTrainer):
    """GRPOTrainer that tokenizes plain-string (already templated) prompts without special tokens
    and times its rollout phase (generation, reference log-probs, rewards, advantages)."""

    rollout_seconds: list[float]

    def _generate_and_score_completions(self, inputs):
        start = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self.rollout_seconds.append(time.perf_counter() - start)
        return out

    def _tokenize_prompts(self, prompts: list):
        if isinstance(prompts[0], str):  # TRL's own plain-string branch, plus add_special_tokens=False
            return self.processing_class(text=prompts, add_special_tokens=False)["input_ids"], None, {}
        return super()._tokenize_prompts(prompts)


class StepTimer(TrainerCallback):
    """Wall-clock seconds of every optimizer step and the per-step training logs."""

    def __init__(self):
        self.seconds, self.logs, self._start = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "completions/mean_length" in logs:  # per-step logs, not the end-of-train summary
            self.logs.append({"step": state.global_step, **logs})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--prompts", required=True, help='JSONL of {"prompt": templated text, "answer": ...}')
    p.add_argument("--steps", type=int, default=2, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not counted")
    p.add_argument("--prompts-per-step", type=int, default=2, help="P: distinct prompts per optimizer step")
    p.add_argument("--group-size", type=int, default=4, help="G: completions per prompt (>= 2)")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="sequences per forward/backward (0 = all P*G; else gradient accumulation)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (0 = no reference model)")
    p.add_argument("--epsilon", type=float, default=0.2, help="PPO clip range")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast (TRL/accelerate mixed precision; weights stay fp32)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="EOS never drawn (generate's min_new_tokens = max_new_tokens): fixed-length completions")
    p.add_argument("--out", help="write the JSON result here too")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    n = args.prompts_per_step * args.group_size
    micro = args.micro_batch_size or n
    if n % micro:
        sys.exit(f"--micro-batch-size {micro} must divide P*G = {n}")
    with open(args.prompts) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) < args.prompts_per_step:
        sys.exit(f"{args.prompts}: {len(rows)} prompts, fewer than --prompts-per-step {args.prompts_per_step}")
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")

    with tempfile.TemporaryDirectory(prefix="trl_grpo_") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=args.bf16, fp16=False, seed=args.seed,
            max_steps=args.warmup + args.steps,
            per_device_train_batch_size=micro, gradient_accumulation_steps=n // micro,
            num_generations=args.group_size, num_iterations=1, shuffle_dataset=True,
            max_completion_length=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            loss_type="grpo", scale_rewards="group", multi_objective_aggregation="sum_then_normalize",
            beta=args.beta, epsilon=args.epsilon, epsilon_high=None, delta=None,
            importance_sampling_level="token", top_entropy_quantile=1.0, entropy_coef=0.0,
            mask_truncated_completions=False, use_vllm=False, sync_ref_model=False,
            learning_rate=args.learning_rate, optim="adamw_torch_fused", weight_decay=0.0,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            gradient_checkpointing=False, torch_compile=False, remove_unused_columns=False,
            eval_strategy="no", save_strategy="no", report_to="none",
            logging_strategy="steps", logging_steps=1, log_completions=False, disable_tqdm=True,
            generation_kwargs={"min_new_tokens": args.max_new_tokens} if args.ignore_eos else None,
        )
        timer = StepTimer()
        trainer = PlainPromptGRPOTrainer(
            model=args.model, reward_funcs=[accuracy, boxed_format], args=config,
            train_dataset=dataset, processing_class=tokenizer, callbacks=[timer],
        )
        trainer.rollout_seconds = []
        trainer.train()

    measured = timer.seconds[args.warmup:]
    step_logs = timer.logs[args.warmup:]
    lengths = [log["completions/mean_length"] for log in step_logs]
    # num_tokens is TRL's running count of prompt + completion tokens
    counts = [0.0] + [float(log["num_tokens"]) for log in timer.logs]
    all_tokens = [b - a for a, b in zip(counts, counts[1:])][args.warmup:]
    result = {
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "settings": {
            **vars(args),
            "torch_threads": torch.get_num_threads(),
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "generation_batch_size": config.generation_batch_size,
            "steps_per_generation": config.steps_per_generation,
            "num_generations": config.num_generations,
            "num_iterations": config.num_iterations,
            "loss_type": config.loss_type,
            "scale_rewards": config.scale_rewards,
            "reference_model": trainer.ref_model is not None,
        },
        "step_seconds": measured,
        "warmup_step_seconds": timer.seconds[: args.warmup],
        "rollout_seconds": trainer.rollout_seconds[args.warmup:],
        "mean_step_seconds": statistics.fmean(measured) if measured else None,
        "median_step_seconds": statistics.median(measured) if measured else None,
        "mean_completion_length": statistics.fmean(lengths) if lengths else None,
        "completion_tokens": [round(length * n) for length in lengths],
        "tokens": [round(t) for t in all_tokens],
        "warmup_completion_tokens": [round(log["completions/mean_length"] * n) for log in timer.logs[:args.warmup]],
        "logs": timer.logs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
