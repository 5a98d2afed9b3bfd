"""How much of a change of the MLP output each block passes on, by size, and the norm clamp ROME
derives from it (mlp_change.block_response / response_clamp; RomeSettings.defaults_for).

    python benchmarks/block_response.py --model gemma3-270m --layers 1 2 3 5

For a change of size c x ||m|| orthogonal to the MLP output m at the subject's last token of a fixed
prompt: ||block output change|| / (c x the linearised response), mean over 8 random directions.
1 at every size where the block adds m to the residual stream as it is; falling where a norm
follows the MLP. The closed form for a norm with a uniform gain, 2 sin(atan(c) / 2) / c, is printed
for comparison.
"""

from __future__ import annotations

import argparse
import math

import torch

from factedit import load
from factedit.edit.mlp_change import block_response, response_clamp
from factedit.edit.rome import clamp_for_block

FACTORS = [0.25, 0.5, 1.0, 2.0, 4.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    print(f"{args.model}: response to a change of c x ||m|| (1 = passed on as it is)")
    print("| layer | " + " | ".join(f"c = {c:g}" for c in FACTORS) + " | c at response 0.75 | derived clamp (0.9) |")
    print("|---|" + "---|" * (len(FACTORS) + 2))
    print("| closed form, uniform-gain norm | " + " | ".join(f"{2 * math.sin(math.atan(c) / 2) / c:.3f}" for c in FACTORS)
          + " | 1.07 | 0.57 |")
    for layer in args.layers:
        response = block_response(lm, layer, FACTORS)
        print(f"| {layer} | " + " | ".join(f"{r:.3f}" for r in response)
              + f" | {response_clamp(lm, layer, 4.0, keep=0.75):g} | {clamp_for_block(lm, layer):g} |")


if __name__ == "__main__":
    main()
