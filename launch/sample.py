"""Generate text: `python launch/sample.py run_dir=outputs/baby prompt="to be" max_new_tokens=200`.

Decodes with a KV cache; past model.block_size tokens the context slides (see model/sampling.py).
"""
import sys
from dataclasses import dataclass

from launch.cli import load_checkpoint_or_exit, parse_args


@dataclass
class SampleArgs:
    run_dir: str = "outputs/baby"
    """A run dir (its latest checkpoint), its checkpoints dir, or one checkpoint dir."""
    prompt: str = "\n"
    """The text generation continues, taken as it is (spaces included), normalized as the training text."""
    max_new_tokens: int = 500
    """Tokens generated after the prompt."""
    temperature: float = 0.8
    """Softmax temperature; 0: greedy."""
    top_k: int = 0
    """Sample from the k likeliest tokens only; 0: no top-k filter."""
    top_p: float = 1.0
    """Nucleus sampling: from the likeliest tokens whose probabilities sum to p; 1: off."""
    seed: int = 0
    """Seed of the sampling generator."""
    num_samples: int = 1
    """Samples printed, each headed `--- sample N ---` when more than one."""


def main(argv: list[str]) -> None:
    args = parse_args(SampleArgs, argv, "launch/sample.py")  # before torch loads: a mistake is told at once
    import torch

    from data.tokenizer import from_vocab
    from model import generate

    model, client = load_checkpoint_or_exit(args.run_dir, "sample.py")
    tok = from_vocab(client["tokenizer"], client["vocab"], client["lowercase"])  # bytes: printed as UTF-8
    try:
        prompt_ids = list(tok.encode(tok.normalize(args.prompt))) or list(tok.encode("\n"))
    except ValueError as e:
        sys.exit(f"sample.py: prompt: {e}")
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(args.num_samples):
        try:
            out = generate(model, torch.tensor([prompt_ids]), args.max_new_tokens, args.temperature,
                           args.top_k or None, args.top_p, generator=gen)
        except ValueError as e:
            sys.exit(f"sample.py: {e}")
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(tok.decode_text(out[0].tolist()))


if __name__ == "__main__":
    main(sys.argv[1:])
