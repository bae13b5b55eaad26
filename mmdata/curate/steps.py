"""The engine task of one step over one input shard: ``run_shard_task`` calls the step ``task.step``
names, from the module that decides it (``mmdata.curate.parts`` lists them)."""
from __future__ import annotations

from mmdata.curate import decontaminate, duplicates, filters, keyrank, plans
from mmdata.curate.parts import ShardTask
from mmdata.storage import OutputDir

STEPS = {**keyrank.STEPS, **filters.STEPS, **decontaminate.STEPS, **duplicates.STEPS, **plans.STEPS}


def run_shard_task(task: ShardTask) -> dict:
    return STEPS[task.step](task, OutputDir(task.out))
