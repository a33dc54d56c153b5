"""Measure the toy-world renderer's speed on one core: ``scenes_per_second=<value>``.

python benchmarks/render_speed.py [--scenes 400] [--size 64]
"""

import argparse
import time

from helpers.toyworld.render import render


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=400, help="number of scenes to render")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    args = parser.parse_args()

    render(0, args.size)  # warm-up
    start = time.perf_counter()
    for seed in range(args.scenes):
        render(seed, args.size)
    seconds = time.perf_counter() - start
    print(f"scenes={args.scenes}")
    print(f"size={args.size}")
    print(f"scenes_per_second={args.scenes / seconds:.1f}")


if __name__ == "__main__":
    main()
