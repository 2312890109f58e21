"""Fan the work out as Ray tasks, gather it, and write the metric DVC tracks.

Run it with `dvc exp run` on your machine (Ray starts locally) or with
`dvcray run` on a cluster (Ray connects to it through RAY_ADDRESS).
"""

import json
import sys
from pathlib import Path

import ray
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from work import count_inside  # noqa: E402


def main() -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())["estimate"]
    ray.init()
    task = ray.remote(count_inside)
    # One seed per task, derived from the experiment's seed.
    counts = ray.get([task.remote(params["seed"] * 1000 + i, params["samples"])
                      for i in range(params["tasks"])])
    total = params["tasks"] * params["samples"]
    estimate = 4.0 * sum(counts) / total
    metrics = {"pi": estimate, "error": abs(estimate - 3.141592653589793), "samples": total}
    Path("metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"pi ~ {estimate:.6f} from {total} samples in {params['tasks']} Ray tasks")


if __name__ == "__main__":
    main()
