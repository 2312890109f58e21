"""Stage `train`: train the model with Ray Train (PyTorch DDP) using the lr and momentum tune found.

The data reaches the workers through Ray's object store, so they can run on
any machine of a cluster. Every epoch, rank 0 reports a checkpoint; the model
file is taken from the result's checkpoint (wherever storage_path is, a local
folder or s3://), never from a worker's folder. Each epoch's metrics go to
dvclive/train as rank 0 reports them, written on the driver's machine by Ray
Train's controller (DVCLiveTrainCallback), never by a worker.

Under `dvcray run`, a run lost with its machine is tried again, and this stage resumes:
the Ray Train run keeps its name for every attempt (run_name), so Ray Train restores the
latest checkpoint, the loop starts after its epoch (ray.train.get_checkpoint()), and
DVCLive continues the steps it kept beside the checkpoints (keep=...).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
import model  # noqa: E402
from common import MODEL, load_data, load_params, start_ray, storage_path  # noqa: E402


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import logging
    import os
    import sys
    import tempfile

    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset

    # Ray Train logs a line per report and per checkpoint, and its print() patch
    # echoes every print twice: keep the console to one line per epoch.
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, config["threads"]))
    torch.manual_seed(config["seed"])
    data = ray.get(config["data"])    # an object-store reference, not a path on the head
    x_train, y_train = model.to_tensors(data["x_train"], data["y_train"])
    x_val, y_val = model.to_tensors(data["x_val"], data["y_val"])
    loader = DataLoader(TensorDataset(x_train, y_train),
                        batch_size=max(1, config["batch_size"] // world), shuffle=True,
                        generator=torch.Generator().manual_seed(config["seed"]))
    # Shards the batches across the workers and moves them to this worker's device.
    loader = ray.train.torch.prepare_data_loader(loader)
    device = ray.train.torch.get_device()
    plain = model.Net()
    resumed = ray.train.get_checkpoint()   # a retry: the latest checkpoint of this Ray Train run
    state = {"epoch": 0}
    if resumed is not None:
        with resumed.as_directory() as folder:
            plain.load_state_dict(torch.load(os.path.join(folder, "model.pt"), map_location="cpu",
                                             weights_only=True))
            state = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=True)
        if rank == 0:
            sys.stdout.write(f"resuming after epoch {state['epoch']} (its checkpoint)\n")
    net = ray.train.torch.prepare_model(plain)   # DDP when there are several workers
    optimizer = torch.optim.SGD(net.parameters(), lr=config["lr"], momentum=config["momentum"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])

    for epoch in range(state["epoch"] + 1, config["epochs"] + 1):
        if world > 1:
            loader.sampler.set_epoch(epoch)
        loss_sum, correct, seen = model.train_epoch(net, loader, optimizer, device)
        totals = torch.tensor([loss_sum, correct, seen], dtype=torch.float64, device=device)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(totals)            # sums over the workers' shards
        loss_sum, correct, seen = totals.tolist()
        metrics = {"epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen,
                   "val_accuracy": model.accuracy(net, x_val, y_val, device)}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                plain = net.module if hasattr(net, "module") else net
                torch.save(plain.state_dict(), os.path.join(tmp, "model.pt"))
                torch.save({"epoch": epoch, "optimizer": optimizer.state_dict()}, os.path.join(tmp, "state.pt"))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0:
            sys.stdout.write("epoch {epoch}: loss={loss:.4f} accuracy={accuracy:.4f} "
                             "val_accuracy={val_accuracy:.4f}\n".format(**metrics))
            sys.stdout.flush()


def main() -> None:
    params = load_params()
    cfg = params["train"]
    best = yaml.safe_load(Path("best_params.yaml").read_text())
    # Ray Train's controller collects each report when it polls the workers, every 2 s by
    # default, and a worker's next report waits for that: with short epochs, poll faster.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    start_ray()
    import ray
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dvcray_cli.integrations.dvclive import DVCLiveTrainCallback
    from dvcray_cli.integrations.storage import run_name

    model.ship_by_value()
    storage, name = storage_path(params["ray"]["storage_path"]), run_name("train")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"data": ray.put(load_data()), "lr": best["lr"],
                           "momentum": best["momentum"], "epochs": cfg["epochs"],
                           "batch_size": cfg["batch_size"], "seed": cfg["seed"],
                           "threads": cfg["cpus_per_worker"]},
        scaling_config=ScalingConfig(num_workers=cfg["num_workers"], use_gpu=cfg["use_gpu"],
                                     resources_per_worker={"CPU": cfg["cpus_per_worker"]}),
        run_config=RunConfig(storage_path=storage, name=name, checkpoint_config=CheckpointConfig(num_to_keep=1),
                             # One DVCLive step per epoch (rank 0's report), while training runs; a
                             # copy beside the checkpoints, for a resumed run to continue.
                             callbacks=[DVCLiveTrainCallback("dvclive/train", step_metric="epoch",
                                                             keep=f"{storage}/{name}/dvclive")],
                             # Ray Train's own INFO lines (one per report and checkpoint) are noise
                             # here: the loop prints one line per epoch instead.
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise SystemExit("train: Ray Train finished without a checkpoint; no model to save.")
    MODEL.parent.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as folder:
        shutil.copyfile(Path(folder) / "model.pt", MODEL)

    last = result.metrics     # the last report (the one with the last checkpoint)
    print(f"trained {int(last['epoch'])} epochs on {cfg['num_workers']} Ray Train worker(s): "
          f"loss={last['loss']:.4f} accuracy={last['accuracy']:.4f} "
          f"val_accuracy={last['val_accuracy']:.4f}; model saved to {MODEL}")


if __name__ == "__main__":
    main()
