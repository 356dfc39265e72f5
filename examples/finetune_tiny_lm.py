"""Fine-tune a tiny, randomly initialised causal LM on the CPU with fusedce's loss, next to the
same model trained with transformers' own loss, and print both loss curves.

    python examples/finetune_tiny_lm.py [--steps 30]

The data is synthetic (arithmetic sequences of token ids, padded to different lengths, so the
model has something to learn and padding has to be masked); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy

import torch
import transformers

from fusedce.integrations import transformers as fce_hf

VOCAB = 512


def make_batch(generator: torch.Generator, batch: int = 8, seq: int = 32):
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    stride = torch.randint(1, 5, (batch, 1), generator=generator)
    input_ids = (start + stride * torch.arange(seq)) % VOCAB
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(seq) < lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = fce_hf.build_labels(input_ids, attention_mask)
    return input_ids, attention_mask, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config)
    model = copy.deepcopy(reference)
    fce_hf.apply(model)  # this model only: `reference` keeps transformers' loss

    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (model, reference)]
    generator = torch.Generator().manual_seed(0)
    print(f"{'step':>4}  {'fusedce':>9}  {'transformers':>12}")
    for step in range(args.steps):
        input_ids, attention_mask, labels = make_batch(generator)
        losses = []
        for m, opt in zip((model, reference), optimizers):
            out = m(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(out.loss.item())
        print(f"{step:4d}  {losses[0]:9.4f}  {losses[1]:12.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
