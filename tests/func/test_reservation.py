"""An experiment's reservation holds its stage's Ray work (issue 22): with `--cpus-per-exp N`
the Ray tasks, Tune trials and Train workers a stage starts run inside the experiment's own
placement group, on the runner's node, never more at once than N, so no CPU has to stay
free and experiments that fill the cluster still end.

Real Ray (the session head: 2 CPUs; the local store keeps runners on the head), real
`dvc exp run`, the runner service. Each stage measures itself: its Ray work meets at a
counter actor (0 CPUs) that keeps how many were inside at once, and waits there until N
are (or a long while passed), so the count does not hang on how fast the machine is.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers import exp_metrics, run_dvcray

# The stage's Ray work checks in at a counter, waits until `want` are in (at most 60 s),
# and reports where it ran. What the stage writes: how many were in at once at most,
# whether all ran in the experiment's reservation, and on the runner's node.
COMMON = """\
import json, os, time, uuid, ray, yaml
params = yaml.safe_load(open("params.yaml"))
want = params["want"]
ray.init()

@ray.remote(num_cpus=0)
class Counter:
    def __init__(self):
        self.inside = self.most = 0
        self.places = []
    def enter(self, place):
        self.places.append(place)
        self.inside += 1
        self.most = max(self.most, self.inside)
    def leave(self):
        self.inside -= 1
    def now(self):
        return self.inside
    def peak(self):
        return self.most, self.places

counter = Counter.remote()

def meet():
    group = ray.util.get_current_placement_group()
    place = {"group": group.id.hex() if group else "", "node": ray.get_runtime_context().get_node_id()}
    ray.get(counter.enter.remote(place))
    deadline = time.time() + 60
    while ray.get(counter.now.remote()) < want and time.time() < deadline:
        time.sleep(0.1)
    ray.get(counter.leave.remote())
    return place

def report():
    most, places = ray.get(counter.peak.remote())
    json.dump({"x": params["x"], "at_once": most, "count": len(places),
               "in_reservation": all(p["group"] == os.environ.get("DVCRAY_RESERVATION") for p in places),
               "on_runner_node": all(p["node"] == os.environ.get("DVCRAY_RAY_NODE") for p in places),
               "start": START, "end": time.time()}, open("m.json", "w"))

START = time.time()
"""
TASKS = COMMON + """
@ray.remote(num_cpus=1)
def work(i):
    return meet()

ray.get([work.remote(i) for i in range(4)])
report()
"""
TUNE = COMMON + """
from ray import tune

def trial(config):
    tune.report(meet())

grid = tune.Tuner(tune.with_resources(trial, {"cpu": 1}), param_space={"i": tune.grid_search(list(range(4)))},
                  run_config=tune.RunConfig(storage_path=os.path.abspath("tune-out"), name=uuid.uuid4().hex,
                                            verbose=0)).fit()
assert not grid.errors, grid.errors
report()
"""
TRAIN = COMMON + """
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

def loop(config):
    meet()

TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=want, resources_per_worker={"CPU": 1}),
                      run_config=RunConfig(storage_path=os.path.abspath("train-out"), name=uuid.uuid4().hex)).fit()
report()
"""


def project(make_dvc_project, stage: str, want: int) -> Path:
    return make_dvc_project({
        "params.yaml": f"x: 1\nwant: {want}\n",
        "stage.py": stage,
        ".gitignore": "tune-out/\ntrain-out/\n",
        "dvc.yaml": "stages:\n  s:\n    cmd: python stage.py\n    deps: [stage.py]\n    params: [x, want]\n"
                    "    metrics: [{m.json: {cache: false}}]\n",
    })


def run(root: Path, store: Path, *args: str) -> str:
    proc = run_dvcray("run", "--store", str(store), *args, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_a_stage_that_reserves_every_cpu_still_runs_its_ray_tasks_inside_its_reservation(
        ray_cluster, make_dvc_project, tmp_path):
    # 2 CPUs reserved on a 2-CPU head: tasks asking Ray for CPUs of their own would wait forever.
    root = project(make_dvc_project, TASKS, want=2)
    run(root, tmp_path / "store", "-n", "all", "-S", "x=9201", "--cpus-per-exp", "2")
    m = exp_metrics(root, "all", "m.json")
    assert m["count"] == 4 and m["in_reservation"] and m["on_runner_node"], m
    assert m["at_once"] == 2, f"two 1-CPU tasks at a time inside 2 CPUs: {m}"


def test_experiments_that_fill_the_cluster_run_side_by_side_each_inside_its_own_cpu(
        ray_cluster, make_dvc_project, tmp_path):
    # Two experiments of one CPU each on two CPUs: both at once, none kept free for their tasks.
    root = project(make_dvc_project, TASKS, want=1)
    out = run(root, tmp_path / "store", "-n", "pair", "-S", "x=9301,9302", "--cpus-per-exp", "1")
    assert "At most 1 experiment" not in out, out
    first, second = (exp_metrics(root, f"pair-{i}", "m.json") for i in (1, 2))
    for m in (first, second):
        assert m["count"] == 4 and m["in_reservation"] and m["on_runner_node"] and m["at_once"] == 1, m
    assert first["start"] < second["end"] and second["start"] < first["end"], "the two ran at the same time"


def test_a_tune_stage_gets_exactly_the_trials_its_reservation_holds(ray_cluster, make_dvc_project, tmp_path):
    root = project(make_dvc_project, TUNE, want=2)
    run(root, tmp_path / "store", "-n", "tuned", "-S", "x=9401", "--cpus-per-exp", "2")
    m = exp_metrics(root, "tuned", "m.json")
    assert m["count"] == 4 and m["in_reservation"] and m["on_runner_node"], m
    assert m["at_once"] == 2, f"2 one-CPU trials at a time in 2 CPUs: {m}"


def test_a_train_stage_runs_its_workers_inside_the_reservation(ray_cluster, make_dvc_project, tmp_path):
    root = project(make_dvc_project, TRAIN, want=2)
    run(root, tmp_path / "store", "-n", "trained", "-S", "x=9501", "--cpus-per-exp", "2")
    m = exp_metrics(root, "trained", "m.json")
    assert m["count"] == 2 and m["in_reservation"] and m["on_runner_node"] and m["at_once"] == 2, m
