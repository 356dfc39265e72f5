"""A GRPO-style policy-gradient loop on the CPU with fusedce's RL outputs.

    python examples/grpo_tiny.py [--steps 20]

A tiny policy (a bigram model: an embedding, an elementwise nonlinearity and an LM head, so
that its hidden states are themselves batch-invariant) learns to continue a prompt with the
token that follows each token (``t -> t + 1`` mod the vocabulary).  Each step:

1. rollout: sample a group of completions per prompt at a temperature, one token at a time, and
   record the sampler's log-probabilities of the sampled tokens, computed in small batches as
   an inference engine would (``fusedce.token_logprobs``, batch-invariant);
2. reward each completion by the share of correct tokens and normalise rewards within each
   group (GRPO's advantage);
3. recompute the policy's log-probabilities of the same tokens from the hidden states, all
   completions in one batch, never holding the logits (``fusedce.linear_cross_entropy`` with
   ``token_weight`` = the advantages, an entropy bonus from ``stats.entropy`` through
   ``differentiable_stats``, the same temperature).  Because both computations are
   batch-invariant, the first recomputation equals the rollout's log-probabilities bitwise,
   so the importance ratio of the unchanged policy is exactly 1;
4. one optimiser step.

It prints the mean reward per step and the largest |new - old| log-probability difference
before each update (0.0: bitwise agreement).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import fusedce

VOCAB, HIDDEN, PROMPT, COMPLETION = 64, 32, 4, 6
TEMPERATURE, ENTROPY_BONUS = 0.8, 0.01


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) tokens -> (B, T, H) hidden states; position t predicts token t + 1."""
        return torch.tanh(self.embed(tokens))


@torch.no_grad()
def rollout(policy: Policy, prompts: torch.Tensor, group: int, g: torch.Generator):
    """Sample ``group`` completions per prompt; return tokens (B*group, P+C) and the sampler's
    log-probabilities of the completion tokens (B*group, C), computed 3 sequences at a time."""
    tokens = prompts.repeat_interleave(group, dim=0)
    for _ in range(COMPLETION):
        logits = policy.head(policy.hidden(tokens)[:, -1]) / TEMPERATURE
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
        tokens = torch.cat([tokens, nxt], dim=1)
    old = []
    for part in tokens.split(3):  # the engine's own batching
        h = policy.hidden(part)[:, PROMPT - 1:-1]
        old.append(fusedce.token_logprobs(h, part[:, PROMPT:], linear_weight=policy.head.weight,
                                          temperature=TEMPERATURE))
    return tokens, torch.cat(old)


def rewards_of(tokens: torch.Tensor) -> torch.Tensor:
    """Share of completion tokens equal to the previous token + 1."""
    right = tokens[:, PROMPT:] == (tokens[:, PROMPT - 1:-1] + 1) % VOCAB
    return right.float().mean(dim=1)


def grpo_step(policy: Policy, opt, tokens, old_logprobs, group: int) -> tuple[float, float]:
    rewards = rewards_of(tokens)
    grouped = rewards.view(-1, group)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4))
    adv = adv.reshape(-1, 1).expand(-1, COMPLETION)
    hidden = policy.hidden(tokens)[:, PROMPT - 1:-1]
    # -logp weighted by the advantage: the policy gradient of sum(adv * logp) (on-policy, the
    # ratio is 1); the mean divides by the tokens' count through num_items_in_batch.
    loss, stats = fusedce.linear_cross_entropy(
        hidden, policy.head.weight, tokens[:, PROMPT:], token_weight=adv,
        num_items_in_batch=adv.numel(), temperature=TEMPERATURE, return_stats=True,
        differentiable_stats=True, batch_invariant=True, reduction="mean")
    with torch.no_grad():
        new_logprobs = fusedce.token_logprobs(hidden, tokens[:, PROMPT:],
                                              linear_weight=policy.head.weight,
                                              temperature=TEMPERATURE)
    drift = (new_logprobs - old_logprobs).abs().max().item()
    objective = loss - ENTROPY_BONUS * stats.entropy.mean()
    opt.zero_grad()
    objective.backward()
    opt.step()
    return rewards.mean().item(), drift


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--group", type=int, default=4)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    policy = Policy()
    opt = torch.optim.Adam(policy.parameters(), lr=5e-2)
    print("step mean_reward max_logprob_drift")
    for step in range(args.steps):
        prompts = torch.randint(0, VOCAB, (8, 1), generator=g)
        prompts = (prompts + torch.arange(PROMPT)) % VOCAB  # prompts follow the rule too
        tokens, old = rollout(policy, prompts, args.group, g)
        reward, drift = grpo_step(policy, opt, tokens, old, args.group)
        print(f"{step} {reward:.4f} {drift:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
