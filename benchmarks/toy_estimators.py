"""Score the toy depth and saliency estimators on 500 held-out rendered scenes.

python benchmarks/toy_estimators.py [--count 500]
"""

import argparse

from helpers.paths import TOY_ESTIMATORS_DIR
from helpers.toyworld.estimators import ToyEstimator
from helpers.toyworld.train_estimators import evaluate_estimator


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=500, help="number of held-out scenes")
    args = parser.parse_args()
    metrics = evaluate_estimator(ToyEstimator.from_pretrained(TOY_ESTIMATORS_DIR), args.count)
    for name, value in metrics.items():
        print(f"{name}={value:.4f}" if isinstance(value, float) else f"{name}={value}")


if __name__ == "__main__":
    main()
