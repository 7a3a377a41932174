"""Training a reward model: the head on the frozen base's features, then (when
asked) the reward adapter with it.

A solo researcher has tens to hundreds of comparisons, not InstructGPT's tens of
thousands, so "one epoch" is a handful of steps that learn nothing. By default
training runs epochs until the held-out loss stops improving (early stopping,
the best state kept), and held-out accuracy is reported with its count and a
95% interval over the held-out comparisons, so that "0.58 on 12 pairs" reads as
what it is. The held-out split also chooses where to stop, which makes its
accuracy slightly optimistic; ``rlhf eval-policy`` is the unbiased check of the
whole loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlhf.errors import UserError
from rlhf.reward_config import Readout, RewardConfig
from rlhf.reward_data import Element, batches, split_by_prompt
from rlhf.reward_eval import evaluate_elements
from rlhf.reward_ensemble import fit_ensemble, fit_split_head
from rlhf.reward_loss import Comparisons, PairEval
from rlhf.reward_schedule import Phase, linear_decay, planned_epochs
from rlhf.reward_scoring import ADAPTER, raw_rewards

if TYPE_CHECKING:
    from rlhf.model_stack import ModelStack


@dataclass
class TrainResult:
    steps: int                 # optimizer steps taken
    eval: PairEval             # held-out figures of the state kept
    n_train: int
    n_eval: int
    epochs: float = 0.0        # passes over the training elements taken (in the last phase)
    best_step: int = 0         # the step whose state was kept
    stopped_early: bool = False
    readout: Readout | None = None


def steps_per_epoch(n_train: int, config: RewardConfig) -> int:
    micro = -(-n_train // config.batch_size)
    return max(1, -(-micro // config.accum))


def plan_steps(train_set: Sequence[Element], config: RewardConfig, rng: random.Random,
               epochs: int | None = None) -> list[list[list[Element]]]:
    """Fine-tuning steps, each a list of up to ``accum`` micro-batches: whole epochs,
    each shuffled and cut into batches (so one epoch shows every element exactly
    once, and no step spans two epochs); with ``steps`` set, as many epochs as that
    takes, cut to length."""
    epochs = epochs or config.epochs or config.setting("max_epochs", "finetune")
    plan: list[list[list[Element]]] = []
    done = 0
    while (len(plan) < config.steps) if config.steps else (done < epochs):
        order = list(train_set)
        rng.shuffle(order)
        micro = batches(order, config.batch_size)
        plan += [micro[i:i + config.accum] for i in range(0, len(micro), config.accum)]
        done += 1
    return plan[:config.steps] if config.steps else plan


def trainable_parameters(stack: ModelStack) -> list[torch.nn.Parameter]:
    """The reward adapter's LoRA weights and the reward head, switched to trainable."""
    stack.ensure_adapter(ADAPTER)
    params = stack.adapter_parameters(ADAPTER) + list(stack.reward_head.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


class BestState:
    """Early stopping on the held-out loss: a copy of the parameters at the best
    evaluation so far, and how many evaluations since it improved."""

    def __init__(self, params: Sequence[torch.Tensor], patience: int) -> None:
        self.params, self.patience = list(params), patience
        self.eval: PairEval | None = None
        self.step = 0
        self.since_best = 0
        self._saved: list[torch.Tensor] = []

    def observe(self, step: int, result: PairEval) -> bool:
        """Record an evaluation; True when training should stop."""
        if self.eval is None or result.loss < self.eval.loss - 1e-4:
            self.eval, self.step, self.since_best = result, step, 0
            self._saved = [p.detach().clone() for p in self.params]
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.params, self._saved):
            p.copy_(saved)


def finetune_step(stack: ModelStack, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Sequence[Element]],
                  readout: Readout, best_of_k: str, checkpoint: Callable[[], None]) -> dict[str, float]:
    """One optimizer step of the adapter and head over accumulated micro-batches."""
    optimizer.zero_grad(set_to_none=True)
    losses, margins = [], []
    for batch in micro_batches:
        checkpoint()
        layout = Comparisons(batch, best_of_k)
        with stack.role(ADAPTER):
            rewards = raw_rewards(stack, layout.sequences, layout.lengths, readout)
        loss = layout.loss(rewards.float().cpu())
        (loss / len(micro_batches)).backward()  # gradient accumulation: the mean over micro-batches
        losses.append(loss.item())
        margins.append(layout.margins(rewards.detach().float().cpu()))
    optimizer.step()
    m = torch.cat(margins)
    return {"loss": sum(losses) / len(losses), "accuracy": (m > 0).float().mean().item(), "margin": m.mean().item()}


def finetune(stack: ModelStack, train_set: Sequence[Element], held_out: Sequence[Element], readout: Readout,
             config: RewardConfig, head: Phase, log: Callable[[int, dict[str, float]], None],
             checkpoint: Callable[[], None], first_step: int) -> Phase:
    """The reward LoRA adapter and the head together, from the fitted head, in
    mini-batches through the model; early stopping counts the head's held-out
    loss as the one to beat, so fine-tuning that does not help changes nothing."""
    plan = plan_steps(train_set, config, random.Random(config.seed),
                      planned_epochs(config, bool(held_out), "finetune"))
    per_epoch = steps_per_epoch(len(train_set), config)
    steps = len(plan)
    params = trainable_parameters(stack)
    optimizer = torch.optim.Adam(params, lr=config.setting("lr", "finetune"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_decay(s, steps))
    best = BestState(params, config.setting("patience", "finetune")) if config.early_stopping and held_out else None
    if best is not None:
        best.observe(first_step - 1, head.eval)
    result, stop, taken = head.eval, False, 0
    try:
        for step, micro_batches in enumerate(plan, start=1):
            lr = scheduler.get_last_lr()[0]
            metrics = {**finetune_step(stack, optimizer, micro_batches, readout, config.best_of_k, checkpoint),
                       "lr": lr}
            scheduler.step()
            taken = step
            epoch_end = step % per_epoch == 0 or step == steps
            if held_out and (epoch_end or step % config.eval_every == 0):
                result = evaluate_elements(stack, held_out, readout, config.batch_size * 4, config.best_of_k)
                metrics.update({"eval/accuracy": result.accuracy, "eval/margin": result.margin,
                                "eval/loss": result.loss})
                stop = best is not None and best.observe(first_step + step - 1, result)
            if epoch_end:
                metrics["epoch"] = step / per_epoch
            log(first_step + step - 1, metrics)
            if stop:
                break
    finally:
        for p in params:
            p.requires_grad_(False)
    kept = first_step + taken - 1
    if best is not None and best.eval is not None:
        best.restore()
        result, kept = best.eval, best.step
    return Phase(steps=taken, epochs=taken / per_epoch, eval=result, best_step=kept, stopped_early=stop)


def train(stack: ModelStack, elements: Sequence[Element], config: RewardConfig, *,
          log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
          checkpoint: Callable[[], None] = lambda: None,
          set_total: Callable[[int], None] = lambda n: None) -> TrainResult:
    """Train the reward model with Bradley–Terry on ``elements``: an ensemble of
    heads on the frozen base's features, bagged by prompt (rlhf.reward_ensemble,
    the default), or one head stopped on a held-out split and then (``finetune``)
    the reward adapter with it.

    ``log(step, metrics)`` gets loss, accuracy, margin, lr every step (a head
    epoch is a step); eval/accuracy, eval/margin, eval/loss at every evaluation;
    epoch at every epoch's end. Without a fixed number of epochs or steps,
    training stops once the held-out loss has not improved for ``patience``
    evaluations, and keeps the best state. ``checkpoint()`` runs between steps
    (cancel / pause)."""
    if not elements:
        raise UserError("no preference pairs to train on: label some comparisons or `rlhf import` a file")
    readout = config.readout_for(stack)
    torch.manual_seed(config.seed)
    stack.ensure_adapter(ADAPTER)
    if config.heads > 1:
        set_total(planned_epochs(config, True, "head"))
        bagged, judged = fit_ensemble(stack, elements, readout, config, log, checkpoint)
        return TrainResult(steps=bagged.steps, eval=bagged.eval, n_train=len(elements), n_eval=judged,
                           epochs=bagged.epochs, best_step=bagged.best_step, stopped_early=bagged.stopped_early,
                           readout=readout)
    train_set, held_out = split_by_prompt(elements, config.eval_fraction)
    head_epochs = planned_epochs(config, bool(held_out), "head")
    tuning_steps = (len(plan_steps(train_set, config, random.Random(config.seed),
                                   planned_epochs(config, bool(held_out), "finetune")))
                    if config.finetune else 0)
    set_total(head_epochs + tuning_steps)
    head = fit_split_head(stack, train_set, held_out, readout, config, log, checkpoint)
    last = head
    if config.finetune:
        last = finetune(stack, train_set, held_out, readout, config, head, log, checkpoint, head.steps + 1)
    return TrainResult(steps=head.steps + (last.steps if last is not head else 0), eval=last.eval,
                       n_train=len(train_set), n_eval=len(held_out), epochs=last.epochs,
                       best_step=last.best_step, stopped_early=last.stopped_early, readout=readout)
