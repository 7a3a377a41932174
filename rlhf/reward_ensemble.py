"""An ensemble of reward heads on the frozen base's features, bagged by prompt.

With tens of labels, one head stopped early on a held-out fifth wastes that fifth
and stops on a handful of comparisons' noise. Bagging uses every label: each head
trains on a bootstrap resample of the labeled prompts and stops early on the
prompts its resample left out (out-of-bag), and the reward is the heads' mean.
The out-of-bag ensemble (each comparison judged by the heads that never saw its
prompt) gives the held-out figure without setting labels aside (Breiman 1996).
Their spread is the reward model's uncertainty: when a policy leaves what the
labels cover (Coste et al. 2023, arXiv 2310.02743). Which comparison to label next
is asked of the features directly (rlhf.label_order).

The heads train in lockstep, one full-batch Adam step an epoch for all of them
([sequences, heads] rewards in one matrix product), until every head has gone
``patience`` epochs without a better out-of-bag loss; each keeps its best state.
A single head stopped on a held-out split (``--ensemble 1``, and under
``--finetune``) is the same loop with one head whose bag is the training split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from rlhf.reward_config import Readout, RewardConfig
from rlhf.reward_data import Element, prompt_bucket
from rlhf.reward_loss import Comparisons, PairEval
from rlhf.reward_scoring import batched_features
from rlhf.reward_schedule import Phase, linear_decay, planned_epochs

if TYPE_CHECKING:
    from rlhf.model_stack import ModelStack


def bootstrap_counts(elements: Sequence[Element], heads: int, seed: int) -> torch.Tensor:
    """[heads, elements]: how often each head's resample draws each element's prompt
    (all of a prompt's comparisons go together, so out-of-bag is by prompt, like the
    held-out split)."""
    prompts = sorted({e.prompt for e in elements}, key=prompt_bucket)
    index = {p: i for i, p in enumerate(prompts)}
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(prompts), (heads, len(prompts)), generator=generator)
    per_prompt = torch.stack([torch.bincount(row, minlength=len(prompts)) for row in draws]).float()
    return per_prompt[:, [index[e.prompt] for e in elements]]


def out_of_bag(layout: Comparisons, rewards: torch.Tensor, counts: torch.Tensor) -> PairEval:
    """The ensemble judged on what it did not train on: each sequence's reward is
    the mean of the heads whose resample left its prompt out; comparisons that
    every head saw are not counted."""
    left_out = (counts == 0).T.float()                     # [elements, heads]
    per_sequence = left_out[layout.sequence_element]       # [sequences, heads]
    judges = per_sequence.sum(1)
    oob = (rewards * per_sequence).sum(1) / judges.clamp(min=1)
    judged = left_out.sum(1) > 0                           # [elements]
    if not judged.any():
        return PairEval(float("nan"), float("nan"), 0)
    pairs = judged[layout.pair_element]
    margins = layout.margins(oob)[pairs]
    return PairEval(accuracy=(margins > 0).float().mean().item(), margin=margins.mean().item(),
                    n_pairs=len(margins), loss=layout.element_losses(oob)[judged].mean().item())


def fit_ensemble(stack: ModelStack, elements: Sequence[Element], readout: Readout, config: RewardConfig,
                 log: Callable[[int, dict[str, float]], None], checkpoint: Callable[[], None]) -> tuple[Phase, int]:
    """Train ``config.ensemble`` heads on every element into the stack's reward
    head; returns the phase (its eval out-of-bag) and how many elements the
    out-of-bag figure judged."""
    counts = bootstrap_counts(elements, config.ensemble, config.seed)
    phase = _fit_into_stack(stack, elements, counts, readout, config, log, checkpoint)
    return phase, int((counts == 0).any(0).sum())


def fit_split_head(stack: ModelStack, train: Sequence[Element], held_out: Sequence[Element], readout: Readout,
                   config: RewardConfig, log: Callable[[int, dict[str, float]], None],
                   checkpoint: Callable[[], None]) -> Phase:
    """One head stopped on a held-out split (``--ensemble 1``, and the head a
    fine-tuning starts from): ``fit_heads`` with a single head whose bag is the
    training split, so its out-of-bag elements are the held-out ones. Under a
    fine-tuning it always stops early: a fixed --epochs or --steps is the adapter's."""
    counts = torch.cat([torch.ones(len(train)), torch.zeros(len(held_out))])[None]
    return _fit_into_stack(stack, [*train, *held_out], counts, readout, config, log, checkpoint,
                           early=config.early_stopping or config.finetune)


def _fit_into_stack(stack: ModelStack, elements: Sequence[Element], counts: torch.Tensor, readout: Readout,
                    config: RewardConfig, log: Callable[[int, dict[str, float]], None],
                    checkpoint: Callable[[], None], early: bool | None = None) -> Phase:
    """``fit_heads`` on the elements' features, the heads put into the stack's
    reward head (raw features in, so scoring needs no standardization)."""
    layout = Comparisons(elements, config.best_of_k)
    x = batched_features(stack, layout.sequences, layout.lengths, readout, config.batch_size * 4)
    weight, bias, phase = fit_heads(x, layout, counts, config, log, checkpoint, early)
    with torch.no_grad():
        stack.set_reward_heads(weight.shape[1])
        stack.reward_head.weight.copy_(weight.T.to(stack.reward_head.weight))
        stack.reward_head.bias.copy_(bias.to(stack.reward_head.bias))
    return phase


def fit_heads(x: torch.Tensor, layout: Comparisons, counts: torch.Tensor, config: RewardConfig,
              log: Callable[[int, dict[str, float]], None] = lambda step, metrics: None,
              checkpoint: Callable[[], None] = lambda: None,
              early: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, Phase]:
    """Heads on features ``x`` [sequences, features] laid out by ``layout``, head h
    weighting element e ``counts[h, e]`` times (0: out of its bag). Returns weight
    [features, heads] and bias [heads] that read raw features (the standardization
    the training used is folded in), and the phase, its eval out-of-bag. ``early``
    (default: no fixed epochs or steps) stops each head where its out-of-bag loss
    was best: gradient descent from zero stopped early regularizes like an L2 penalty."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones(x.shape[1])
    z = (x - mean) / std
    n = counts.shape[0]
    left_out = counts == 0
    has_oob = left_out.any(1)                                          # heads with something to stop on
    in_bag = (counts > 0).any(0)                                       # elements some head trains on
    weight = torch.zeros(x.shape[1], n, requires_grad=True)
    bias = torch.zeros(n, requires_grad=True)
    epochs = planned_epochs(config, bool(has_oob.any()), "head")
    optimizer = torch.optim.Adam([weight, bias], lr=config.setting("lr", "head"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_decay(s, epochs))
    early = (config.early_stopping if early is None else early) and bool(has_oob.any())
    patience = config.setting("patience", "head")
    best_loss = torch.full((n,), float("inf"))
    best_epoch = torch.zeros(n, dtype=torch.long)
    best_weight, best_bias = weight.detach().clone(), bias.detach().clone()
    stop, epoch = False, 0
    for epoch in range(1, epochs + 1):
        checkpoint()
        lr = scheduler.get_last_lr()[0]
        optimizer.zero_grad(set_to_none=True)
        rewards = z @ weight + bias                                    # [sequences, heads]
        losses = layout.element_losses(rewards)                        # [elements, heads]
        per_head = (losses * counts.T).sum(0) / counts.sum(1).clamp(min=1)
        per_head.sum().backward()  # the heads share nothing: each gets its own loss's gradient
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            rewards = z @ weight + bias
            margins = layout.margins(rewards.mean(1))[in_bag[layout.pair_element]]
            metrics = {"loss": per_head.mean().item(), "accuracy": (margins > 0).float().mean().item(),
                       "margin": margins.mean().item(), "lr": lr, "epoch": float(epoch)}
            if has_oob.any():
                oob_losses = layout.element_losses(rewards)
                held = (oob_losses * left_out.T).sum(0) / left_out.sum(1).clamp(min=1)
                better = has_oob & (held < best_loss - 1e-4)
                best_loss = torch.where(better, held, best_loss)
                best_epoch = torch.where(better, epoch, best_epoch)
                best_weight[:, better] = weight.detach()[:, better]
                best_bias[better] = bias.detach()[better]
                result = out_of_bag(layout, rewards, counts)
                metrics.update({"eval/accuracy": result.accuracy, "eval/margin": result.margin,
                                "eval/loss": result.loss})
                stop = early and bool(((epoch - best_epoch)[has_oob] >= patience).all())
        log(epoch, metrics)
        if stop:
            break
    with torch.no_grad():
        if early:  # each head its best state; a head with nothing left out keeps its last
            weight[:, has_oob] = best_weight[:, has_oob]
            bias[has_oob] = best_bias[has_oob]
        result = out_of_bag(layout, z @ weight + bias, counts)
        raw_weight = weight / std[:, None]                             # [features, heads], raw features in
        raw_bias = bias - mean @ raw_weight
    kept = int(best_epoch[has_oob].max()) if early else epoch
    return raw_weight.detach(), raw_bias.detach(), Phase(steps=epoch, epochs=float(epoch), eval=result,
                                                         best_step=kept, stopped_early=stop)
