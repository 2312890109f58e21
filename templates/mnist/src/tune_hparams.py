"""Stage `tune`: search lr and momentum with Ray Tune, stopping poor trials early (ASHA).

Writes best_params.yaml (read by the train stage), tune/trials.csv (one row per
trial, with the Ray node it ran on), tune/epochs.csv and tune/accuracy.png
(validation accuracy per trial and epoch), and tune/metrics.json. While it runs,
dvclive/tune/trial-N/ gets each trial's loss and accuracy per epoch, written by
this (the driver's) process as the trials report them, wherever they run. The
data reaches the trials through Ray's object store (``tune.with_parameters``),
so trials can run on any machine of a cluster.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import model  # noqa: E402
from common import load_data, load_params, run_name, start_ray, storage_path  # noqa: E402

OUT = Path("tune")


def trial(config: dict, data: dict, max_epochs: int, batch_size: int, seed: int, threads: int,
          use_gpu: bool) -> None:
    """One Tune trial: train with config's lr and momentum, report validation accuracy each epoch."""
    import ray
    import torch
    from ray import tune
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed)
    # Only a trial that Ray gave a GPU uses one (others may still see the node's GPUs).
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    x_train, y_train = model.to_tensors(data["x_train"], data["y_train"])
    x_val, y_val = model.to_tensors(data["x_val"], data["y_val"])
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    net = model.Net().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=config["lr"], momentum=config["momentum"])
    node = ray.get_runtime_context().get_node_id()    # which Ray node ran this trial
    for epoch in range(1, max_epochs + 1):
        loss_sum, _, seen = model.train_epoch(net, loader, optimizer, device)
        tune.report({"epoch": epoch, "loss": loss_sum / seen,
                     "accuracy": model.accuracy(net, x_val, y_val, device), "node": node})


def main() -> None:
    params = load_params()
    cfg = params["tune"]
    start_ray()
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from dvcray_cli.integrations.dvclive import DVCLiveTuneCallback

    model.ship_by_value()
    trainable = tune.with_parameters(   # puts the data in Ray's object store, once
        trial, data=load_data(), max_epochs=cfg["max_epochs"], batch_size=cfg["batch_size"],
        seed=cfg["seed"], threads=cfg["cpus_per_trial"], use_gpu=cfg["gpus_per_trial"] > 0)
    trainable = tune.with_resources(trainable, {"cpu": cfg["cpus_per_trial"],
                                                "gpu": cfg["gpus_per_trial"]})
    tuner = tune.Tuner(
        trainable,
        param_space={"lr": tune.loguniform(cfg["lr"]["low"], cfg["lr"]["high"]),
                     "momentum": tune.uniform(cfg["momentum"]["low"], cfg["momentum"]["high"])},
        tune_config=tune.TuneConfig(
            metric="accuracy", mode="max", num_samples=cfg["num_samples"],
            reuse_actors=True,   # a trial starts in the process a finished one leaves: no new start-up
            search_alg=BasicVariantGenerator(random_state=cfg["seed"],
                                             max_concurrent=cfg["max_concurrent_trials"]),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg["max_epochs"],
                                    grace_period=cfg["grace_period"],
                                    reduction_factor=cfg["reduction_factor"])),
        run_config=tune.RunConfig(storage_path=storage_path(params["ray"]["storage_path"]),
                                  name=run_name("tune"), verbose=1,
                                  # One DVCLive step per epoch of each trial, in dvclive/tune/trial-N.
                                  callbacks=[DVCLiveTuneCallback("dvclive/tune", step_metric="epoch")]),
    )
    results = tuner.fit()
    if results.errors:
        raise SystemExit(f"tune: {len(results.errors)} trial(s) failed; first error: {results.errors[0]}")

    best = results.get_best_result()
    best_params = {"lr": float(best.config["lr"]), "momentum": float(best.config["momentum"])}
    Path("best_params.yaml").write_text(
        "# Written by the tune stage (src/tune_hparams.py); read by the train stage.\n"
        + "".join(f"{key}: {value:.6g}\n" for key, value in best_params.items()))

    import pandas as pd

    trials = pd.DataFrame([{"trial": trial_number(r.metrics["trial_id"]), "lr": r.config["lr"],
                            "momentum": r.config["momentum"], "epochs": r.metrics["epoch"],
                            "accuracy": r.metrics["accuracy"], "loss": r.metrics["loss"],
                            "best": r.metrics["trial_id"] == best.metrics["trial_id"],
                            "node": r.metrics["node"]}
                           for r in results])
    trials = trials.sort_values("trial").reset_index(drop=True)
    epochs = pd.concat([r.metrics_dataframe.assign(trial=trial_number(r.metrics["trial_id"]))
                        [["trial", "epoch", "accuracy", "loss"]] for r in results])
    epochs = epochs.sort_values(["trial", "epoch"]).reset_index(drop=True)
    OUT.mkdir(exist_ok=True)
    trials.to_csv(OUT / "trials.csv", index=False, float_format="%.6g")
    epochs.to_csv(OUT / "epochs.csv", index=False, float_format="%.6g")
    (OUT / "metrics.json").write_text(json.dumps({
        "best_accuracy": float(best.metrics["accuracy"]), "trials": len(trials),
        "epochs_run": int(trials["epochs"].sum())}, indent=2) + "\n")
    plot_epochs(trials, epochs, OUT / "accuracy.png")
    print(f"best of {len(trials)} trials on {trials['node'].nunique()} Ray node(s): "
          f"lr={best_params['lr']:.4g} momentum={best_params['momentum']:.3f} "
          f"val accuracy={best.metrics['accuracy']:.4f}")


def trial_number(trial_id: str) -> int:
    """0, 1, 2... from Tune's trial id ("3f2a1_00002"), whose prefix changes from run to run."""
    return int(trial_id.rsplit("_", 1)[-1])


def plot_epochs(trials, epochs, path: Path) -> None:
    """Validation accuracy per epoch, one line per trial (ASHA's early stops show as short lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for row in trials.itertuples():
        rows = epochs[epochs["trial"] == row.trial]
        ax.plot(rows["epoch"], rows["accuracy"], marker="o", linewidth=2.5 if row.best else 1.2,
                label=f"trial {row.trial}: lr={row.lr:.3g}, momentum={row.momentum:.2f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Ray Tune trials (ASHA stops the weaker ones early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
