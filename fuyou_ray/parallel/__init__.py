"""Data parallelism: N pipelines (GPU compute + SSD I/O + optimizer pool each, one per GPU) train one model.

`runtime.data_parallel: N` splits every step's global batch into N equal parts, one per pipeline. Each
pipeline streams the full model through its GPU on its part; as each unit's gradient leaves a GPU, the
pipelines' comm actors sum it with a gloo reduce-scatter, so pipeline k receives the summed gradient of
its 1/N element range of the unit. Optimizer state is sharded ZeRO-style: pipeline k's store holds only
range k of every unit's fp32 master weights and Adam moments (plus the full params, which every forward
reads), updates it, and the new params are all-gathered so that every pipeline's next forward reads the
full unit from its own SSDs. Exact clipping uses the global norm (an all-reduce of the ranges' norms). A
step commits for the whole job once every pipeline has published it (a two-phase commit by the driver).

Modules, core first:
- `shards`    element ranges, shard record names, per-pipeline paths and configs, the run dir's layout
- `commit`    the job's two-phase commit and the reconciliation of the stores at (re)start
- `schedule`  a pipeline's step as data, and the merge of all pipelines' ops into one schedule
- `actors`    the compute / SSD actors specialised, and the comm actor (gloo group, ring owner)
- `executor`  placement groups and actors of N pipelines; waiting for a step
- `driver`    `train_data_parallel`, which `fuyou_ray.train` runs when runtime.data_parallel > 1
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fuyou_ray.parallel.shards import ShardMismatchError, check_layout

if TYPE_CHECKING:
    from fuyou_ray.driver import TrainResult

__all__ = ["ShardMismatchError", "check_layout", "train_data_parallel"]


def train_data_parallel(
    cfg: Any, *, stop_after: int | None = None, executor: str | None = None
) -> TrainResult:
    """See fuyou_ray.parallel.driver.train_data_parallel (imported here lazily: it needs Ray)."""
    from fuyou_ray.parallel.driver import train_data_parallel as run

    return run(cfg, stop_after=stop_after, executor=executor)
