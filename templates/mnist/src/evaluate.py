"""Stage `evaluate`: the trained model's accuracy and confusion matrix on the test set, through DVCLive."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import model  # noqa: E402
from common import MODEL, load_data  # noqa: E402


def main() -> None:
    from dvclive import Live

    data = load_data()
    x_test, y_test = model.to_tensors(data["x_test"], data["y_test"])
    net = model.Net()
    net.load_state_dict(torch.load(MODEL, map_location="cpu", weights_only=True))
    predicted = model.predict(net, x_test, torch.device("cpu"))
    accuracy = float((predicted == y_test).float().mean())
    # dvcyaml=None: the pipeline's own dvc.yaml declares these files; DVCLive must not edit it.
    with Live("dvclive/evaluate", dvcyaml=None, save_dvc_exp=False, report=None) as live:
        live.log_metric("test_accuracy", accuracy, plot=False)
        live.log_metric("test_examples", len(y_test), plot=False)
        live.log_sklearn_plot("confusion_matrix", y_test.numpy(), predicted.numpy(),
                              name="confusion_matrix.json")
    print(f"test accuracy {accuracy:.4f} on {len(y_test)} images")


if __name__ == "__main__":
    main()
